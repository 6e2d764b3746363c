"""Change inspection: step through result polygons biggest first, accept or reject each (kept as an
attribute of the layer's own file), and export the verdicts as labels for the next fine-tune."""

from __future__ import annotations

import contextlib
from pathlib import Path

from qgis.core import (
    Qgis,
    QgsCoordinateTransform,
    QgsCsException,
    QgsDistanceArea,
    QgsFeature,
    QgsFeatureRequest,
    QgsField,
    QgsProject,
    QgsRectangle,
    QgsVectorDataProvider,
    QgsVectorLayer,
)
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

from rs_peft_qgis.annotation import apply_label_style
from rs_peft_qgis.layers import export_vector

VERDICT_FIELD = "verdict"
ACCEPTED = "accepted"
REJECTED = "rejected"
LABEL_FIELD = "change"  # the exported labels: 1 = accepted change, 0 = rejected (no change)
NOT_REVIEWED = "No change has been reviewed yet. Accept or reject some changes first, then export them as labels."

_ROW_COLOURS = {ACCEPTED: QColor(198, 239, 206), REJECTED: QColor(255, 199, 206)}
_TEXT_COLOUR = QColor(0, 0, 0)


def _string_field(name: str) -> QgsField:
    if Qgis.QGIS_VERSION_INT >= 33800:  # QMetaType field types from 3.38 on (QVariant ones are gone in Qt6)
        from qgis.PyQt.QtCore import QMetaType

        return QgsField(name, QMetaType.Type.QString, "string", 16)
    from qgis.PyQt.QtCore import QVariant

    return QgsField(name, QVariant.String, "string", 16)


def _number(value: object) -> float | None:
    """A float from an attribute value; None for NULL or text."""
    if value is None or (hasattr(value, "isNull") and value.isNull()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _measurer(layer: QgsVectorLayer) -> QgsDistanceArea:
    """Areas in square metres whatever the layer's CRS (ellipsoidal for geographic coordinates)."""
    da = QgsDistanceArea()
    da.setSourceCrs(layer.crs(), QgsProject.instance().transformContext())
    da.setEllipsoid(QgsProject.instance().ellipsoid() or "EPSG:7030")
    return da


def _area_m2(da: QgsDistanceArea, geometry) -> float:
    if geometry is None or geometry.isEmpty():
        return 0.0
    area = da.measureArea(geometry)
    return float(da.convertAreaMeasurement(area, Qgis.AreaUnit.SquareMeters))


def change_rows(layer: QgsVectorLayer) -> list[tuple[int, float, float | None, str | None]]:
    """(fid, area m², confidence or None, verdict or None) of every feature, biggest area first, then the
    most confident; the area comes from `area_m2` when the layer has it, else from the geometry."""
    fields = layer.fields()
    has_area = fields.indexOf("area_m2") >= 0
    has_conf = fields.indexOf("confidence") >= 0
    has_verdict = fields.indexOf(VERDICT_FIELD) >= 0
    request = QgsFeatureRequest()
    wanted = [n for n, ok in (("area_m2", has_area), ("confidence", has_conf), (VERDICT_FIELD, has_verdict)) if ok]
    request.setSubsetOfAttributes(wanted, fields)
    da = _measurer(layer)
    rows = []
    for feat in layer.getFeatures(request):
        area = _number(feat["area_m2"]) if has_area else None
        if area is None:
            area = _area_m2(da, feat.geometry())
        conf = _number(feat["confidence"]) if has_conf else None
        verdict = feat[VERDICT_FIELD] if has_verdict else None
        rows.append((feat.id(), area, conf, verdict if verdict in (ACCEPTED, REJECTED) else None))
    rows.sort(key=lambda r: (-r[1], -(r[2] if r[2] is not None else -1.0), r[0]))
    return rows


def ordered_changes(layer: QgsVectorLayer) -> list[int]:
    """Feature ids sorted by area (m²) descending, then confidence descending."""
    return [row[0] for row in change_rows(layer)]


def _ensure_verdict_field(layer: QgsVectorLayer) -> int:
    idx = layer.fields().indexOf(VERDICT_FIELD)
    if idx >= 0:
        return idx
    provider = layer.dataProvider()
    buffer = layer.editBuffer() if layer.isEditable() else None
    if buffer is not None and buffer.addedAttributes():
        # Fields added in the edit buffer sit after the file's fields: add ours there too, so their indexes hold.
        if not layer.addAttribute(_string_field(VERDICT_FIELD)):
            raise ValueError(f"A '{VERDICT_FIELD}' field cannot be added to the layer '{layer.name()}'.")
    else:
        if provider is None or not provider.capabilities() & QgsVectorDataProvider.AddAttributes:
            raise ValueError(
                f"The layer '{layer.name()}' is read-only, so verdicts cannot be kept in it. "
                "Save it as a GeoPackage (Export > Save Features As…) and review that copy."
            )
        if not provider.addAttributes([_string_field(VERDICT_FIELD)]):
            raise ValueError(f"A '{VERDICT_FIELD}' field cannot be added to the layer '{layer.name()}'.")
        layer.updateFields()
    idx = layer.fields().indexOf(VERDICT_FIELD)
    if idx < 0:
        raise ValueError(f"A '{VERDICT_FIELD}' field cannot be added to the layer '{layer.name()}'.")
    return idx


def set_verdict(layer: QgsVectorLayer, fid: int, verdict: str | None) -> None:
    """Keep 'accepted' / 'rejected' (None: not reviewed) in the feature's `verdict` attribute: written to
    the file at once, or into the edit buffer when the layer is being edited."""
    if verdict not in (ACCEPTED, REJECTED, None):
        raise ValueError(f"A verdict is '{ACCEPTED}', '{REJECTED}' or empty, not {verdict!r}.")
    idx = _ensure_verdict_field(layer)
    if layer.isEditable():
        if not layer.changeAttributeValue(fid, idx, verdict):
            raise ValueError(f"The verdict of feature {fid} of '{layer.name()}' could not be changed.")
    else:
        provider = layer.dataProvider()
        if not provider.capabilities() & QgsVectorDataProvider.ChangeAttributeValues:
            raise ValueError(f"The layer '{layer.name()}' is read-only, so verdicts cannot be kept in it.")
        if not provider.changeAttributeValues({fid: {idx: verdict}}):
            raise ValueError(f"The verdict of feature {fid} of '{layer.name()}' could not be saved.")
    layer.triggerRepaint()


def export_verdicts(layer: QgsVectorLayer, path: Path, crs=None) -> tuple[int, int]:
    """Write the reviewed polygons to a GeoPackage with `change` = 1 (accepted) / 0 (rejected): labels
    for change.finetune with label_field="change". Returns (accepted, rejected)."""
    if layer.fields().indexOf(VERDICT_FIELD) < 0:
        raise ValueError(NOT_REVIEWED)
    crs_text = layer.crs().authid()
    out = QgsVectorLayer(
        f"MultiPolygon?field={LABEL_FIELD}:integer&field={VERDICT_FIELD}:string(16)", "reviewed labels", "memory"
    )
    out.setCrs(layer.crs())
    counts = {ACCEPTED: 0, REJECTED: 0}
    feats = []
    request = QgsFeatureRequest().setSubsetOfAttributes([VERDICT_FIELD], layer.fields())
    for feat in layer.getFeatures(request):
        verdict = feat[VERDICT_FIELD]
        if verdict not in counts or not feat.hasGeometry():
            continue
        geom = feat.geometry()
        geom.convertToMultiType()
        f = QgsFeature(out.fields())
        f.setGeometry(geom)
        f.setAttributes([1 if verdict == ACCEPTED else 0, verdict])
        feats.append(f)
        counts[verdict] += 1
    if not feats:
        raise ValueError(NOT_REVIEWED)
    if not out.dataProvider().addFeatures(feats)[0]:
        raise ValueError(f"The reviewed polygons of '{layer.name()}' ({crs_text}) could not be copied.")
    path = Path(path)
    if path.suffix.lower() != ".gpkg":
        path = path.with_suffix(".gpkg")
    path.parent.mkdir(parents=True, exist_ok=True)
    export_vector(out, path, crs=crs)
    return counts[ACCEPTED], counts[REJECTED]


def readable_area(m2: float) -> str:
    """123 m², 45.6 m² or 1.23 ha: what an analyst reads at a glance."""
    if m2 >= 10_000:
        return f"{m2 / 10_000:,.2f} ha"
    if m2 >= 100:
        return f"{m2:,.0f} m²"
    return f"{m2:.1f} m²"


class ChangeInspector(QWidget):
    """A list of a layer's polygons, biggest first: select to zoom, Accept (A) / Reject (R), export labels."""

    COLUMNS = ("#", "Area", "Confidence", "Verdict")

    def __init__(self, iface, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.iface = iface
        self.layer: QgsVectorLayer | None = None
        self._rows: list[tuple[int, float, float | None, str | None]] = []
        self._verdicts: dict[int, str | None] = {}
        self._row_of: dict[int, int] = {}
        self._zoom = True  # off while following a selection made on the map

        self.title = QLabel("Pick a layer of change polygons to review.")
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
        self.accept_button.setToolTip("This is a real change (A)")
        self.reject_button.setToolTip("This is not a change (R)")
        self.prev_button.setToolTip("Go to the previous change in the list")
        self.next_button.setToolTip("Go to the next change in the list")
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
        self.export_button.setToolTip(
            "Save the accepted (change = 1) and rejected (change = 0) polygons as labels for the next fine-tune"
        )
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
    def set_layer(self, layer: QgsVectorLayer | None) -> None:
        """Review `layer` (any vector layer with geometries); None clears the list."""
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
            self.title.setText("Pick a layer of change polygons to review.")
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
                f"{len(self._rows)} polygons of '{self.layer.name()}', biggest first. "
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
        feat = self.layer.getFeature(fid)
        if not feat.isValid() or not feat.hasGeometry():
            self._push("This feature no longer exists in the layer.", Qgis.MessageLevel.Warning)
            return
        canvas = self.iface.mapCanvas()
        transform = QgsCoordinateTransform(
            self.layer.crs(), canvas.mapSettings().destinationCrs(), QgsProject.instance()
        )
        try:
            rect = transform.transformBoundingBox(feat.geometry().boundingBox())
        except QgsCsException:  # the feature lies outside the map CRS's valid area
            self._push("This feature cannot be shown in the map's coordinate system.", Qgis.MessageLevel.Warning)
            return
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
        canvas.flashFeatureIds(self.layer, [fid])

    # --- verdicts ------------------------------------------------------------------------------
    def judge(self, verdict: str | None) -> None:
        """Give the selected change a verdict, then go on to the next unreviewed one."""
        row = self.current_row
        if self.layer is None or not 0 <= row < len(self._rows):
            self._push("Select a change in the list first.", Qgis.MessageLevel.Info)
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
            self, "Export reviewed changes as labels", str(start), "GeoPackage (*.gpkg)"
        )
        if path:
            self.export_to(Path(path))

    def export_to(self, path: Path) -> QgsVectorLayer | None:
        """Export the verdicts to `path` and add the labels layer to the project; messages, no traceback."""
        if self.layer is None:
            self._push("Pick a layer of change polygons to review first.", Qgis.MessageLevel.Info)
            return None
        path = Path(path)
        if path.suffix.lower() != ".gpkg":
            path = path.with_suffix(".gpkg")
        try:
            accepted, rejected = export_verdicts(self.layer, path)
        except ValueError as exc:
            self._push(str(exc), Qgis.MessageLevel.Warning)
            return None
        labels = QgsVectorLayer(str(path), f"{self.layer.name()} – reviewed labels", "ogr")
        if not labels.isValid():
            self._push(f"The labels were written to {path} but cannot be opened.", Qgis.MessageLevel.Warning)
            return None
        apply_label_style(labels, "change")
        QgsProject.instance().addMapLayer(labels)
        self._push(
            f"Exported {accepted} accepted and {rejected} rejected changes to {path.name}. "
            f"Use it as labels (field '{LABEL_FIELD}') for the next fine-tune.",
            Qgis.MessageLevel.Success,
        )
        return labels

    def _push(self, text: str, level) -> None:
        if self.iface is not None:
            self.iface.messageBar().pushMessage("Change review", text, level=level, duration=6)
