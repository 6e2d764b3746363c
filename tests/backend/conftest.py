"""Shared fixtures: real data from tests/data and a real worker process."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
LEVIR = DATA / "levir_cd"
sys.path.insert(0, str(ROOT))
# The job journal and the adapters of tests never land in the user's own data folder (a test may override).
os.environ["RS_PEFT_QGIS_DATA_DIR"] = tempfile.mkdtemp(prefix="rs-peft-test-data-")

from backend.client import WorkerClient  # noqa: E402


def levir(name: str) -> tuple[Path, Path, Path]:
    """(before, after, reference mask) of a georeferenced LEVIR-CD pair."""
    return LEVIR / f"{name}_A.tif", LEVIR / f"{name}_B.tif", LEVIR / f"{name}_label.tif"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _log_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RS_PEFT_QGIS_LOG_DIR", str(tmp_path_factory.mktemp("logs")))


@pytest.fixture
def worker() -> WorkerClient:
    """A real worker process on this interpreter (the backend venv), shut down after the test."""
    client = WorkerClient(sys.executable, ROOT)
    client.start()
    yield client
    client.shutdown()
    if client.alive:
        client.proc.kill()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` need an NVIDIA GPU; skip them where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
