"""Pansharpening in a real headless QGIS with the real worker: Processing and the dock, built from the catalog
with no pansharpening-specific plugin code, on the georeferenced SpaceNet-6 crop (PAN 256², MS 128² x 4, ratio 2).

The PanAdapter jobs run the small "tiny" backbone with random frozen weights (no IPT/EDSR checkpoint can be
downloaded here) for a few steps: what is tested is the plugin's side (forms, epoch table, adapter pickers,
layers, Processing outputs), the model's quality is the backend's tests' business."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest
from conftest import JOB_TIMEOUT_MS, ROOT
from osgeo import gdal
from pytest_qgis.utils import wait_until
from qgis.core import QgsApplication, QgsProcessingException, QgsProcessingFeedback, QgsProject, QgsRasterLayer
from qgis.gui import QgsSpinBox
from qgis.PyQt.QtWidgets import QCheckBox, QComboBox

from rs_peft_qgis.forms.adapter_picker import AdapterPicker
from rs_peft_qgis.forms.widgets import LayerPicker
from rs_peft_qgis.processing.algorithm import ADAPTER, METRICS, OUTPUT_FOLDER
from rs_peft_qgis.processing.provider import PROVIDER_ID, RsPeftProvider
from rs_peft_qgis.session import SESSION

if "/usr/share/qgis/python/plugins" not in sys.path:
    sys.path.append("/usr/share/qgis/python/plugins")

DATA = ROOT / "tests" / "data" / "pansharpening" / "spacenet6"
PAN, MS = DATA / "pan.tif", DATA / "ms.tif"
# A PanAdapter fine-tune in seconds: 2 epochs of stage 1 (local priors), 1 of stage 2 (adapters), 2 steps each.
FAST_PANADAPTER = {
    "backbone": "tiny",
    "allow_random_backbone": True,
    "prior_epochs": 2,
    "adapter_epochs": 1,
    "steps_per_epoch": 2,
    "batch_size": 2,
    "device": "cpu",
}
STAGE_ORDER = [("prior", 1), ("prior", 2), ("adapter", 1)]
STAGE_TEXT = {"prior": "stage 1 (local priors)", "adapter": "stage 2 (adapters)"}

gdal.UseExceptions()


@pytest.fixture(scope="module")
def provider(qgis_processing):
    registry = QgsApplication.processingRegistry()
    own = registry.providerById(PROVIDER_ID) is None
    if own:
        assert registry.addProvider(RsPeftProvider())
        gc.collect()
    yield registry.providerById(PROVIDER_ID)
    if own:
        registry.removeProvider(PROVIDER_ID)
    SESSION.shutdown()


class InfoFeedback(QgsProcessingFeedback):
    """Keeps the infos an algorithm pushed (the worker's log lines, epoch records included)."""

    def __init__(self) -> None:
        super().__init__()
        self.infos: list[str] = []

    def pushInfo(self, info: str) -> None:
        self.infos.append(info)


def run(alg: str, params: dict, feedback: QgsProcessingFeedback | None = None) -> dict:
    import processing

    return processing.run(f"rs_peft:{alg}", params, feedback=feedback or InfoFeedback())


def add(path: Path, name: str) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), name, "gdal")
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    return layer


def band_means(path: Path | str) -> list[float]:
    ds = gdal.Open(str(path))
    try:
        return [float(ds.GetRasterBand(b).ReadAsArray().mean()) for b in range(1, ds.RasterCount + 1)]
    finally:
        ds = None


def assert_on_the_pan_grid(path: Path | str) -> None:
    """A 4-band raster on the PAN's grid (CRS, extent, size) whose bands keep the MS's radiometry."""
    layer = QgsRasterLayer(str(path), "fused", "gdal")
    pan = QgsRasterLayer(str(PAN), "pan", "gdal")
    assert layer.isValid() and pan.isValid(), path
    assert layer.crs() == pan.crs() and layer.crs().authid() == "EPSG:32631"
    assert layer.extent() == pan.extent()
    assert (layer.width(), layer.height()) == (pan.width(), pan.height()) == (256, 256) and layer.bandCount() == 4
    # Real pixels, not an empty or zero-filled file: each band's mean within 5 % of the MS band's.
    for fused, ms in zip(band_means(path), band_means(MS), strict=True):
        assert ms > 0 and abs(fused - ms) <= 0.05 * ms, (fused, ms)
    del layer, pan


@pytest.fixture(scope="module")
def panadapter(provider) -> tuple[dict, InfoFeedback]:
    """A PanAdapter adapter fine-tuned through processing.run on the SpaceNet-6 pair (results, feedback)."""
    feedback = InfoFeedback()
    params = {"pan": str(PAN), "ms": str(MS), "adapter_name": "sn6-processing", "overwrite": True}
    results = run("pansharpen_finetune", params | FAST_PANADAPTER, feedback)
    return results, feedback


def test_processing_pansharpens_onto_the_pan_grid(provider, tmp_path: Path) -> None:
    results = run("pansharpen_classic", {"pan": str(PAN), "ms": str(MS), "out_dir": str(tmp_path / "out")})
    out = Path(results["pansharpened"])
    assert out == tmp_path / "out" / "pansharpened_mtf_glp_hpm.tif" and Path(results[OUTPUT_FOLDER]) == out.parent
    layer = QgsRasterLayer(str(out), "fused", "gdal")
    pan = QgsRasterLayer(str(PAN), "pan", "gdal")
    assert layer.isValid() and pan.isValid()
    assert layer.crs() == pan.crs() and layer.crs().authid() == "EPSG:32631"
    assert layer.extent() == pan.extent()
    assert (layer.width(), layer.height()) == (pan.width(), pan.height()) and layer.bandCount() == 4
    assert json.loads(results[METRICS])["ratio"] == 2  # detected from the two grids
    # The same pair scored, with a method and with the result just written.
    metrics = json.loads(
        run("pansharpen_evaluate", {"pan": str(PAN), "ms": str(MS), "fused": str(out), "method": "gsa"})[METRICS]
    )
    assert 0 < metrics["rr_method_q2n"] <= 1 and 0 < metrics["fused_hqnr"] <= 1
    del layer, pan


def test_dock_lists_pansharpening_and_runs_it(dock, tmp_path: Path) -> None:
    combo = dock.run_tab.task_combo
    tasks = {combo.itemData(i): combo.itemText(i) for i in range(combo.count())}
    assert tasks.get("pansharpen") == "Pansharpening"
    dock.run_tab.set_task("pansharpen")
    titles = [dock.run_tab.job_combo.itemText(i) for i in range(dock.run_tab.job_combo.count())]
    assert "Pansharpen (classical: Brovey / GSA / MTF-GLP-HPM)" in titles and "Evaluate pansharpening" in titles
    pan = QgsRasterLayer(str(PAN), "pan", "gdal")
    ms = QgsRasterLayer(str(MS), "ms", "gdal")
    QgsProject.instance().addMapLayers([pan, ms])
    for name in ("pansharpen.classic", "pansharpen.evaluate"):
        dock.run_tab.set_job(name)
        form = dock.run_tab.form
        assert isinstance(form.widgets["pan"], LayerPicker) and isinstance(form.widgets["ms"], LayerPicker)
        assert isinstance(form.widgets["sensor"], QComboBox) and form.value("sensor") == "generic"
        ratio = form.widgets["ratio"]
        assert isinstance(ratio, QgsSpinBox) and ratio.specialValueText() == "auto" and form.value("ratio") is None
    dock.run_tab.set_job("pansharpen.classic")
    form = dock.run_tab.form
    form.set_value("pan", pan)
    form.set_value("ms", ms)
    form.set_value("out_dir", str(tmp_path))
    task = dock.runner.run()
    assert task is not None
    wait_until(lambda: dock.runner.current_task is None, timeout_milliseconds=JOB_TIMEOUT_MS)
    assert task.outcome["status"] == "finished", task.outcome
    (layer,) = dock.runner.last_layers
    assert layer.crs() == pan.crs() and layer.extent() == pan.extent() and layer.bandCount() == 4
    assert Path(layer.source()).name == "classic_mtf_glp_hpm.tif"  # the dock names outputs after the verb


# --- PanAdapter: fine-tune and apply ------------------------------------------------------------------


def epoch_rows(table) -> list[dict[str, str]]:
    headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    return [{h: table.item(r, c).text() for c, h in enumerate(headers)} for r in range(table.rowCount())]


def test_processing_finetunes_a_panadapter_adapter(panadapter) -> None:
    results, feedback = panadapter
    assert results[ADAPTER] == "sn6-processing"
    metrics = json.loads(results[METRICS])
    assert metrics["adapter"] == "sn6-processing" and Path(metrics["adapter_path"]).is_dir()
    assert (metrics["best_stage"], metrics["best_epoch"]) in STAGE_ORDER
    assert 0 < metrics["val_q2n"] <= 1 and 0 < metrics["val_start_q2n"] <= 1
    assert metrics["trainable_parameters_adapter"] > metrics["trainable_parameters_prior"] > 0
    # The worker's epoch records reached the feedback, one per epoch, stage 1 before stage 2.
    epochs = [i for i in feedback.infos if i.startswith("stage ") and ", epoch " in i]
    assert [e.split(",")[0] for e in epochs] == ["stage 1/2: local priors"] * 2 + ["stage 2/2: adapters"], epochs
    assert any(
        i.startswith(f"Best: stage {metrics['best_stage']}, epoch {metrics['best_epoch']}") for i in feedback.infos
    )


def test_processing_applies_the_adapter_onto_the_pan_grid(panadapter, tmp_path: Path) -> None:
    params = {"pan": str(PAN), "ms": str(MS), "adapter": panadapter[0][ADAPTER], "device": "cpu"}
    results = run("pansharpen_apply", params | {"out_dir": str(tmp_path / "out")})
    out = Path(results["pansharpened"])
    assert out == tmp_path / "out" / "panadapter.tif" and Path(results[OUTPUT_FOLDER]) == out.parent
    assert_on_the_pan_grid(out)
    metrics = json.loads(results[METRICS])
    assert metrics["adapter"] == "sn6-processing" and (metrics["ratio"], metrics["bands"]) == (2, 4)
    assert (metrics["width"], metrics["height"]) == (256, 256) and metrics["valid_fraction"] == pytest.approx(1.0)
    # An adapter that does not exist is a plain error, and writes nothing.
    with pytest.raises(QgsProcessingException, match="no-such-adapter"):
        run("pansharpen_apply", params | {"adapter": "no-such-adapter", "out_dir": str(tmp_path / "bad")})
    assert not any((tmp_path / "bad").rglob("*.tif"))


def test_dock_finetunes_a_panadapter_adapter_and_offers_it(dock) -> None:
    pan, ms = add(PAN, "pan"), add(MS, "ms")
    dock.run_tab.set_task("pansharpen")
    dock.run_tab.set_job("pansharpen.finetune")
    form = dock.run_tab.form
    assert (
        dock.run_tab.job_combo.currentText() == "Fine-tune a PanAdapter adapter"
        and not dock.run_tab.epoch_table.isHidden()
    )
    # The fast settings are advanced ones: the backbone is a choice, the random weights a check box.
    assert isinstance(form.widgets["backbone"], QComboBox) and isinstance(
        form.widgets["allow_random_backbone"], QCheckBox
    )
    assert form.advanced.isAncestorOf(form.widgets["backbone"]) and form.value("backbone") == "ipt"
    form.set_value("pan", pan)
    form.set_value("ms", ms)
    form.set_value("adapter_name", "dock-pansharpen")
    form.set_value("overwrite", True)
    for name, value in FAST_PANADAPTER.items():
        form.set_value(name, value)
    task = dock.runner.run()
    assert task is not None, dock.run_tab.message.text()
    wait_until(lambda: dock.runner.current_task is None, timeout_milliseconds=JOB_TIMEOUT_MS)
    assert task.outcome["status"] == "finished", task.outcome
    assert task.params["pan"] == str(PAN) and task.params["ms"] == str(MS)
    assert task.params["backbone"] == "tiny" and task.params["allow_random_backbone"] is True
    metrics = task.outcome["metrics"]
    assert metrics["adapter"] == "dock-pansharpen"
    # One row per epoch, in stage order, with the stage and validation Q2n columns.
    table = dock.run_tab.epoch_table
    headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    assert headers[:4] == ["Epoch", "Stage", "Loss", "Val Q2n"], headers
    rows = epoch_rows(table)
    assert [(r["Stage"], int(r["Epoch"])) for r in rows] == STAGE_ORDER
    q2n = [float(r["Val Q2n"]) for r in rows]
    assert all(0 < q <= 1 for q in q2n) and all(float(r["Loss"]) > 0 for r in rows)
    best = next(r for r in rows if (r["Stage"], int(r["Epoch"])) == (metrics["best_stage"], metrics["best_epoch"]))
    assert float(best["Val Q2n"]) == pytest.approx(max(q2n), abs=1e-4) == pytest.approx(metrics["val_q2n"], abs=1e-4)
    # The summary names the best epoch and its stage.
    summary = f"best epoch {metrics['best_epoch']} of {STAGE_TEXT[metrics['best_stage']]}"
    assert f"Adapter 'dock-pansharpen' saved to the library · {summary}" in dock.run_tab.log.toPlainText()
    assert f"Best: stage {metrics['best_stage']}, epoch {metrics['best_epoch']}" in dock.run_tab.log.toPlainText()
    # The new adapter appears in the apply form's picker, already selected; "Apply now" switches to it.
    apply = dock.run_tab.forms["pansharpen.apply"]
    picker = apply.adapter_picker
    assert isinstance(picker, AdapterPicker)
    wait_until(lambda: "dock-pansharpen" in picker.names(), timeout_milliseconds=60_000)
    assert apply.value("adapter") == "dock-pansharpen"
    tooltip = picker.combo.itemData(picker.combo.findData("dock-pansharpen"), 3)  # Qt.ToolTipRole
    assert "(panadapter)" in tooltip and "Backbone: tiny" in tooltip and "EPSG:32631" in tooltip
    assert dock.runner.apply_now_button is not None
    dock.runner.apply_now_button.click()
    assert dock.run_tab.job.name == "pansharpen.apply" and dock.run_tab.form.value("adapter") == "dock-pansharpen"
    assert dock.run_tab.form.value("pan") is pan and dock.run_tab.form.value("ms") is ms  # the rasters came along


def test_dock_applies_a_panadapter_adapter_onto_the_pan_grid(dock, panadapter, tmp_path: Path) -> None:
    name = panadapter[0][ADAPTER]
    pan, ms = add(PAN, "pan"), add(MS, "ms")
    dock.run_tab.set_job("pansharpen.apply")
    form = dock.run_tab.form
    picker = form.adapter_picker
    dock.library.refresh()
    wait_until(lambda: name in picker.names(), timeout_milliseconds=JOB_TIMEOUT_MS)
    form.set_value("adapter", name)
    form.set_value("pan", pan)
    form.set_value("ms", ms)
    form.set_value("out_dir", str(tmp_path))
    form.set_value("device", "cpu")
    layers_before = set(QgsProject.instance().mapLayers())
    task = dock.runner.run()
    assert task is not None, dock.run_tab.message.text()
    wait_until(lambda: dock.runner.current_task is None, timeout_milliseconds=JOB_TIMEOUT_MS)
    assert task.outcome["status"] == "finished", task.outcome
    assert task.params["adapter"] == name
    (layer,) = dock.runner.last_layers
    assert set(QgsProject.instance().mapLayers()) == layers_before | {layer.id()}
    group = next(
        g for g in QgsProject.instance().layerTreeRoot().findGroups() if g.name().startswith("Pansharpen (PanAdapter")
    )
    assert [n.layer() for n in group.findLayers()] == [layer]
    assert Path(layer.source()) == tmp_path / "apply.tif"  # the dock names outputs after the verb
    assert layer.crs() == pan.crs() and layer.extent() == pan.extent()
    assert (layer.width(), layer.height()) == (pan.width(), pan.height()) and layer.bandCount() == 4
    assert_on_the_pan_grid(layer.source())
