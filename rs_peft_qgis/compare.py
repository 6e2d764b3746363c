"""Before/after comparison of two raster layers: toggle which one shows, or swipe the top one over the
other with the mouse."""

from __future__ import annotations

import contextlib

from qgis.core import Qgis, QgsMapLayer, QgsMapLayerProxyModel, QgsMapRendererParallelJob, QgsProject, QgsRasterLayer
from qgis.gui import QgsMapCanvas, QgsMapCanvasItem, QgsMapLayerComboBox, QgsMapTool
from qgis.PyQt.QtCore import QPointF, QRectF, Qt, QTimer
from qgis.PyQt.QtGui import QColor, QCursor, QImage, QKeySequence, QPen
from qgis.PyQt.QtWidgets import QFormLayout, QHBoxLayout, QLabel, QPushButton, QShortcut, QVBoxLayout, QWidget


def toggle_visibility(before: QgsMapLayer, after: QgsMapLayer, project: QgsProject | None = None) -> str:
    """Show one of the two layers and hide the other (the after one first); returns the shown layer's name."""
    root = (project or QgsProject.instance()).layerTreeRoot()
    nodes = root.findLayer(before.id()), root.findLayer(after.id())
    if None in nodes:
        raise ValueError("Both layers must be in the project's layer list to switch between them.")
    node_before, node_after = nodes
    show_before = node_after.itemVisibilityChecked() and not node_before.itemVisibilityChecked()
    shown, hidden = (node_before, node_after) if show_before else (node_after, node_before)
    hidden.setItemVisibilityChecked(False)
    shown.setItemVisibilityCheckedParentRecursive(True)  # a layer in a hidden group would stay hidden
    return (before if show_before else after).name()


class SwipeItem(QgsMapCanvasItem):
    """Paints an image of one layer rendered alone, left of a vertical line, over the canvas."""

    def __init__(self, canvas: QgsMapCanvas) -> None:
        super().__init__(canvas)
        self.canvas = canvas
        self.image: QImage | None = None
        self.position = 0
        self.setZValue(100)  # above the map, below nothing the user draws that matters while swiping

    def boundingRect(self) -> QRectF:  # Qt override
        view = self.canvas.viewport()  # the map area, inside the canvas's frame
        return QRectF(0, 0, view.width(), view.height())

    def paint(self, painter, option=None, widget=None) -> None:
        view = self.canvas.viewport()
        height = view.height()
        x = max(0, min(self.position, view.width()))
        if self.image is not None and not self.image.isNull() and x > 0:
            ratio = self.image.devicePixelRatio() or 1.0
            painter.drawImage(QRectF(0, 0, x, height), self.image, QRectF(0, 0, x * ratio, height * ratio))
        pen = QPen(QColor(255, 255, 255, 230))
        pen.setWidth(2)
        painter.setPen(pen)
        painter.drawLine(QPointF(x, 0), QPointF(x, height))


class SwipeMapTool(QgsMapTool):
    """Shows `layer` only left of the mouse, the layers below it on the right. Esc stops swiping."""

    def __init__(self, canvas: QgsMapCanvas, layer: QgsMapLayer) -> None:
        super().__init__(canvas)
        self.canvas = canvas
        self.layer = layer
        self.previous_tool = canvas.mapTool()  # Esc gives the map back to it
        self.item: SwipeItem | None = None
        self.job: QgsMapRendererParallelJob | None = None
        # Jobs no longer wanted: kept alive until their threads end (deleting a running job blocks or crashes).
        self._retired: list[QgsMapRendererParallelJob] = []
        self._position = -1
        self._hidden: tuple[bool, int] | None = None  # (layer tree node was checked, index in canvas layers)
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(40)  # one render for a burst of extent changes (wheel zoom)
        self._timer.timeout.connect(self.render)
        self.setCursor(QCursor(Qt.SplitHCursor))

    # --- position ------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """The swipe line's x position in canvas pixels."""
        return self._position if self._position >= 0 else self.canvas.viewport().width() // 2

    def set_position(self, x: int) -> None:
        """Put the swipe line at `x` pixels from the map's left edge."""
        self._position = max(0, min(int(x), self.canvas.viewport().width()))
        if self.item is not None:
            self.item.position = self._position
            self.item.update()

    # --- life cycle ----------------------------------------------------------------------------
    def activate(self) -> None:
        super().activate()
        self.item = SwipeItem(self.canvas)
        self.item.position = self.position
        self._hide_layer()
        self.canvas.extentsChanged.connect(self._schedule)
        self.canvas.destinationCrsChanged.connect(self._schedule)
        self.layer.repaintRequested.connect(self._schedule)
        self.layer.willBeDeleted.connect(self._layer_gone)
        self.render()

    def deactivate(self) -> None:
        self._timer.stop()
        for signal, slot in (
            (self.canvas.extentsChanged, self._schedule),
            (self.canvas.destinationCrsChanged, self._schedule),
            (self.layer.repaintRequested, self._schedule),
            (self.layer.willBeDeleted, self._layer_gone),
        ):
            with contextlib.suppress(TypeError, RuntimeError):
                signal.disconnect(slot)
        self._cancel_job()
        for job in self._retired:
            job.cancel()  # waits for its threads: nothing runs on after the tool is gone
        self._retired = []
        if self.item is not None:
            self.canvas.scene().removeItem(self.item)
            self.item = None
        self._restore_layer()
        super().deactivate()

    def _layer_gone(self) -> None:
        self._hidden = None  # nothing to restore
        self.canvas.unsetMapTool(self)

    def _hide_layer(self) -> None:
        """Take the layer out of the normal render; remember how to put it back."""
        node = QgsProject.instance().layerTreeRoot().findLayer(self.layer.id())
        layers = self.canvas.layers()
        index = layers.index(self.layer) if self.layer in layers else -1
        self._hidden = (node is not None and node.itemVisibilityChecked(), index)
        if node is not None:
            node.setItemVisibilityChecked(False)
        if index >= 0:
            self.canvas.setLayers([lyr for lyr in self.canvas.layers() if lyr is not self.layer])

    def _restore_layer(self) -> None:
        if self._hidden is None:
            return
        checked, index = self._hidden
        self._hidden = None
        node = QgsProject.instance().layerTreeRoot().findLayer(self.layer.id())
        if node is not None and checked:
            node.setItemVisibilityChecked(True)
        layers = self.canvas.layers()
        if index >= 0 and self.layer not in layers:  # QGIS's layer tree bridge may have done it already
            layers.insert(min(index, len(layers)), self.layer)
            self.canvas.setLayers(layers)

    # --- rendering the layer alone ---------------------------------------------------------------
    def _schedule(self) -> None:
        if self.item is not None:
            self.item.image = None  # stale for the new extent: show the layers below until redrawn
            self.item.update()
        self._timer.start()

    def _cancel_job(self) -> None:
        if self.job is not None:
            with contextlib.suppress(TypeError, RuntimeError):
                self.job.finished.disconnect(self._rendered)
            self.job.cancelWithoutBlocking()
            self._retired.append(self.job)
            self.job = None

    def render(self) -> None:
        """Render the layer alone for the canvas's current view, in the background."""
        if self.item is None:
            return
        self._cancel_job()
        self._retired = [job for job in self._retired if job.isActive()]
        settings = self.canvas.mapSettings()
        settings.setLayers([self.layer])
        settings.setBackgroundColor(QColor(0, 0, 0, 0))
        self.job = QgsMapRendererParallelJob(settings)
        self.job.finished.connect(self._rendered)
        self.job.start()

    @property
    def rendering(self) -> bool:
        return self.job is not None

    def _rendered(self) -> None:
        job, self.job = self.job, None
        if job is None or self.item is None:
            return
        self._retired.append(job)  # not deleted inside its own signal
        self.item.image = job.renderedImage()
        self.item.update()

    # --- events ---------------------------------------------------------------------------------
    def canvasMoveEvent(self, event) -> None:  # QgsMapTool overrides
        self.set_position(event.originalPixelPoint().x())

    def canvasPressEvent(self, event) -> None:
        self.set_position(event.originalPixelPoint().x())

    def keyPressEvent(self, event) -> None:
        if event.key() == Qt.Key_Escape:
            event.accept()
            self.stop()
        else:
            event.ignore()

    def stop(self) -> None:
        """Stop swiping and give the map back to the tool used before."""
        previous = self.previous_tool
        if previous is not None and previous is not self:
            with contextlib.suppress(RuntimeError):  # the previous tool may have been deleted meanwhile
                self.canvas.setMapTool(previous)
                return
        self.canvas.unsetMapTool(self)


def _raster_filter():
    # Qgis.LayerFilter from 3.34 on; the proxy-model enum before (and gone in QGIS 4).
    return Qgis.LayerFilter.RasterLayer if hasattr(Qgis, "LayerFilter") else QgsMapLayerProxyModel.RasterLayer


class CompareWidget(QWidget):
    """Pick the before and after rasters; Toggle (T) shows one or the other, Swipe slides the after one."""

    def __init__(self, iface, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.iface = iface
        self.tool: SwipeMapTool | None = None
        self.before_combo = QgsMapLayerComboBox(self)
        self.after_combo = QgsMapLayerComboBox(self)
        for combo in (self.before_combo, self.after_combo):
            combo.setFilters(_raster_filter())
            combo.setAllowEmptyLayer(True)
            combo.layerChanged.connect(self._layers_changed)
        self.toggle_button = QPushButton("Toggle")
        self.toggle_button.setToolTip("Show the before or the after layer (T)")
        self.toggle_button.clicked.connect(self.toggle)
        self.swipe_button = QPushButton("Swipe")
        self.swipe_button.setCheckable(True)
        self.swipe_button.setToolTip(
            "Move the mouse over the map: the after layer shows left of the line, the before layer right of it. "
            "Esc stops."
        )
        self.swipe_button.toggled.connect(self._swipe_toggled)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        shortcut = QShortcut(QKeySequence("T"), self)
        shortcut.setContext(Qt.WidgetWithChildrenShortcut)
        shortcut.activated.connect(self.toggle)
        self.shortcut = shortcut

        form = self.form = QFormLayout()
        form.addRow("Before", self.before_combo)
        form.addRow("After", self.after_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.toggle_button)
        buttons.addWidget(self.swipe_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        self._layers_changed()

    def set_layers(
        self, before: QgsRasterLayer | None, after: QgsRasterLayer | None, names: tuple[str, str] = ("Before", "After")
    ) -> None:
        """Compare `before` with `after`; `names` label the two pickers (e.g. "Image" and "Result")."""
        for combo, name in zip((self.before_combo, self.after_combo), names, strict=True):
            label = self.form.labelForField(combo)
            if label is not None:
                label.setText(name)
        first, second = (n.lower() for n in names)
        self.toggle_button.setToolTip(f"Show the {first} or the {second} layer (T)")
        self.swipe_button.setToolTip(
            f"Move the mouse over the map: the {second} layer shows left of the line, the {first} layer right of it. "
            "Esc stops."
        )
        self.before_combo.setLayer(before)
        self.after_combo.setLayer(after)

    def _pair(self) -> tuple[QgsMapLayer | None, QgsMapLayer | None]:
        return self.before_combo.currentLayer(), self.after_combo.currentLayer()

    def _layers_changed(self, *_args) -> None:
        before, after = self._pair()
        ok = before is not None and after is not None and before is not after
        self.toggle_button.setEnabled(ok)
        self.swipe_button.setEnabled(ok or self.swipe_button.isChecked())
        if self.tool is not None and after is not self.tool.layer:
            self.stop_swipe()  # swiping a layer the user no longer compares would mislead
        if before is not None and before is after:
            self.status.setText("Pick two different layers to compare.")
        elif not ok:
            self.status.setText("Pick the before and after layers to compare.")
        else:
            self.status.setText("")

    def toggle(self) -> None:
        before, after = self._pair()
        if before is None or after is None or before is after:
            self.status.setText("Pick two different layers to compare.")
            return
        try:
            shown = toggle_visibility(before, after)
        except ValueError as exc:
            self.status.setText(str(exc))
            return
        self.status.setText(f"Showing: {shown}")

    # --- swipe ------------------------------------------------------------------------------------
    def _swipe_toggled(self, on: bool) -> None:
        if not on:
            self.stop_swipe()
            return
        before, after = self._pair()
        if after is None or before is None or before is after:
            self.status.setText("Pick two different layers to compare.")
            self._set_checked(False)
            return
        canvas = self.iface.mapCanvas()
        self.tool = SwipeMapTool(canvas, after)
        self.tool.deactivated.connect(self._tool_deactivated)
        canvas.setMapTool(self.tool)
        self.status.setText(f"Swiping '{after.name()}' over '{before.name()}': move the mouse over the map; Esc stops.")

    def _tool_deactivated(self) -> None:
        # Another map tool was chosen, or Esc: the button follows.
        self.tool = None
        self._set_checked(False)
        self.status.setText("")

    def _set_checked(self, on: bool) -> None:
        self.swipe_button.blockSignals(True)
        self.swipe_button.setChecked(on)
        self.swipe_button.blockSignals(False)
        self._layers_changed()

    def stop_swipe(self) -> None:
        """End swiping (also call this when the panel closes): restores the layer and the previous map tool."""
        tool, self.tool = self.tool, None
        if tool is not None:
            with contextlib.suppress(TypeError, RuntimeError):
                tool.deactivated.disconnect(self._tool_deactivated)
            if self.iface.mapCanvas().mapTool() is tool:
                tool.stop()
        self._set_checked(False)
