"""Pansharpening in a real headless QGIS with the real worker: Processing and the dock, built from the catalog
with no pansharpening-specific plugin code, on the georeferenced SpaceNet-6 crop."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest
from conftest import JOB_TIMEOUT_MS, ROOT
from pytest_qgis.utils import wait_until
from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
from qgis.gui import QgsSpinBox
from qgis.PyQt.QtWidgets import QComboBox

from rs_peft_qgis.forms import LayerPicker
from rs_peft_qgis.processing.algorithm import METRICS, OUTPUT_FOLDER
from rs_peft_qgis.processing.provider import PROVIDER_ID, RsPeftProvider
from rs_peft_qgis.session import SESSION

if "/usr/share/qgis/python/plugins" not in sys.path:
    sys.path.append("/usr/share/qgis/python/plugins")

DATA = ROOT / "tests" / "data" / "pansharpening" / "spacenet6"
PAN, MS = DATA / "pan.tif", DATA / "ms.tif"


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


def run(alg: str, params: dict) -> dict:
    import processing

    return processing.run(f"rs_peft:{alg}", params)


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
    tasks = {dock.task_combo.itemData(i): dock.task_combo.itemText(i) for i in range(dock.task_combo.count())}
    assert tasks.get("pansharpen") == "Pansharpening"
    dock.set_task("pansharpen")
    titles = [dock.job_combo.itemText(i) for i in range(dock.job_combo.count())]
    assert "Pansharpen (classical: Brovey / GSA / MTF-GLP-HPM)" in titles and "Evaluate pansharpening" in titles
    pan = QgsRasterLayer(str(PAN), "pan", "gdal")
    ms = QgsRasterLayer(str(MS), "ms", "gdal")
    QgsProject.instance().addMapLayers([pan, ms])
    for name in ("pansharpen.classic", "pansharpen.evaluate"):
        dock.set_job(name)
        form = dock.form
        assert isinstance(form.widgets["pan"], LayerPicker) and isinstance(form.widgets["ms"], LayerPicker)
        assert isinstance(form.widgets["sensor"], QComboBox) and form.value("sensor") == "generic"
        ratio = form.widgets["ratio"]
        assert isinstance(ratio, QgsSpinBox) and ratio.specialValueText() == "auto" and form.value("ratio") is None
    dock.set_job("pansharpen.classic")
    form = dock.form
    form.set_value("pan", pan)
    form.set_value("ms", ms)
    form.set_value("out_dir", str(tmp_path))
    task = dock.run()
    assert task is not None
    wait_until(lambda: dock.current_task is None, timeout_milliseconds=JOB_TIMEOUT_MS)
    assert task.outcome["status"] == "finished", task.outcome
    (layer,) = dock.last_layers
    assert layer.crs() == pan.crs() and layer.extent() == pan.extent() and layer.bandCount() == 4
    assert Path(layer.source()).name == "classic_mtf_glp_hpm.tif"  # the dock names outputs after the verb
