"""Before/after comparison on a real map canvas with real LEVIR-CD rasters: toggle, and a swipe whose
pixels are checked against renders of each layer alone."""

from __future__ import annotations

import pytest
from conftest import levir
from pytest_qgis.utils import wait_until
from qgis.core import QgsMapRendererSequentialJob, QgsRasterLayer, QgsRectangle
from qgis.gui import QgsMapMouseEvent, QgsMapToolPan
from qgis.PyQt.QtCore import QEvent, QPoint, QSize, Qt
from qgis.PyQt.QtGui import QImage, QKeyEvent
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QFrame

from rs_peft_qgis.compare import CompareWidget, SwipeMapTool, toggle_visibility

W, H = 400, 300


@pytest.fixture
def rasters(qgis_new_project):
    """(before, after) of a real pair in the project, the after one on top."""
    before_path, after_path, _ = levir("test_2_0000_0512")
    before = QgsRasterLayer(str(before_path), "before", "gdal")
    after = QgsRasterLayer(str(after_path), "after", "gdal")
    assert before.isValid() and after.isValid()
    qgis_new_project.addMapLayers([before, after])
    yield before, after
    qgis_new_project.removeAllMapLayers()


@pytest.fixture
def canvas(qgis_canvas, rasters):
    """The test canvas at 400x300 px on a view inside the rasters (so every pixel is imagery)."""
    before, after = rasters
    old_size = qgis_canvas.size()
    window = qgis_canvas.window()
    # A hidden canvas keeps its old map size: show it (offscreen) so the resize reaches the map settings.
    window.resize(QSize(W + 100, H + 100))
    window.show()
    assert QTest.qWaitForWindowExposed(window)
    qgis_canvas.resize(QSize(W, H))
    qgis_canvas.setFrameStyle(QFrame.NoFrame)  # as in QGIS's main window: the map fills the canvas
    wait_until(lambda: qgis_canvas.viewport().size() == QSize(W, H), timeout_milliseconds=5_000)
    qgis_canvas.setDestinationCrs(after.crs())
    qgis_canvas.setLayers([after, before])
    full = after.extent()
    height = full.width() * H / W
    cy = full.center().y()
    qgis_canvas.setExtent(QgsRectangle(full.xMinimum(), cy - height / 2, full.xMaximum(), cy + height / 2))
    _render(qgis_canvas)
    yield qgis_canvas
    qgis_canvas.unsetMapTool(qgis_canvas.mapTool())
    qgis_canvas.setLayers([])
    qgis_canvas.resize(old_size)
    window.hide()


def _render(canvas) -> None:
    """Refresh the canvas and wait until its new image is shown."""
    done = []
    canvas.mapCanvasRefreshed.connect(lambda: done.append(True))
    canvas.refresh()
    wait_until(lambda: done and not canvas.isDrawing(), timeout_milliseconds=20_000)


def _alone(canvas, layer) -> QImage:
    """The canvas's current view with only `layer` drawn."""
    settings = canvas.mapSettings()
    settings.setLayers([layer])
    job = QgsMapRendererSequentialJob(settings)
    job.start()
    job.waitForFinished()
    return job.renderedImage().convertToFormat(QImage.Format_RGB32)


def _grab(canvas) -> QImage:
    """What the canvas shows on screen: the map image and the items drawn over it."""
    return canvas.viewport().grab().toImage().convertToFormat(QImage.Format_RGB32)


def _diff(a: QImage, b: QImage, x0: int, x1: int) -> float:
    """Mean absolute difference of the RGB values of two images between columns x0 and x1."""
    assert (a.width(), a.height()) == (b.width(), b.height()) == (W, H)
    total = 0
    for y in range(0, H, 2):
        ra = a.constScanLine(y).asstring(W * 4)[x0 * 4 : x1 * 4]
        rb = b.constScanLine(y).asstring(W * 4)[x0 * 4 : x1 * 4]
        # BGRA bytes: skip alpha
        total += sum(abs(p - q) for i, (p, q) in enumerate(zip(ra, rb, strict=True)) if i % 4 != 3)
    return total / ((H // 2) * (x1 - x0) * 3)


def test_toggle_shows_one_layer_at_a_time(rasters, qgis_new_project) -> None:
    before, after = rasters
    root = qgis_new_project.layerTreeRoot()
    visible = lambda layer: root.findLayer(layer.id()).itemVisibilityChecked()  # noqa: E731
    assert visible(before) and visible(after)
    assert toggle_visibility(before, after) == "after"
    assert visible(after) and not visible(before)
    assert toggle_visibility(before, after) == "before"
    assert visible(before) and not visible(after)
    assert toggle_visibility(before, after) == "after"

    # A layer inside a hidden group is shown with its group.
    group = root.addGroup("dates")
    node = root.findLayer(before.id())
    group.addChildNode(node.clone())
    root.removeChildNode(node)
    group.setItemVisibilityChecked(False)
    assert toggle_visibility(before, after) == "before"
    assert group.itemVisibilityChecked() and root.findLayer(before.id()).isVisible()

    loose = QgsRasterLayer(str(levir("test_55_0256_0000")[0]), "not in project", "gdal")
    with pytest.raises(ValueError, match="must be in the project"):
        toggle_visibility(loose, after)


def test_swipe_shows_after_left_and_before_right(canvas, rasters, qgis_new_project) -> None:
    before, after = rasters
    only_after, only_before = _alone(canvas, after), _alone(canvas, before)
    # The two dates differ enough for the check to mean something.
    assert _diff(only_after, only_before, 0, W) > 10

    pan = QgsMapToolPan(canvas)
    canvas.setMapTool(pan)
    tool = SwipeMapTool(canvas, after)
    canvas.setMapTool(tool)
    tool.set_position(W // 2)
    assert tool.position == W // 2
    assert after not in canvas.layers()  # the normal render shows what lies below
    assert not qgis_new_project.layerTreeRoot().findLayer(after.id()).itemVisibilityChecked()
    _render(canvas)
    wait_until(lambda: not tool.rendering and tool.item.image is not None, timeout_milliseconds=20_000)

    shot = _grab(canvas)
    left, right = (0, W // 2 - 4), (W // 2 + 4, W)  # leave out the swipe line
    assert _diff(shot, only_after, *left) < 3
    assert _diff(shot, only_before, *right) < 3
    assert _diff(shot, only_before, *left) > 10 and _diff(shot, only_after, *right) > 10

    # The mouse moves the line.
    tool.canvasMoveEvent(QgsMapMouseEvent(canvas, QEvent.MouseMove, QPoint(100, 50)))
    assert tool.position == 100
    shot = _grab(canvas)
    assert _diff(shot, only_after, 0, 96) < 3 and _diff(shot, only_before, 104, W) < 3

    # A zoom re-renders the layer for the new view.
    canvas.zoomByFactor(0.5)
    _render(canvas)
    wait_until(lambda: not tool.rendering and tool.item.image is not None, timeout_milliseconds=20_000)
    zoomed_after, zoomed_before = _alone(canvas, after), _alone(canvas, before)
    shot = _grab(canvas)
    assert _diff(shot, zoomed_after, 0, 96) < 3 and _diff(shot, zoomed_before, 104, W) < 3

    # Esc ends swiping: the layer is back where it was and the pan tool is active again.
    tool.keyPressEvent(QKeyEvent(QEvent.KeyPress, Qt.Key_Escape, Qt.NoModifier))
    assert canvas.mapTool() is pan
    assert canvas.layers() == [after, before]
    assert qgis_new_project.layerTreeRoot().findLayer(after.id()).itemVisibilityChecked()
    _render(canvas)
    assert _diff(_grab(canvas), zoomed_after, 0, W) < 3  # the after layer covers the whole map again


def test_compare_widget_drives_toggle_and_swipe(canvas, rasters, qgis_iface) -> None:
    before, after = rasters
    assert qgis_iface.mapCanvas() is canvas
    widget = CompareWidget(qgis_iface)
    widget.set_layers(None, None)
    assert not widget.toggle_button.isEnabled() and not widget.swipe_button.isEnabled()
    widget.set_layers(after, after)
    assert "two different layers" in widget.status.text()
    widget.set_layers(before, after)
    assert widget.before_combo.currentLayer() is before and widget.after_combo.currentLayer() is after
    assert widget.toggle_button.isEnabled()

    widget.toggle_button.click()
    assert widget.status.text() == "Showing: after"
    widget.toggle_button.click()
    assert widget.status.text() == "Showing: before"
    widget.toggle_button.click()

    widget.swipe_button.click()
    assert widget.swipe_button.isChecked()
    tool = canvas.mapTool()
    assert isinstance(tool, SwipeMapTool) and tool.layer is after
    assert after not in canvas.layers()
    widget.swipe_button.click()  # off again
    assert not isinstance(canvas.mapTool(), SwipeMapTool)
    assert after in canvas.layers()

    # Choosing another map tool (or Esc) releases the button.
    widget.swipe_button.click()
    canvas.setMapTool(QgsMapToolPan(canvas))
    assert not widget.swipe_button.isChecked() and widget.tool is None
    assert canvas.layers() == [after, before]
    widget.stop_swipe()
