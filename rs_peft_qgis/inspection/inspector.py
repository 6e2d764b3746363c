"""The inspector of the panel's Inspect tab: a layer's polygons (changes, objects, land cover) biggest first;
select one to zoom to it, accept or reject it (A / R), export the verdicts as labels for the next fine-tune."""

from __future__ import annotations

import contextlib
from pathlib import Path

from qgis.core import Qgis, QgsCoordinateTransform, QgsCsException, QgsProject, QgsRectangle, QgsVectorLayer
from qgis.gui import QgsMapCanvas
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QBrush, QColor, QKeySequence
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QShortcut,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from rs_peft_qgis.inspection.verdicts import (
    ACCEPTED,
    REJECTED,
    change_rows,
    export_labels,
    readable_area,
    review_of,
    set_verdict,
)

_ROW_COLOURS = {ACCEPTED: QColor(198, 239, 206), REJECTED: QColor(255, 199, 206)}
_TEXT_COLOUR = QColor(0, 0, 0)
PICK = "Pick a layer of polygons to review (changes, objects or land cover)."


def zoom_to_feature(canvas: QgsMapCanvas, layer: QgsVectorLayer, fid: int) -> str:
    """Zoom the map to the feature with some margin around it, and flash it; "" or why it cannot."""
    feat = layer.getFeature(fid)
    if not feat.isValid() or not feat.hasGeometry():
        return "This feature no longer exists in the layer."
    transform = QgsCoordinateTransform(layer.crs(), canvas.mapSettings().destinationCrs(), QgsProject.instance())
    try:
        rect = transform.transformBoundingBox(feat.geometry().boundingBox())
    except QgsCsException:  # the feature lies outside the map CRS's valid area
        return "This feature cannot be shown in the map's coordinate system."
    # Show the polygon with its surroundings; a point or tiny polygon still gets a readable view.
    size = max(rect.width(), rect.height())
    if size <= 0:
        size = canvas.mapUnitsPerPixel() * 50 or 1.0
    margin = size * 0.5
    canvas.setExtent(
        QgsRectangle(
            rect.xMinimum() - margin, rect.yMinimum() - margin, rect.xMaximum() + margin, rect.yMaximum() + margin
        )
    )
    canvas.refresh()
    canvas.flashFeatureIds(layer, [fid])
    return ""


class ChangeInspector(QWidget):
    """A list of a layer's polygons, biggest first: select to zoom, Accept (A) / Reject (R), export labels."""

    COLUMNS = ("#", "Area", "Confidence", "Verdict")

    def __init__(self, iface, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.iface = iface
        self.layer: QgsVectorLayer | None = None
        self.task: str | None = None  # whose polygons: "change" (also when unknown), "objects", "landcover"
        self._rows: list[tuple[int, float, float | None, str | None]] = []
        self._verdicts: dict[int, str | None] = {}
        self._row_of: dict[int, int] = {}
        self._zoom = True  # off while following a selection made on the map

        self.title = QLabel(PICK)
        self.title.setWordWrap(True)
        self.table = QTableWidget(0, len(self.COLUMNS), self)
        self.table.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.currentCellChanged.connect(self._on_current_changed)

        self.prev_button = QPushButton("Previous")
        self.accept_button = QPushButton("Accept")
        self.reject_button = QPushButton("Reject")
        self.next_button = QPushButton("Next")
        self.prev_button.setToolTip("Go to the previous polygon in the list")
        self.next_button.setToolTip("Go to the next polygon in the list")
        self.prev_button.clicked.connect(lambda: self.step_by(-1))
        self.next_button.clicked.connect(lambda: self.step_by(1))
        self.accept_button.clicked.connect(lambda: self.judge(ACCEPTED))
        self.reject_button.clicked.connect(lambda: self.judge(REJECTED))
        # Only while the panel has focus: a bare letter must not steal keys from the rest of QGIS.
        self.shortcuts = []
        for key, slot in (("A", lambda: self.judge(ACCEPTED)), ("R", lambda: self.judge(REJECTED))):
            shortcut = QShortcut(QKeySequence(key), self)
            shortcut.setContext(Qt.WidgetWithChildrenShortcut)
            shortcut.activated.connect(slot)
            self.shortcuts.append(shortcut)

        self.counter = QLabel("")
        self.export_button = QPushButton("Export labels…")
        self._set_wording()
        self.export_button.clicked.connect(self._export_dialog)

        buttons = QHBoxLayout()
        for b in (self.prev_button, self.accept_button, self.reject_button, self.next_button):
            buttons.addWidget(b)
        bottom = QHBoxLayout()
        bottom.addWidget(self.counter, 1)
        bottom.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addWidget(self.table, 1)
        layout.addLayout(buttons)
        layout.addLayout(bottom)
        self._update_controls()

    # --- the layer -----------------------------------------------------------------------------
    def _set_wording(self) -> None:
        review = review_of(self.task)
        self.accept_button.setToolTip(review.accept_tip)
        self.reject_button.setToolTip(review.reject_tip)
        self.export_button.setToolTip(review.export_tip)

    def set_layer(self, layer: QgsVectorLayer | None, task: str | None = None) -> None:
        """Review `layer` (any vector layer with geometries), the polygons of `task` (None: changes, or a layer
        picked by hand); None clears the list."""
        self.task = task
        self._set_wording()
        if self.layer is not None:
            for signal, slot in (
                (self.layer.willBeDeleted, self._layer_gone),
                (self.layer.selectionChanged, self._selected_on_map),
            ):
                with contextlib.suppress(TypeError, RuntimeError):  # already gone or never connected
                    signal.disconnect(slot)
        self.layer = layer if isinstance(layer, QgsVectorLayer) and layer.isValid() else None
        self.table.blockSignals(True)
        self.table.setRowCount(0)
        self._rows, self._verdicts = [], {}
        self._row_of: dict[int, int] = {}
        if self.layer is None:
            self.title.setText(PICK)
        elif not self.layer.isSpatial():
            self.title.setText(f"'{self.layer.name()}' has no geometries to review.")
            self.layer = None
        else:
            self.layer.willBeDeleted.connect(self._layer_gone)
            self.layer.selectionChanged.connect(self._selected_on_map)
            self._rows = change_rows(self.layer)
            self._verdicts = {fid: verdict for fid, _, _, verdict in self._rows}
            self._row_of = {row[0]: i for i, row in enumerate(self._rows)}
            self.title.setText(
                f"{len(self._rows)} {review_of(task).items} of '{self.layer.name()}', biggest first. "
                "Select one to zoom to it, then accept or reject it."
            )
            self.table.setRowCount(len(self._rows))
            for row, (fid, area, conf, _) in enumerate(self._rows):
                cells = (str(row + 1), readable_area(area), "–" if conf is None else f"{conf:.2f}", "")
                for col, text in enumerate(cells):
                    item = QTableWidgetItem(text)
                    item.setToolTip(f"Feature {fid}")
                    if col < 3:
                        item.setTextAlignment(int(Qt.AlignRight | Qt.AlignVCenter))
                    self.table.setItem(row, col, item)
                self._paint_row(row)
        self.table.blockSignals(False)
        self._update_controls()

    def _layer_gone(self) -> None:
        self.layer = None
        self.set_layer(None)

    def fid_at(self, row: int) -> int:
        return self._rows[row][0]

    @property
    def current_row(self) -> int:
        return self.table.currentRow()

    def reviewed_count(self) -> int:
        return sum(1 for v in self._verdicts.values() if v is not None)

    # --- navigation ----------------------------------------------------------------------------
    def select_row(self, row: int) -> None:
        if 0 <= row < self.table.rowCount():
            self.table.setCurrentCell(row, 0)
            self.table.scrollToItem(self.table.item(row, 0))

    def step_by(self, step: int) -> None:
        """Previous (-1) / next (+1) row; with nothing selected, 'next' starts at the first unreviewed one."""
        if not self._rows:
            return
        row = self.current_row
        if row < 0:
            self.select_row(self._next_unreviewed(-1) if step > 0 else 0)
        else:
            self.select_row(min(max(row + step, 0), len(self._rows) - 1))

    def _next_unreviewed(self, after: int) -> int:
        """The first unreviewed row after `after` (wrapping round); `after` + 1 when every row is reviewed."""
        n = len(self._rows)
        for k in range(1, n + 1):
            row = (after + k) % n
            if self._verdicts.get(self._rows[row][0]) is None:
                return row
        return min(after + 1, n - 1)

    def _on_current_changed(self, row: int, _col: int, _prev_row: int, _prev_col: int) -> None:
        self._update_controls()
        if self.layer is None or not 0 <= row < len(self._rows):
            return
        fid = self.fid_at(row)
        if self.layer.selectedFeatureIds() != [fid]:
            self.layer.selectByIds([fid])
        if self._zoom:
            self.zoom_to(fid)

    def _selected_on_map(self, *_args) -> None:
        """A single feature selected on the map becomes the current row (without moving the map)."""
        ids = self.layer.selectedFeatureIds() if self.layer is not None else []
        row = self._row_of.get(ids[0], -1) if len(ids) == 1 else -1
        if row >= 0 and row != self.current_row:
            self._zoom = False
            try:
                self.select_row(row)
            finally:
                self._zoom = True

    def zoom_to(self, fid: int) -> None:
        """Zoom the map to the feature with some margin around it, and flash it."""
        if self.layer is None or self.iface is None:
            return
        problem = zoom_to_feature(self.iface.mapCanvas(), self.layer, fid)
        if problem:
            self._push(problem, Qgis.MessageLevel.Warning)

    # --- verdicts ------------------------------------------------------------------------------
    def judge(self, verdict: str | None) -> None:
        """Give the selected polygon a verdict, then go on to the next unreviewed one."""
        row = self.current_row
        if self.layer is None or not 0 <= row < len(self._rows):
            self._push("Select a polygon in the list first.", Qgis.MessageLevel.Info)
            return
        fid = self.fid_at(row)
        try:
            set_verdict(self.layer, fid, verdict)
        except ValueError as exc:
            self._push(str(exc), Qgis.MessageLevel.Warning)
            return
        self._verdicts[fid] = verdict
        self._paint_row(row)
        nxt = self._next_unreviewed(row)
        if self._verdicts.get(self.fid_at(nxt)) is None and nxt != row:
            self.select_row(nxt)
        else:
            self._update_controls()

    def _paint_row(self, row: int) -> None:
        verdict = self._verdicts.get(self.fid_at(row))
        colour = _ROW_COLOURS.get(verdict)
        for col in range(self.table.columnCount()):
            item = self.table.item(row, col)
            if item is None:
                continue
            item.setBackground(QBrush(colour) if colour else QBrush())
            item.setForeground(QBrush(_TEXT_COLOUR) if colour else QBrush())
        self.table.item(row, 3).setText({ACCEPTED: "Accepted", REJECTED: "Rejected"}.get(verdict, ""))

    def _update_controls(self) -> None:
        total = len(self._rows)
        has_row = 0 <= self.current_row < total
        self.counter.setText(f"{self.reviewed_count()} of {total} reviewed" if total else "")
        for b in (self.accept_button, self.reject_button):
            b.setEnabled(has_row)
        self.prev_button.setEnabled(has_row and self.current_row > 0)
        self.next_button.setEnabled(total > 0 and (not has_row or self.current_row < total - 1))
        self.export_button.setEnabled(self.reviewed_count() > 0)

    # --- export --------------------------------------------------------------------------------
    def _export_dialog(self) -> None:
        if self.layer is None:
            return
        start = Path(QgsProject.instance().homePath() or Path.home()) / f"{self.layer.name()}_reviewed.gpkg"
        path, _ = QFileDialog.getSaveFileName(
            self, "Export reviewed polygons as labels", str(start), "GeoPackage (*.gpkg)"
        )
        if path:
            self.export_to(Path(path))

    def export_to(self, path: Path) -> QgsVectorLayer | None:
        """Export the verdicts to `path` and add the labels layer to the project; messages, no traceback."""
        if self.layer is None:
            self._push(PICK, Qgis.MessageLevel.Info)
            return None
        try:
            labels, message = export_labels(self.layer, path, self.task)
        except ValueError as exc:
            self._push(str(exc), Qgis.MessageLevel.Warning)
            return None
        self._push(message, Qgis.MessageLevel.Success)
        return labels

    def _push(self, text: str, level) -> None:
        if self.iface is not None:
            self.iface.messageBar().pushMessage("Review", text, level=level, duration=6)
