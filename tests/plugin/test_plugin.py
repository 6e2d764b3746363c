"""The plugin in a real (headless) QGIS: metadata, loading, the process boundary, styles."""

from __future__ import annotations

import configparser
import sys

import pytest
from conftest import BACKEND_PYTHON, LEVIR, ROOT
from pytest_qgis.utils import wait_until
from qgis.core import Qgis, QgsApplication, QgsRasterLayer, QgsVectorLayer

from rs_peft_qgis.session import SESSION
from rs_peft_qgis.worker_client import WorkerClient


def test_metadata_is_valid_for_the_plugin_manager() -> None:
    meta = configparser.ConfigParser()
    meta.read(ROOT / "metadata.txt")
    g = meta["general"]
    for key in ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email"):
        assert g.get(key), key
    assert g["qgisMinimumVersion"] == "3.34" and g.getboolean("supportsQt6")
    assert (ROOT / g["icon"]).is_file()


def test_plugin_loads_adds_its_action_and_unloads(qgis_iface) -> None:
    from rs_peft_qgis import classFactory

    plugin = classFactory(qgis_iface)
    plugin.initGui()
    assert [a.text() for a in plugin.actions] == [
        "RS PEFT panel",
        "Settings…",
        "Backend diagnostics…",
        "Install backend…",
    ]
    plugin.unload()
    assert plugin.actions == [] and plugin.dock is None


def test_plugin_side_never_imports_backend_libraries(qgis_iface) -> None:
    import rs_peft_qgis.plugin  # noqa: F401

    for heavy in ("torch", "rasterio", "fiona", "backend", "backend.worker"):
        assert heavy not in sys.modules, f"{heavy} was imported into QGIS's Python"


def test_diagnostics_task_starts_the_backend_worker(qgis_iface) -> None:
    from rs_peft_qgis import classFactory

    plugin = classFactory(qgis_iface)
    plugin.initGui()
    try:
        plugin.run_diagnostics()
        wait_until(lambda: plugin.diagnostics is not None, timeout_milliseconds=120_000)
        assert "error" not in plugin.diagnostics, plugin.diagnostics
        client = SESSION.running  # the shared worker the panel and Processing use too
        assert client.python == str(BACKEND_PYTHON)  # the backend venv, not QGIS's Python
        assert client.info["devices"][0]["name"] == "cpu"
        wait_until(lambda: qgis_iface.messageBar().get_messages(Qgis.Success), timeout_milliseconds=5_000)
    finally:
        plugin.unload()
    assert SESSION.running is None and not client.alive


@pytest.fixture
def worker():
    client = WorkerClient(BACKEND_PYTHON, ROOT)
    client.start()
    yield client
    client.shutdown()


def test_job_from_qgis_python_gives_layers_qgis_opens_and_styles(worker, tmp_path, qgis_new_project) -> None:
    handle = worker.run_job(
        "change.cva",
        {
            "before": str(LEVIR / "test_2_0000_0512_A.tif"),
            "after": str(LEVIR / "test_2_0000_0512_B.tif"),
            "out_dir": str(tmp_path),
        },
        timeout=300,
    )
    assert handle.succeeded, handle.outcome
    styles = ROOT / "resources" / "styles"
    layers = []
    for out in handle.outcome["outputs"]:
        layer = (QgsRasterLayer if out["kind"] == "raster" else QgsVectorLayer)(out["path"], out["layer_name"])
        assert layer.isValid(), out
        assert layer.crs().authid() == "EPSG:4326"
        _, ok = layer.loadNamedStyle(str(styles / out["style"]))
        assert ok, out["style"]
        layers.append(layer)
    vector = next(x for x in layers if isinstance(x, QgsVectorLayer))
    assert vector.featureCount() == handle.outcome["metrics"]["polygons"]
    assert {"class", "area_m2", "confidence"} <= set(vector.fields().names())
    raster = layers[0]
    assert raster.renderer().type() == "singlebandpseudocolor"
    del layers, vector, raster  # no layer may outlive QGIS (segfault at exit)
    assert QgsApplication.taskManager() is not None
