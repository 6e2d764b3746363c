"""Adding a method is its package and nothing else: a toy method registered from a test module (through
RS_PEFT_QGIS_METHODS, in subprocesses so this test process keeps the product's catalog) is offered by the
catalog, the CLI and the worker, and runs end to end on real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio
from conftest import ROOT, levir

from backend.client import WorkerClient

TOY = "tests.backend.toy_method"


@pytest.fixture
def toy_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "RS_PEFT_QGIS_METHODS": TOY,
        "RS_PEFT_QGIS_ADAPTER_DIR": str(tmp_path / "adapters"),
        "PYTHONPATH": str(ROOT),
    }


def backend(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_the_catalog_offers_a_registered_method_and_only_then(toy_env: dict[str, str]) -> None:
    catalog = json.loads(backend(toy_env, "catalog").stdout)
    toy = next(t for t in catalog["tasks"] if t["id"] == "toy")
    assert toy["title"] == "Toy mapping" and toy["jobs"] == ["toy.finetune", "toy.apply"]
    finetune, apply = catalog["jobs"]["toy.finetune"], catalog["jobs"]["toy.apply"]
    assert finetune["method"] == apply["method"] == "toy"
    # The generic groups come with it: adapter name, device with its choices, tiling with its ranges.
    params = {p["name"]: p for p in finetune["params"]}
    assert {"image", "labels", "adapter_name", "backbone", "device", "overwrite"} <= set(params)
    assert params["device"]["choices"] == ["auto", "cpu", "cuda"] and params["device"]["editable"]
    tile = next(p for p in apply["params"] if p["name"] == "tile_size")
    assert (tile["minimum"], tile["group"]) == (32, "tiling")
    assert [o["key"] for o in apply["outputs"]] == ["probability", "mask", "polygons"]
    plain = dict(toy_env)
    del plain["RS_PEFT_QGIS_METHODS"]
    assert "toy.apply" not in json.loads(backend(plain, "catalog").stdout)["jobs"]


def test_the_cli_and_the_worker_run_a_registered_method(toy_env: dict[str, str], tmp_path: Path) -> None:
    _, image, label = levir("test_2_0000_0000")
    trained = backend(toy_env, "toy.finetune", "--image", str(image), "--labels", str(label),
                      "--adapter-name", "toy1", "--allow-random-backbone", "--json")  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    metrics = json.loads(trained.stdout)["metrics"]
    assert metrics["adapter"] == "toy1" and 0 < metrics["trainable_parameters"] < metrics["total_parameters"]

    client = WorkerClient(sys.executable, ROOT, env=toy_env)
    info = client.start()
    try:
        assert "toy.apply" in info["jobs"]
        handle = client.run_job("toy.apply", {"image": str(image), "adapter": "toy1", "out_dir": str(tmp_path / "o")})
    finally:
        client.shutdown()
    assert handle.succeeded, handle.outcome
    outputs = {o["key"]: Path(o["path"]) for o in handle.outcome["outputs"]}
    assert outputs["mask"].name == "toy_toy_mask.tif" and outputs["polygons"].name == "toy_toys.gpkg"
    with rasterio.open(outputs["probability"]) as prob, rasterio.open(image) as src:
        assert (prob.width, prob.height, prob.crs) == (src.width, src.height, src.crs)
        assert 0.0 <= prob.read(1, masked=True).min() <= prob.read(1, masked=True).max() <= 1.0
