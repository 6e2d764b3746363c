"""Plugin tests run in QGIS's own Python (.venv-qgis) with a real headless QGIS (pytest-qgis).

The backend folders (adapters, model cache, logs) point into one temporary folder for the whole
run, so tests never touch the user's library; the shared worker session keeps one worker for them.
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest
from qgis.core import QgsProject
from qgis.PyQt.QtGui import QColor, QImage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
BACKEND_PYTHON = ROOT / ".venv" / "bin" / "python"
LEVIR = ROOT / "tests" / "data" / "levir_cd"

_DATA = Path(tempfile.mkdtemp(prefix="rs-peft-plugin-tests-"))
os.environ["RS_PEFT_QGIS_DATA_DIR"] = str(_DATA / "data")
os.environ["RS_PEFT_QGIS_CACHE_DIR"] = str(_DATA / "cache")
os.environ["RS_PEFT_QGIS_LOG_DIR"] = str(_DATA / "logs")
os.environ.pop("RS_PEFT_QGIS_ADAPTER_DIR", None)

# Settings of a fast FILF fine-tune: the tiny TinyViT encoder with random frozen weights (no
# checkpoint can be downloaded here), a few steps on 64-pixel patches.
FAST_FINETUNE = {
    "backbone": "tiny_vit_tiny",
    "allow_random_backbone": True,
    "epochs": 2,
    "steps_per_epoch": 2,
    "batch_size": 2,
    "patch_size": 64,
}


def levir(name: str) -> tuple[Path, Path, Path]:
    """(before, after, reference mask) of a bundled georeferenced LEVIR-CD pair."""
    return LEVIR / f"{name}_A.tif", LEVIR / f"{name}_B.tif", LEVIR / f"{name}_label.tif"


@pytest.fixture(scope="session")
def filf_adapter() -> str:
    """A FILF adapter in the (temporary) library, fine-tuned by the real worker; its name."""
    from rs_peft_qgis.worker_client import WorkerClient

    before, after, label = levir("test_2_0000_0512")
    client = WorkerClient(BACKEND_PYTHON, ROOT)
    client.start()
    try:
        handle = client.run_job(
            "change.finetune",
            {
                "before": str(before),
                "after": str(after),
                "labels": str(label),
                "adapter_name": "plugin-tests",
                "overwrite": True,
                **FAST_FINETUNE,
            },
            timeout=600,
        )
    finally:
        client.shutdown()
    assert handle.succeeded, handle.outcome
    return "plugin-tests"


JOB_TIMEOUT_MS = 180_000


@pytest.fixture
def dock(qgis_iface, qgis_new_project):
    """The RS PEFT panel on the test QGIS; afterwards no job, layer or adapter read is left running."""
    from pytest_qgis.utils import wait_until

    from rs_peft_qgis.dock import RsPeftDock

    panel = RsPeftDock(qgis_iface)
    yield panel
    if panel.runner.current_task is not None:
        panel.runner.cancel()
        wait_until(lambda: panel.runner.current_task is None, timeout_milliseconds=JOB_TIMEOUT_MS)
    if panel.library.task is not None:
        wait_until(lambda: panel.library.task is None, timeout_milliseconds=JOB_TIMEOUT_MS)
    panel.shutdown()
    panel.runner.last_layers = []
    if panel.inspect_tab.inspector is not None:
        panel.inspect_tab.inspector.set_layer(None)
    if panel.inspect_tab.compare is not None and hasattr(panel.inspect_tab.compare, "set_layers"):
        panel.inspect_tab.compare.set_layers(None, None)
    QgsProject.instance().removeAllMapLayers()
    panel.deleteLater()


@pytest.fixture
def xyz_url(tmp_path: Path) -> str:
    """An XYZ tile URL served from one local red tile (a web map without network)."""
    tiles = tmp_path / "tiles" / "0" / "0"
    tiles.mkdir(parents=True)
    image = QImage(256, 256, QImage.Format_RGB32)
    image.fill(QColor(200, 30, 30))
    assert image.save(str(tiles / "0.png"))
    return (tmp_path / "tiles").as_uri() + "/{z}/{x}/{y}.png"
