"""Adding a method needs no plugin code (issue 13): a toy method that lives in a test module
(tests/backend/toy_method.py, registered through RS_PEFT_QGIS_METHODS) gets its catalog from the backend,
and with RS_PEFT_QGIS_CATALOG naming that file the panel offers its task with complete forms, Processing
its algorithms, and the real worker fine-tunes and applies it from the panel."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import BACKEND_PYTHON, JOB_TIMEOUT_MS, ROOT, levir
from pytest_qgis.utils import wait_until
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.gui import QgsFileWidget, QgsSpinBox
from qgis.PyQt.QtWidgets import QComboBox, QLineEdit

from rs_peft_qgis import catalog
from rs_peft_qgis.forms.adapter_picker import AdapterPicker
from rs_peft_qgis.forms.widgets import LayerPicker
from rs_peft_qgis.processing.algorithm import ADAPTER, METRICS, OUTPUT_FOLDER
from rs_peft_qgis.processing.provider import PROVIDER_ID, RsPeftProvider

TOY = "tests.backend.toy_method"
IMAGE, _, LABEL = levir("test_2_0000_0000")


@pytest.fixture(scope="module")
def toy_catalog_file(tmp_path_factory) -> Path:
    """The catalog the backend writes with the toy method registered (what its developer runs)."""
    path = tmp_path_factory.mktemp("toy") / "jobs.json"
    env = {**os.environ, "RS_PEFT_QGIS_METHODS": TOY, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [str(BACKEND_PYTHON), "-m", "backend", "catalog", "--write", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return path


@pytest.fixture
def toy_catalog(toy_catalog_file: Path, monkeypatch) -> catalog.Catalog:
    """QGIS as the method's developer starts it: the worker registers the method, the plugin reads its catalog."""
    monkeypatch.setenv("RS_PEFT_QGIS_METHODS", TOY)
    monkeypatch.setenv(catalog.CATALOG_ENV, str(toy_catalog_file))
    return catalog.load()


@pytest.fixture
def toy_dock(toy_catalog, request):
    return request.getfixturevalue("dock")  # built after the variables are set


def add_raster(path: Path) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), path.stem, "gdal")
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    return layer


def test_the_catalog_comes_from_the_variable_and_keeps_the_product_jobs(toy_catalog) -> None:
    assert toy_catalog.task("toy").title == "Toy mapping"
    assert toy_catalog.task("toy").jobs == ("toy.finetune", "toy.apply")
    assert toy_catalog.jobs["toy.apply"].method == "toy"
    assert set(catalog.load(str(ROOT / "resources" / "jobs.json")).jobs) < set(toy_catalog.jobs)


def test_the_panel_offers_the_new_task_with_forms_from_its_catalog(toy_dock, toy_catalog) -> None:
    tab = toy_dock.run_tab
    image = add_raster(IMAGE)
    titles = [tab.task_combo.itemText(i) for i in range(tab.task_combo.count())]
    assert "Toy mapping" in titles
    tab.task_combo.setCurrentIndex(titles.index("Toy mapping"))  # what the analyst does
    assert tab.task_id == "toy"
    assert [tab.job_combo.itemData(i) for i in range(tab.job_combo.count())] == ["toy.finetune", "toy.apply"]
    assert tab.apply_job().name == "toy.apply" and tab.finetune_job().name == "toy.finetune"

    tab.set_job("toy.apply")
    form = tab.form
    assert form.job is toy_catalog.jobs["toy.apply"] and tab.summary.text() == form.job.summary
    assert isinstance(form.widgets["image"], LayerPicker) and form.value("image") is image
    picker = form.widgets["adapter"]
    assert isinstance(picker, AdapterPicker) and picker is form.adapter_picker and picker.method == "toy"
    for name in ("tile_size", "overlap", "batch_size"):  # the catalog's ranges and steps, under Advanced
        p, spin = form.job.param(name), form.widgets[name]
        assert isinstance(spin, QgsSpinBox) and form.advanced.isAncestorOf(spin), name
        assert spin.maximum() == p.maximum and spin.singleStep() == p.step, name
        assert spin.minimum() == (p.minimum - p.step if p.default is None else p.minimum), name  # "auto" below
    tile = form.widgets["tile_size"]
    assert (tile.maximum(), tile.singleStep(), tile.specialValueText()) == (16384, 32, "auto")
    assert form.value("tile_size") is None and form.value("batch_size") == 4
    device = form.widgets["device"]
    assert isinstance(device, QComboBox) and device.isEditable() and form.value("device") == "auto"
    assert isinstance(form.widgets["out_dir"], QgsFileWidget) and form.value("name") == "apply"  # named after the verb
    assert tab.epoch_table.isHidden()

    tab.set_job("toy.finetune")
    form = tab.form
    assert not tab.epoch_table.isHidden()
    assert form.value("image") is image  # carried over from the apply form
    assert isinstance(form.widgets["labels"], LayerPicker) and isinstance(form.widgets["adapter_name"], QLineEdit)
    epochs = form.widgets["epochs"]
    assert (epochs.minimum(), epochs.maximum(), form.value("epochs")) == (1, 100000, 2)
    assert form.value("steps_per_epoch") == 3 and form.advanced.isAncestorOf(epochs)


def test_processing_offers_the_new_jobs_with_their_parameters_and_outputs(toy_catalog, qgis_processing) -> None:
    registry = QgsApplication.processingRegistry()
    assert registry.providerById(PROVIDER_ID) is None, "another test left the provider registered"
    assert registry.addProvider(RsPeftProvider())
    try:
        ids = {a.id() for a in registry.providerById(PROVIDER_ID).algorithms()}
        assert {"rs_peft:toy_finetune", "rs_peft:toy_apply", "rs_peft:change_cva"} <= ids
        apply = registry.createAlgorithmById("rs_peft:toy_apply")
        assert apply.group() == "Toy mapping" and apply.displayName() == toy_catalog.jobs["toy.apply"].title
        types = {d.name(): d.type() for d in apply.parameterDefinitions()}
        assert types == {
            "adapter": "string",
            "image": "raster",
            "tile_size": "number",
            "overlap": "number",
            "batch_size": "number",
            "device": "string",  # editable choices are free text
            "name": "string",
            "out_dir": "folderDestination",
            "cluster": "string",  # every apply job, a new method's too, can run on a Ray cluster
        }
        tile = apply.parameterDefinition("tile_size")
        assert (tile.minimum(), tile.maximum()) == (32, 16384)
        outputs = {o.name(): o.type() for o in apply.outputDefinitions()}
        assert outputs == {
            "probability": "outputRaster",
            "mask": "outputRaster",
            "polygons": "outputVector",
            "out_dir": "outputFolder",  # QGIS adds one for the folder destination parameter
            OUTPUT_FOLDER: "outputFolder",
            METRICS: "outputString",
        }

        finetune = registry.createAlgorithmById("rs_peft:toy_finetune")
        assert finetune.group() == "Toy mapping"
        types = {d.name(): d.type() for d in finetune.parameterDefinitions()}
        assert types["image"] == types["labels"] == "raster" and types["adapter_name"] == "string"
        assert types["backbone"] == "enum" and types["allow_random_backbone"] == "boolean"
        epochs = finetune.parameterDefinition("epochs")
        assert (epochs.minimum(), epochs.maximum(), epochs.defaultValue()) == (1, 100000, 2)
        assert {o.name() for o in finetune.outputDefinitions()} == {ADAPTER, METRICS}
    finally:
        registry.removeProvider(PROVIDER_ID)


def test_the_panel_fine_tunes_and_applies_the_new_method_on_the_real_worker(toy_dock, tmp_path: Path) -> None:
    tab, runner = toy_dock.run_tab, toy_dock.runner
    image, label = add_raster(IMAGE), add_raster(LABEL)
    tab.set_job("toy.finetune")
    for name, value in {"image": image, "labels": label, "adapter_name": "dock-toy", "overwrite": True,
                        "allow_random_backbone": True}.items():  # fmt: skip
        tab.form.set_value(name, value)
    task = runner.run()
    wait_until(lambda: runner.current_task is None, timeout_milliseconds=JOB_TIMEOUT_MS)
    assert task.outcome["status"] == "finished", task.outcome
    assert tab.epoch_table.rowCount() == 2  # the toy's default epochs
    apply = tab.forms["toy.apply"]
    wait_until(lambda: "dock-toy" in apply.adapter_picker.names(), timeout_milliseconds=60_000)

    tab.set_job("toy.apply")
    assert tab.form.value("adapter") == "dock-toy" and tab.form.value("image") is image
    tab.form.set_value("out_dir", str(tmp_path))
    task = runner.run()
    wait_until(lambda: runner.current_task is None, timeout_milliseconds=JOB_TIMEOUT_MS)
    assert task.outcome["status"] == "finished", task.outcome
    layers = runner.last_layers
    assert [type(x) for x in layers] == [QgsRasterLayer, QgsRasterLayer, QgsVectorLayer]
    assert all(QgsProject.instance().mapLayer(x.id()) is x and x.crs() == image.crs() for x in layers)
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"apply_toy_probability.tif", "apply_toy_mask.tif", "apply_toys.gpkg"}
