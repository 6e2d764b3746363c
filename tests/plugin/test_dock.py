"""The RS PEFT panel and the plugin wiring in a real headless QGIS, driving the real backend worker on
real GeoTIFFs (LEVIR-CD crops): forms from the catalog, jobs, cancel, a killed worker, AOI, fine-tune."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAST_FINETUNE, JOB_TIMEOUT_MS, ROOT, levir
from pytest_qgis.utils import wait_until
from qgis.core import (
    Qgis,
    QgsApplication,
    QgsFeature,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsDoubleSpinBox, QgsFieldComboBox, QgsFileWidget, QgsSpinBox
from qgis.PyQt import sip
from qgis.PyQt.QtWidgets import QCheckBox, QComboBox, QDockWidget, QLabel, QLineEdit

from rs_peft_qgis import catalog
from rs_peft_qgis.forms.adapter_picker import AdapterPicker
from rs_peft_qgis.forms.widgets import AoiChooser, LayerPicker, raster_hint
from rs_peft_qgis.session import SESSION


def add_raster(path: Path, name: str | None = None) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), name or path.stem, "gdal")
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    return layer


def pair(name: str = "test_2_0000_0512") -> tuple[QgsRasterLayer, QgsRasterLayer]:
    before, after, _ = levir(name)
    return add_raster(before, "before"), add_raster(after, "after")


def part_of(extent: QgsRectangle, x0: float, y0: float, x1: float, y1: float) -> QgsRectangle:
    """The rectangle between fractions (x0, y0) and (x1, y1) of `extent`, from its lower left corner."""
    w, h = extent.width(), extent.height()
    left, bottom = extent.xMinimum(), extent.yMinimum()
    return QgsRectangle(left + x0 * w, bottom + y0 * h, left + x1 * w, bottom + y1 * h)


def wait_done(dock, timeout: int = JOB_TIMEOUT_MS) -> None:
    wait_until(lambda: dock.runner.current_task is None, timeout_milliseconds=timeout)


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def result_groups() -> list[str]:
    return [g.name() for g in QgsProject.instance().layerTreeRoot().findGroups()]


def close(a: QgsRectangle, b: QgsRectangle, tol: float) -> bool:
    return all(
        abs(x - y) <= tol
        for x, y in zip(
            (a.xMinimum(), a.yMinimum(), a.xMaximum(), a.yMaximum()),
            (b.xMinimum(), b.yMinimum(), b.xMaximum(), b.yMaximum()),
            strict=True,
        )
    )


# --- the plugin --------------------------------------------------------------------------------------


def test_plugin_loads_its_panel_and_actions_and_unloads_cleanly(qgis_iface, qgis_new_project) -> None:
    from rs_peft_qgis import classFactory

    plugin = classFactory(qgis_iface)
    plugin.initGui()
    try:
        names = {a.objectName(): a.text() for a in plugin.actions}
        assert names == {
            "rsPeftPanel": "RS PEFT panel",
            "rsPeftSettings": "Settings…",
            "rsPeftDiagnostics": "Backend diagnostics…",
            "rsPeftInstaller": "Install backend…",
        }
        panel = plugin.panel_action
        assert panel.isCheckable() and not panel.icon().isNull()
        dock = plugin.dock
        assert dock.objectName() == "RsPeftDock" and dock.windowTitle() == "RS PEFT"
        assert qgis_iface.mainWindow().findChildren(QDockWidget, "RsPeftDock") == [dock]
        # The toolbar button toggles the panel, and the button follows the panel.
        qgis_iface.mainWindow().show()  # (visibility needs a shown window, even offscreen)
        panel.setChecked(False)
        assert not dock.isUserVisible()
        panel.setChecked(True)
        assert dock.isUserVisible()
        dock.setUserVisible(False)
        assert not panel.isChecked()
        registry = QgsApplication.processingRegistry()
        assert registry.providerById("rs_peft") is plugin.provider is not None
        assert {a.id() for a in plugin.provider.algorithms()}  # an algorithm per job
        plugin.initProcessing()  # QGIS calls it too: still one provider
        assert [p for p in registry.providers() if p.id() == "rs_peft"] == [plugin.provider]
        client = SESSION.client()  # the worker a job would have started
        assert client.alive
    finally:
        if plugin.dock is not None and plugin.dock.library.task is not None:  # shown: it reads the library
            wait_until(lambda: plugin.dock.library.task is None, timeout_milliseconds=JOB_TIMEOUT_MS)
        plugin.unload()
        qgis_iface.mainWindow().hide()
    assert plugin.actions == [] and plugin.dock is None and plugin.provider is None
    assert qgis_iface.mainWindow().findChildren(QDockWidget, "RsPeftDock") == []
    assert registry.providerById("rs_peft") is None
    assert SESSION.running is None and not client.alive  # the worker was shut down


# --- forms ---------------------------------------------------------------------------------------------


def test_every_catalog_job_gets_a_form_with_the_right_widget_per_kind(dock) -> None:
    expected = {
        "raster": LayerPicker,
        "vector": LayerPicker,
        "polygons": LayerPicker,
        "layer": LayerPicker,
        "field": QgsFieldComboBox,
        "adapter": AdapterPicker,
        "folder": QgsFileWidget,
        "bands": QLineEdit,
        "ints": QLineEdit,
        "string": QLineEdit,
        "int": QgsSpinBox,
        "float": QgsDoubleSpinBox,
        "bool": QCheckBox,
    }
    jobs = catalog.load().jobs
    assert jobs
    for name, job in jobs.items():
        dock.run_tab.set_job(name)
        form = dock.run_tab.form
        assert form.job is job and dock.run_tab.job_combo.currentText() == job.title
        assert dock.run_tab.task_combo.currentData() == job.task
        for p in job.params:
            widget = form.widgets[p.name]
            assert widget.toolTip() == p.help, p.name
            if p.name == "aoi":
                assert isinstance(widget, AoiChooser)
                assert form.value("aoi") is None  # whole layer by default
            elif p.choices or p.name == "device":
                assert isinstance(widget, QComboBox), p.name
                assert form.value(p.name) == (p.default if p.name != "device" else "auto")
                assert widget.isEditable() == p.editable, p.name  # the device: "cuda:1" can be typed
                unset = [None] if not (p.editable or p.required or p.default is not None) else []  # "(not set)"
                assert [widget.itemData(i) for i in range(widget.count())] == unset + list(p.choices), p.name
            else:
                assert isinstance(widget, expected[p.kind]), (name, p.name, type(widget))
            in_advanced = form.advanced.isAncestorOf(widget)
            on_main = p.required or p.is_layer or p.kind == "field" or p.name == "aoi" or p.prominent
            assert in_advanced == (not on_main), (name, p.name)
            if p.kind in ("int", "float") and not p.choices:
                assert form.value(p.name) == p.default, (name, p.name)
                if p.default is None:
                    assert widget.specialValueText() == "auto"
                # The catalog's range and step ("auto" sits one step below the minimum).
                step = p.step or (1 if p.kind == "int" else 0.1)
                assert widget.singleStep() == pytest.approx(step), (name, p.name)
                if p.maximum is not None:
                    assert widget.maximum() == pytest.approx(max(p.maximum, p.default or p.maximum)), (name, p.name)
                if p.minimum is not None:
                    low = p.minimum - step if p.default is None else min(p.minimum, p.default)
                    assert widget.minimum() == pytest.approx(low), (name, p.name)
            if p.kind == "adapter":
                assert widget.method == (job.method or ""), (name, p.name)
            if p.kind == "bool":
                assert form.value(p.name) is bool(p.default)
            if p.kind == "folder":
                assert widget.storageMode() == QgsFileWidget.StorageMode.GetDirectory and form.value(p.name)
            if p.kind == "bands":
                assert widget.placeholderText() == "all" and form.value(p.name) is None
        assert form.advanced.isCollapsed() or not form.advanced.isVisibleTo(form)
        if job.param("name") is not None:
            assert form.value("name") == name.split(".")[1]  # outputs named after the job's verb
    # Required parameters come first in the main section.
    form = dock.run_tab.forms["change.cva"]
    assert list(form.widgets)[:3] == ["before", "after", "out_dir"]


def test_layer_pickers_filter_by_type_and_show_a_band_hint(dock) -> None:
    before, after = pair()
    polygons = QgsVectorLayer("Polygon?crs=EPSG:4326", "area", "memory")
    QgsProject.instance().addMapLayer(polygons)
    dock.run_tab.set_job("change.finetune")
    form = dock.run_tab.form
    before_combo = form.widgets["before"].combo
    raster_choices = {before_combo.layer(i) for i in range(before_combo.count())}
    assert raster_choices == {before, after}  # rasters only
    aoi = form.widgets["aoi"]
    assert {aoi.layer_combo.layer(i) for i in range(aoi.layer_combo.count())} == {polygons}
    labels_combo = form.widgets["labels"].combo
    assert {labels_combo.layer(i) for i in range(labels_combo.count())} == {None, before, after, polygons}
    # Required rasters start on different layers; labels must be chosen on purpose.
    assert {form.value("before"), form.value("after")} == {before, after}
    assert form.value("labels") is None
    form.set_value("before", after)
    assert form.value("before") is after
    hint = form.widgets["before"].hint.text()
    assert hint == raster_hint(after) and hint.startswith("3 bands · ") and hint.endswith("· EPSG:4326")
    # The label field follows the labels layer: disabled for a raster, the fields of a vector layer.
    form.set_value("labels", before)
    assert not form.widgets["label_field"].isEnabled()
    form.set_value("labels", polygons)
    assert form.widgets["label_field"].isEnabled() and form.widgets["label_field"].layer() is polygons
    # Rasters chosen in one job stay chosen in the next one of the task.
    dock.run_tab.set_job("change.cva")
    assert dock.run_tab.form.value("before") is after


# --- jobs ----------------------------------------------------------------------------------------------


def test_missing_required_layer_gives_a_message_and_starts_nothing(dock, tmp_path) -> None:
    dock.run_tab.set_job("change.cva")
    dock.run_tab.form.set_value("out_dir", str(tmp_path))
    active = len(QgsApplication.taskManager().tasks())
    dock.run_tab.run_button.click()  # what the analyst does
    assert dock.runner.current_task is None
    assert "Before" in dock.run_tab.message.text()
    assert dock.runner.run() is None
    assert dock.runner.current_task is None
    assert not dock.run_tab.message.isHidden()
    assert "Before" in dock.run_tab.message.text() and "After" in dock.run_tab.message.text()
    assert len(QgsApplication.taskManager().tasks()) == active
    assert dock.run_tab.run_button.isEnabled()
    assert files_in(tmp_path) == []


def test_bad_values_give_plain_messages_not_tracebacks(dock, qgis_iface, tmp_path) -> None:
    before, after = pair()
    dock.run_tab.set_job("change.cva")
    form = dock.run_tab.form
    form.set_value("before", before)
    form.set_value("after", after)
    form.set_value("out_dir", str(tmp_path))
    form.set_value("bands", "red,green")
    assert dock.runner.run() is None and "whole numbers" in dock.run_tab.message.text()
    form.set_value("bands", "1, 9")  # the rasters have 3 bands: the worker refuses it
    task = dock.runner.run()
    assert task is not None and task.params["bands"] == [1, 9]
    wait_done(dock)
    assert task.outcome["status"] == "failed"
    critical = qgis_iface.messageBar().get_messages(Qgis.Critical)
    assert len(critical) == 1 and "Traceback" not in critical[0] and "9" in critical[0], critical
    assert "failed" in dock.run_tab.log.toPlainText() and dock.runner.last_layers == []
    assert files_in(tmp_path) == []


def test_dock_runs_cva_on_a_levir_pair_and_adds_styled_layers(dock, qgis_iface, tmp_path) -> None:
    before, after = pair()
    dock.run_tab.set_job("change.cva")
    form = dock.run_tab.form
    form.set_value("before", before)
    form.set_value("after", after)
    form.set_value("out_dir", str(tmp_path))
    task = dock.runner.run()
    assert task is not None and dock.runner.current_task is task
    assert not dock.run_tab.run_button.isEnabled() and dock.run_tab.cancel_button.isEnabled()
    assert dock.runner.run() is None  # one job at a time
    wait_done(dock)
    assert task.outcome["status"] == "finished", task.outcome
    assert dock.run_tab.run_button.isEnabled() and dock.run_tab.progress.value() == 100
    layers = dock.runner.last_layers
    assert len(layers) == 3
    group = next(g for g in QgsProject.instance().layerTreeRoot().findGroups() if g.name().startswith("Detect (CVA"))
    assert {n.layer() for n in group.findLayers()} == set(layers)
    for layer in layers:
        assert QgsProject.instance().mapLayer(layer.id()) is layer
        assert layer.crs().authid() == "EPSG:4326"
        assert close(layer.extent(), before.extent(), before.rasterUnitsPerPixelX() / 2), layer.name()
    probability = next(x for x in layers if "probability" in x.name())
    assert probability.renderer().type() == "singlebandpseudocolor"
    assert {p.name for p in files_in(tmp_path)} == {
        "cva_change_probability.tif",
        "cva_change_mask.tif",
        "cva_changes.gpkg",
    }
    success = qgis_iface.messageBar().get_messages(Qgis.Success)
    assert any("Detect (CVA, no training)" in m and "polygons" in m for m in success), success
    assert "started" in dock.run_tab.log.toPlainText() and "finished" in dock.run_tab.log.toPlainText()
    # The job's size estimate came before its work, and stays on the progress bar's tooltip.
    assert "Job size: 0.1 megapixels in 1 tile" in dock.run_tab.log.toPlainText()
    assert dock.run_tab.progress.toolTip().startswith("Job size: 0.1 megapixels")
    if dock.inspect_tab.inspector is not None:  # the change polygons go to the Inspect tab
        assert dock.tabs.currentIndex() == 1
        polygons = next(x for x in layers if isinstance(x, QgsVectorLayer))
        assert dock.inspect_tab.inspector.layer is polygons
    if dock.inspect_tab.compare is not None:  # and the inputs to the before/after comparison
        assert dock.inspect_tab.compare.before_combo.currentLayer() is before
        assert dock.inspect_tab.compare.after_combo.currentLayer() is after
    # A second run never overwrites the first run's files (they are loaded as layers).
    second = dock.runner.run()
    wait_done(dock)
    assert second.outcome["status"] == "finished"
    assert (tmp_path / "cva_2_changes.gpkg").is_file()


def test_detect_with_a_fine_tuned_adapter_from_the_library(dock, filf_adapter, tmp_path) -> None:
    before, after = pair("test_55_0256_0000")
    dock.run_tab.set_job("change.detect")
    form = dock.run_tab.form
    picker = form.adapter_picker
    dock.library.refresh()
    wait_until(lambda: filf_adapter in picker.names(), timeout_milliseconds=JOB_TIMEOUT_MS)
    index = picker.combo.findData(filf_adapter)
    tooltip = picker.combo.itemData(index, 3)  # Qt.ToolTipRole
    assert "tiny_vit_tiny" in tooltip and "Created" in tooltip and "Validation" in tooltip
    form.set_value("adapter", filf_adapter)
    form.set_value("before", before)
    form.set_value("after", after)
    form.set_value("out_dir", str(tmp_path))
    task = dock.runner.run()
    wait_done(dock)
    assert task.outcome["status"] == "finished", task.outcome
    assert task.params["adapter"] == filf_adapter
    assert len(dock.runner.last_layers) == 3
    assert all(x.crs().authid() == "EPSG:4326" for x in dock.runner.last_layers)


def slow_cva(dock, tmp_path: Path) -> None:
    """change.cva on the 1024² pair in small tiles: a few seconds, enough to interrupt."""
    before, after = pair("test_1")
    dock.run_tab.set_job("change.cva")
    form = dock.run_tab.form
    form.set_value("before", before)
    form.set_value("after", after)
    form.set_value("out_dir", str(tmp_path))
    form.set_value("tile_size", 32)
    form.set_value("overlap", 0)
    form.set_value("batch_size", 1)


def test_cancel_mid_job_leaves_nothing_and_the_worker_lives(dock, qgis_iface, tmp_path) -> None:
    slow_cva(dock, tmp_path)
    SESSION.client()  # a running worker, to check it survives the cancel
    worker = SESSION.running
    layers_before = set(QgsProject.instance().mapLayers())
    task = dock.runner.run()
    wait_until(lambda: dock.run_tab.progress.value() > 0, timeout_milliseconds=JOB_TIMEOUT_MS)
    assert dock.runner.current_task is task
    dock.runner.cancel()
    wait_done(dock)
    assert task.cancelled, task.outcome
    assert set(QgsProject.instance().mapLayers()) == layers_before
    assert dock.runner.last_layers == []
    assert files_in(tmp_path) == []  # no result, no partial file
    assert SESSION.running is worker and worker.alive  # the worker (and its loaded model) survives
    assert any("Cancelled — nothing was written" in m for m in qgis_iface.messageBar().get_messages(Qgis.Info))
    assert dock.run_tab.run_button.isEnabled()


def test_killed_worker_is_reported_and_restarted_for_the_next_job(dock, qgis_iface, tmp_path) -> None:
    slow_cva(dock, tmp_path / "killed")
    task = dock.runner.run()
    wait_until(lambda: dock.run_tab.progress.value() > 0, timeout_milliseconds=JOB_TIMEOUT_MS)
    starts = SESSION.starts
    SESSION.running.proc.kill()
    wait_done(dock)
    assert task.outcome["code"] == "WORKER_DIED"
    critical = qgis_iface.messageBar().get_messages(Qgis.Critical)
    assert any("backend stopped" in m and "restarted" in m for m in critical), critical
    assert files_in(tmp_path / "killed") == []
    # The next run starts a new worker and succeeds.
    before, after = pair()
    dock.run_tab.form.set_value("before", before)
    dock.run_tab.form.set_value("after", after)
    dock.run_tab.form.set_value("tile_size", 512)
    dock.run_tab.form.set_value("out_dir", str(tmp_path / "again"))
    again = dock.runner.run()
    wait_done(dock)
    assert again.outcome["status"] == "finished", again.outcome
    assert SESSION.starts == starts + 1 and SESSION.running is not None
    assert len(dock.runner.last_layers) == 3


def test_selected_feature_of_a_memory_layer_limits_the_result(dock, tmp_path) -> None:
    before, after = pair()
    full = before.extent()
    quarter = QgsRectangle(full.xMinimum(), full.yMinimum(), full.center().x(), full.center().y())
    area = QgsVectorLayer("Polygon?crs=EPSG:4326", "area", "memory")
    feats = []
    for rect in (quarter, QgsRectangle(full.center().x(), full.center().y(), full.xMaximum(), full.yMaximum())):
        f = QgsFeature(area.fields())
        f.setGeometry(QgsGeometry.fromRect(rect))
        feats.append(f)
    area.dataProvider().addFeatures(feats)
    QgsProject.instance().addMapLayer(area)
    area.selectByIds([next(area.getFeatures()).id()])  # only the lower-left quarter
    dock.run_tab.set_job("change.cva")
    form = dock.run_tab.form
    form.set_value("before", before)
    form.set_value("after", after)
    form.set_value("out_dir", str(tmp_path))
    form.set_value("aoi", area)
    assert form.value("aoi") is area
    task = dock.runner.run()
    wait_done(dock)
    assert task.outcome["status"] == "finished", task.outcome
    assert Path(task.params["aoi"]).is_file()
    probability = next(x for x in dock.runner.last_layers if "probability" in x.name())
    pixel = before.rasterUnitsPerPixelX()
    assert close(probability.extent(), quarter, 2 * pixel), (probability.extent().toString(), quarter.toString())
    # Nothing selected: a plain message, no job.
    area.removeSelection()
    assert dock.runner.run() is None and "selected" in dock.run_tab.message.text()


def test_memory_layer_is_exported_for_the_job_and_its_field_used(dock, qgis_iface, tmp_path) -> None:
    QgsProject.instance().setFileName(str(tmp_path / "project.qgz"))  # work files go next to the project
    prediction = add_raster(levir("test_2_0000_0512")[2], "prediction")
    full = prediction.extent()
    reference = QgsVectorLayer("Polygon?crs=EPSG:4326&field=cls:integer", "reference changes", "memory")
    f = QgsFeature(reference.fields())
    f.setGeometry(QgsGeometry.fromRect(full))
    f["cls"] = 1
    reference.dataProvider().addFeatures([f])
    QgsProject.instance().addMapLayer(reference)
    dock.run_tab.set_job("change.evaluate")
    form = dock.run_tab.form
    form.set_value("prediction", prediction)
    form.set_value("reference", reference)
    form.set_value("reference_field", "cls")
    assert form.value("reference_field") == "cls"
    task = dock.runner.run()
    wait_done(dock)
    assert task.outcome["status"] == "finished", task.outcome
    exported = Path(task.params["reference"])
    assert (
        exported.suffix == ".gpkg"
        and exported.is_file()
        and exported.parent == tmp_path / "rs_peft_outputs" / "rs_peft_work"
    )
    assert task.params["reference_field"] == "cls"
    assert dock.runner.last_layers == []
    success = qgis_iface.messageBar().get_messages(Qgis.Success)
    assert any("Evaluate" in m for m in success), success
    QgsProject.instance().setFileName("")


def test_finetune_from_the_dock_fills_the_epoch_table_and_offers_the_adapter(dock, qgis_iface, tmp_path) -> None:
    before, after = pair()
    label = add_raster(levir("test_2_0000_0512")[2], "label")
    dock.run_tab.set_job("change.finetune")
    form = dock.run_tab.form
    assert not dock.run_tab.epoch_table.isHidden()
    form.set_value("before", before)
    form.set_value("after", after)
    form.set_value("labels", label)
    form.set_value("adapter_name", "dock-finetune")
    form.set_value("overwrite", True)
    for name, value in FAST_FINETUNE.items():
        form.set_value(name, value)
    task = dock.runner.run()
    wait_done(dock)
    assert task.outcome["status"] == "finished", task.outcome
    assert task.params["epochs"] == FAST_FINETUNE["epochs"] and task.params["backbone"] == "tiny_vit_tiny"
    table = dock.run_tab.epoch_table
    assert table.rowCount() == FAST_FINETUNE["epochs"]
    assert [table.item(r, 0).text() for r in range(table.rowCount())] == ["1", "2"]
    for row in range(table.rowCount()):
        loss, f1, iou = (float(table.item(row, c).text()) for c in (1, 2, 3))
        assert loss > 0 and 0 <= f1 <= 1 and 0 <= iou <= 1
    assert "validation F1" in dock.run_tab.log.toPlainText()
    # The new adapter appears in the detect form, already selected; "Apply now" switches to it.
    detect = dock.run_tab.forms["change.detect"]
    wait_until(lambda: "dock-finetune" in detect.adapter_picker.names(), timeout_milliseconds=60_000)
    assert detect.value("adapter") == "dock-finetune"
    assert dock.runner.apply_now_button is not None
    dock.runner.apply_now_button.click()
    assert dock.run_tab.job.name == "change.detect" and dock.run_tab.form.value("adapter") == "dock-finetune"
    assert dock.run_tab.form.value("before") is before  # the rasters came along


def test_annotate_then_finetune_on_selection(dock, qgis_iface, tmp_path) -> None:
    pytest.importorskip("rs_peft_qgis.annotation")
    QgsProject.instance().setCrs(QgsRasterLayer(str(levir("test_2_0000_0512")[0])).crs())
    QgsProject.instance().setFileName(str(tmp_path / "project.qgz"))  # annotation files go next to it
    before, after = pair()
    dock.run_tab.set_job("change.cva")
    dock.run_tab.form.set_value("before", before)
    dock.run_tab.form.set_value("after", after)
    finetune = dock.run_tab.form_for("change.finetune")
    for name, value in FAST_FINETUNE.items():
        finetune.set_value(name, value)
    finetune.set_value("adapter_name", "dock-annotated")
    finetune.set_value("overwrite", True)
    layer = dock.annotate_tab.new_annotation_layer()
    assert layer is not None and layer.isEditable() and "change" in layer.fields().names()
    assert layer.crs().authid() == "EPSG:4326" and QgsProject.instance().mapLayer(layer.id()) is layer
    qgis_iface.actionAddFeature().trigger.assert_called()
    # Two drawn polygons: one change, one no-change.
    full = before.extent()
    for (x0, y0, x1, y1), value in (((0.1, 0.1, 0.4, 0.4), 1), ((0.6, 0.6, 0.9, 0.9), 0)):
        f = QgsFeature(layer.fields())
        f.setGeometry(QgsGeometry.fromRect(part_of(full, x0, y0, x1, y1)))
        f["change"] = value
        assert layer.addFeature(f)
    assert layer.isModified()
    task = dock.annotate_tab.finetune_on_selection()
    assert task is not None, dock.run_tab.message.text()
    assert "Nothing is selected" in dock.annotate_tab.status.text()  # the layer's extent is the training area
    assert dock.run_tab.job.name == "change.finetune"
    assert dock.run_tab.form.value("labels") is layer and dock.run_tab.form.value("label_field") == "change"
    assert not layer.isModified()  # the edits were saved for the job
    wait_done(dock)
    assert task.outcome["status"] == "finished", task.outcome
    assert Path(task.params["aoi"]).is_file() and task.params["label_field"] == "change"
    assert dock.run_tab.epoch_table.rowCount() == FAST_FINETUNE["epochs"]
    layer.rollBack()
    QgsProject.instance().setFileName("")


def test_semantic_change_annotation_has_from_to_fields_and_trains_scd(dock, qgis_iface, tmp_path) -> None:
    QgsProject.instance().setCrs(QgsRasterLayer(str(levir("test_2_0000_0512")[0])).crs())
    QgsProject.instance().setFileName(str(tmp_path / "project.qgz"))
    before, after = pair()
    finetune = dock.run_tab.form_for("change.finetune")
    finetune.set_value("before", before)
    finetune.set_value("after", after)
    for name, value in {**FAST_FINETUNE, "adapter_name": "dock-scd", "overwrite": True, "mode": "scd"}.items():
        finetune.set_value(name, value)
    layer = dock.annotate_tab.new_annotation_layer()
    assert layer is not None and {"from_class", "to_class"} <= set(layer.fields().names())
    assert "'from_class' and 'to_class'" in dock.annotate_tab.status.text()
    full = before.extent()
    for (x0, y0, x1, y1), (was, now) in (((0.1, 0.1, 0.4, 0.4), (1, 2)), ((0.6, 0.6, 0.9, 0.9), (0, 0))):
        f = QgsFeature(layer.fields())
        f.setGeometry(QgsGeometry.fromRect(part_of(full, x0, y0, x1, y1)))
        f["from_class"], f["to_class"] = was, now
        assert layer.addFeature(f)
    task = dock.annotate_tab.finetune_on_selection()
    assert task is not None, dock.run_tab.message.text()
    assert task.params["mode"] == "scd"
    assert (task.params["from_field"], task.params["to_field"]) == ("from_class", "to_class")
    wait_done(dock)
    assert task.outcome["status"] == "finished", task.outcome
    assert "val_miou" in task.outcome["metrics"]
    layer.rollBack()
    QgsProject.instance().setFileName("")


def annotate_whole_image(dock, image: QgsRasterLayer, boxes) -> QgsVectorLayer:
    """A new annotation layer holding `boxes` ((x0, y0, x1, y1) as shares of the image's extent, class), and the
    whole image as the selected training area."""
    layer = dock.annotate_tab.new_annotation_layer()
    assert layer is not None and "class" in layer.fields().names()
    full = image.extent()
    for (x0, y0, x1, y1), kind in boxes:
        f = QgsFeature(layer.fields())
        f.setGeometry(QgsGeometry.fromRect(part_of(full, x0, y0, x1, y1)))
        f["class"] = kind
        assert layer.addFeature(f)
    area = QgsVectorLayer(f"Polygon?crs={image.crs().authid()}", "training area", "memory")
    f = QgsFeature(area.fields())
    f.setGeometry(QgsGeometry.fromRect(full))
    area.dataProvider().addFeatures([f])
    QgsProject.instance().addMapLayer(area)
    area.selectAll()
    dock.annotate_tab.area_combo.setLayer(area)
    return layer


def test_objects_annotate_finetune_segment_and_inspect_from_the_dock(dock, qgis_iface, tmp_path) -> None:
    """The object-segmentation task round trip on a real SpaceNet-4 scene: outline two kinds of object in an
    annotation layer, fine-tune WEFT (miniature encoder) on the selection, segment, and review the objects."""
    image = add_raster(ROOT / "tests" / "data" / "spacenet4" / "pan.tif", "spacenet-4 pan")
    QgsProject.instance().setCrs(image.crs())
    QgsProject.instance().setFileName(str(tmp_path / "project.qgz"))
    dock.run_tab.set_job("objects.finetune")
    finetune = dock.run_tab.form
    finetune.set_value("image", image)
    fast = {**FAST_FINETUNE, "backbone": "vit_tiny", "patch_size": 128}
    for name, value in {**fast, "adapter_name": "dock-objects", "overwrite": True}.items():
        finetune.set_value(name, value)
    boxes = (((0.1, 0.1, 0.2, 0.2), "house"), ((0.5, 0.5, 0.6, 0.6), "shed"), ((0.7, 0.2, 0.8, 0.3), "house"))
    layer = annotate_whole_image(dock, image, boxes)
    task = dock.annotate_tab.finetune_on_selection()
    assert task is not None, dock.run_tab.message.text()
    assert task.params["label_field"] == "class" and Path(task.params["aoi"]).is_file()
    wait_done(dock)
    assert task.outcome["status"] == "finished", task.outcome
    assert dock.run_tab.epoch_table.rowCount() == FAST_FINETUNE["epochs"]
    # "Apply now" opens the segment action with the new adapter (once the library lists it) and the image.
    segment_form = dock.run_tab.form_for("objects.segment")
    wait_until(lambda: "dock-objects" in segment_form.adapter_picker.names(), timeout_milliseconds=60_000)
    dock.runner.apply_now("objects.segment", "dock-objects")
    assert dock.run_tab.job.name == "objects.segment" and dock.run_tab.form.value("image") is image
    dock.run_tab.form.set_value("out_dir", str(tmp_path / "results"))
    dock.run_tab.form.set_value("threshold", 0.3)
    segment = dock.runner.run()
    assert segment is not None, dock.run_tab.message.text()
    wait_done(dock)
    assert segment.outcome["status"] == "finished", segment.outcome
    names = {layer.name() for layer in dock.runner.last_layers}
    assert names == {"segment object probability", "segment object mask", "segment object classes", "segment objects"}
    if dock.inspect_tab.inspector is not None:  # the objects go to the Inspect tab for review
        assert dock.inspect_tab.inspector.layer.name() == "segment objects"
    layer.rollBack()
    QgsProject.instance().setFileName("")


def test_landcover_adapt_annotate_finetune_and_map_from_the_dock(dock, qgis_iface, tmp_path) -> None:
    """The land-cover task round trip on a real Sentinel-2 tile (ukis-csmask, 6 bands with their wavelengths in
    the metadata): the wavelength hint, "adapt to this imagery" (stage 1), class polygons drawn in an annotation
    layer, a fine-tune that starts from stage 1, and a map of the Landsat-7 tile named by its sensor."""
    ukis = ROOT / "tests" / "data" / "ukis"
    s2, l7 = add_raster(ukis / "sentinel2.tif", "sentinel-2"), add_raster(ukis / "landsat7.tif", "landsat-7")
    QgsProject.instance().setCrs(s2.crs())
    QgsProject.instance().setFileName(str(tmp_path / "project.qgz"))
    fast = {**FAST_FINETUNE, "backbone": "scalemae_tiny"}
    del fast["patch_size"]  # SpectralX's patch is its encoder's input size
    dock.run_tab.set_job("landcover.adapt")
    adapt = dock.run_tab.form
    adapt.set_value("image", s2)
    hint = adapt.findChild(QLabel, "wavelengthHint")
    assert hint.text() == "Wavelengths from the raster: 492, 560, 665, 833, 1614, 2202 nm."
    adapt.set_value("image", l7)
    assert "does not say which wavelength" in hint.text()
    adapt.set_value("sensor", "landsat7")
    assert hint.text() == "Wavelengths of landsat7: 485, 560, 660, 835, 1650, 2220 nm."
    adapt.set_value("sensor", None)
    adapt.set_value("image", s2)
    for name, value in {**fast, "adapter_name": "dock-lc-stage1", "overwrite": True}.items():
        adapt.set_value(name, value)
    task = dock.runner.run()
    assert task is not None, dock.run_tab.message.text()
    wait_done(dock)
    assert task.outcome["status"] == "finished", task.outcome
    # The next step is the fine-tune, starting from the stage-1 adapter.
    assert dock.runner.apply_now_button.text() == "Fine-tune now"
    finetune = dock.run_tab.form_for("landcover.finetune")
    wait_until(lambda: finetune.value("init_adapter") == "dock-lc-stage1", timeout_milliseconds=60_000)
    assert finetune.widgets["init_adapter"].combo.itemText(0) == AdapterPicker.NONE  # starting from none is allowed

    dock.run_tab.set_job("landcover.finetune")
    for name, value in {**fast, "adapter_name": "dock-lc", "overwrite": True}.items():
        finetune.set_value(name, value)
    boxes = (  # a cloud and two stretches of clear land of the tile (its reference mask says so)
        ((0.13, 0.51, 0.24, 0.62), "cloud"),
        ((0.13, 0.26, 0.49, 0.37), "clear"),
        ((0.26, 0.88, 0.37, 0.99), "clear"),
    )
    layer = annotate_whole_image(dock, s2, boxes)
    task = dock.annotate_tab.finetune_on_selection()
    assert task is not None, dock.run_tab.message.text()
    assert task.params["label_field"] == "class" and task.params["init_adapter"] == "dock-lc-stage1"
    wait_done(dock)
    assert task.outcome["status"] == "finished", task.outcome
    map_form = dock.run_tab.form_for("landcover.map")
    wait_until(lambda: "dock-lc" in map_form.adapter_picker.names(), timeout_milliseconds=60_000)
    dock.runner.apply_now("landcover.map", "dock-lc")
    assert dock.run_tab.job.name == "landcover.map"
    dock.run_tab.form.set_value("image", l7)
    dock.run_tab.form.set_value("sensor", "landsat7")
    dock.run_tab.form.set_value("out_dir", str(tmp_path / "results"))
    mapped = dock.runner.run()
    assert mapped is not None, dock.run_tab.message.text()
    wait_done(dock)
    assert mapped.outcome["status"] == "finished", mapped.outcome
    layers = {layer.name(): layer for layer in dock.runner.last_layers}
    assert set(layers) == {"map land cover", "map land-cover confidence", "map land-cover polygons"}
    renderer = layers["map land cover"].renderer()  # the style file beside the raster names the classes
    assert renderer.type() == "paletted"
    assert {c.label for c in renderer.classes()} == {"clear", "cloud"}
    # The polygons go to the Inspect tab, reviewed in land-cover words beside a swipe of image and map; accepted
    # ones become labels with their class (test_inspection: rejected ones are left out).
    inspect = dock.inspect_tab
    assert inspect.inspector.layer is layers["map land-cover polygons"]
    assert "land-cover polygons" in inspect.inspector.title.text()
    assert inspect.inspector.accept_button.toolTip() == "Its class is right (A)"
    assert inspect.compare.form.labelForField(inspect.compare.after_combo).text() == "Result"
    assert inspect.compare.after_combo.currentLayer() is layers["map land cover"]
    assert inspect.compare.before_combo.currentLayer() is l7
    inspect.inspector.select_row(0)
    inspect.inspector.judge("accepted")
    labels = inspect.inspector.export_to(tmp_path / "reviewed.gpkg")
    assert labels is not None, qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
    assert labels.featureCount() == 1 and next(labels.getFeatures())["class"] in {"clear", "cloud"}
    layer.rollBack()
    QgsProject.instance().setFileName("")


def test_unload_during_a_job_cancels_it(qgis_iface, qgis_new_project, tmp_path) -> None:
    from rs_peft_qgis import classFactory

    plugin = classFactory(qgis_iface)
    plugin.initGui()
    slow_cva(plugin.dock, tmp_path)
    task = plugin.dock.runner.run()
    wait_until(lambda: plugin.dock.run_tab.progress.value() > 0, timeout_milliseconds=JOB_TIMEOUT_MS)
    worker = SESSION.running
    plugin.unload()
    assert SESSION.running is None and not worker.alive
    wait_until(lambda: sip.isdeleted(task) or task.status() == task.Terminated, timeout_milliseconds=30_000)
    assert files_in(tmp_path) == []  # the job was stopped before it wrote anything
    QgsProject.instance().removeAllMapLayers()
