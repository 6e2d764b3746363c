"""Semantic change (FILF-SCD) on a real LEVIR-CD pair: from/to polygons -> change.finetune --mode scd ->
change.detect (mask, from/to class raster, polygons with from/to attributes) -> change.evaluate --mode scd.

The from/to classes are ours: LEVIR-CD marks new buildings, so its change outlines become "1 -> 2" (ground to
building) and, for the outlines in the left half of the tile, "1 -> 3" (to a second building class) so that
three classes are learned. The encoder is the random tiny TinyViT (no checkpoint is installed in these tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
import torch
from conftest import ROOT, levir
from rasterio.features import rasterize, shapes
from shapely.geometry import mapping, shape
from test_change_filf import FAST, isolated_dirs  # noqa: F401 (the autouse fixture applies here too)

from backend import adapters
from backend.context import JobContext
from backend.io.rasterize import IGNORE
from backend.jobs import JOBS
from backend.jobs.base import run_job
from backend.methods.filf.decoder import SCDOutput
from backend.methods.filf.training import evaluate_patches, scd_loss
from backend.protocol import JobError


def run(job: str, **params):
    spec = JOBS[job]
    return run_job(spec, spec.validate(params), JobContext())


def from_to_polygons(label: Path, out: Path) -> Path:
    """The label's change outlines with from/to class fields (see the module docstring)."""
    with rasterio.open(label) as src:
        mask, transform, crs = (src.read(1) > 0).astype(np.uint8), src.transform, src.crs
    records = []
    for geom, _ in shapes(mask, mask=mask > 0, transform=transform):
        poly = shape(geom)
        left = poly.centroid.x < (transform * (mask.shape[1] / 2, 0))[0]
        records.append({"geometry": mapping(poly), "properties": {"was": 1, "now": 3 if left else 2}})
    schema = {"geometry": "Polygon", "properties": {"was": "int", "now": "int"}}
    with fiona.open(out, "w", driver="GPKG", schema=schema, crs=crs.to_wkt()) as dst:
        dst.writerecords(records)
    return out


def test_semantic_change_round_trip_on_a_real_pair(tmp_path: Path) -> None:
    before, after, label = levir("test_2_0000_0000")
    polys = from_to_polygons(label, tmp_path / "from_to.gpkg")
    trained = run(
        "change.finetune",
        before=str(before),
        after=str(after),
        labels=str(polys),
        mode="scd",
        from_field="was",
        to_field="now",
        adapter_name="levir scd",
        **FAST,
    )
    assert 0.0 <= trained.metrics["val_miou"] <= 1.0 and "val_sek" in trained.metrics
    _, meta = adapters.load("levir scd")
    assert meta.classes == ["no change", "class 1", "class 2", "class 3"]
    assert meta.config["mode"] == "scd" and meta.config["num_seg"] == 4

    out = tmp_path / "out"
    result = run("change.detect", before=str(before), after=str(after), adapter="levir scd", out_dir=str(out))
    kinds = {o.key: o.path for o in result.outputs}
    assert set(kinds) == {"probability", "mask", "classes", "polygons"}
    with rasterio.open(kinds["classes"]) as src, rasterio.open(kinds["mask"]) as msk:
        classes, mask = src.read(), msk.read(1)
        assert src.count == 2 and src.descriptions == ("class at date 1", "class at date 2")
    # Classes exactly where the mask says change, and only the trained ones (class 0 is never predicted there).
    assert np.array_equal(classes[0] > 0, mask == 1) and np.array_equal(classes[1] > 0, mask == 1)
    assert set(np.unique(classes)) <= {0, 1, 2, 3}
    with fiona.open(kinds["polygons"]) as layer:
        feats, fields = list(layer), set(layer.schema["properties"])
    assert {"from_class", "to_class", "from_name", "to_name"} <= fields
    for f in feats:
        p = f.properties
        assert 1 <= p["from_class"] <= 3 and 1 <= p["to_class"] <= 3
        assert p["class_name"] == f"class {p['from_class']} → class {p['to_class']}"
    assert len(feats) == result.metrics["polygons"]

    scored = run(
        "change.evaluate",
        prediction=kinds["classes"],
        reference=str(polys),
        mode="scd",
        num_classes=3,
        from_field="was",
        to_field="now",
    ).metrics
    # Hand counts: the reference burnt on the prediction grid (pixel centres, as the evaluation burns it).
    with rasterio.open(label) as src:
        ref_changed = src.read(1) > 0
    ref = np.zeros_like(classes)
    ref[0][ref_changed] = 1
    with fiona.open(polys) as layer, rasterio.open(label) as src:
        now = rasterize(((f.geometry, f.properties["now"]) for f in layer), src.shape, transform=src.transform)
    ref[1] = np.where(ref_changed, now, 0)
    pred_changed = classes[0] > 0
    both = ref_changed & pred_changed
    tp_sc = int(((classes[0] == ref[0]) & both).sum() + ((classes[1] == ref[1]) & both).sum())
    p_sc, r_sc = tp_sc / (2 * pred_changed.sum()), tp_sc / (2 * ref_changed.sum())
    assert scored["precision_sc"] == pytest.approx(p_sc) and scored["recall_sc"] == pytest.approx(r_sc)
    iou_change = both.sum() / (ref_changed | pred_changed).sum()
    assert scored["iou_change"] == pytest.approx(iou_change)


def test_semantic_change_from_two_class_rasters(tmp_path: Path) -> None:
    before, after, label = levir("test_2_0000_0000")
    with rasterio.open(label) as src:
        profile, changed = src.profile, src.read(1) > 0
    profile.update(dtype="uint8", count=1, nodata=None)
    paths = []
    for name, cls in (("from.tif", 1), ("to.tif", 2)):
        paths.append(tmp_path / name)
        with rasterio.open(paths[-1], "w", **profile) as dst:
            dst.write((changed * cls).astype(np.uint8), 1)
    trained = run(
        "change.finetune",
        before=str(before),
        after=str(after),
        labels=str(paths[0]),
        labels_after=str(paths[1]),
        mode="scd",
        adapter_name="rasters scd",
        **FAST,
    )
    assert "val_fscd" in trained.metrics
    assert adapters.load("rasters scd")[1].classes == ["no change", "class 1", "class 2"]
    with pytest.raises(JobError, match="two class rasters"):
        run("change.finetune", before=str(before), after=str(after), labels=str(paths[0]), mode="scd",
            adapter_name="x", **FAST)  # fmt: skip


def test_semantic_change_from_the_command_line(tmp_path: Path) -> None:
    before, after, label = levir("test_2_0000_0000")
    polys = from_to_polygons(label, tmp_path / "from_to.gpkg")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    options = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items() if k != "allow_random_backbone"]
    cmd = [sys.executable, "-m", "backend", "change.finetune", "--before", str(before), "--after", str(after)]
    cmd += ["--labels", str(polys), "--mode", "scd", "--from-field", "was", "--to-field", "now"]
    cmd += ["--adapter-name", "cli scd", "--allow-random-backbone", *options, "--json", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)["metrics"]
    assert {"val_miou", "val_sek", "val_fscd", "val_threshold"} <= set(metrics)


def test_semantic_change_polygons_need_both_class_fields(tmp_path: Path) -> None:
    before, after, label = levir("test_2_0000_0000")
    polys = from_to_polygons(label, tmp_path / "from_to.gpkg")
    with pytest.raises(JobError, match="'from class' field and a 'to class' field"):
        run("change.finetune", before=str(before), after=str(after), labels=str(polys), mode="scd",
            from_field="was", adapter_name="x", **FAST)  # fmt: skip


def test_scd_loss_ignores_unknown_pixels_and_rewards_the_right_classes() -> None:
    label = torch.tensor([[[0, 1], [1, IGNORE]]], dtype=torch.uint8)
    classes = torch.tensor([[[[0, 1], [1, 0]], [[0, 2], [2, 0]]]], dtype=torch.uint8)

    def output(good: bool, unknown: float) -> SCDOutput:
        change = torch.tensor([[[[-4.0, 4.0], [4.0, unknown]]]])
        sem = torch.zeros(1, 3, 2, 2)
        sem2 = torch.zeros(1, 3, 2, 2)
        sem[0, 1 if good else 2] = 5.0
        sem2[0, 2 if good else 1] = 5.0
        return SCDOutput(change, sem, sem2)

    good, bad = scd_loss(output(True, 0.0), label, classes), scd_loss(output(False, 0.0), label, classes)
    assert float(good) < float(bad)
    # The IGNORE pixel's logit does not move the loss.
    assert float(scd_loss(output(True, 50.0), label, classes)) == pytest.approx(float(good))


class FixedLogits(torch.nn.Module):
    """Stands in for FILF to test threshold choice alone: it returns the same change logits for every input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return torch.stack([-self.logits, self.logits])[None].expand(x1.shape[0], -1, -1, -1)


def test_the_validation_threshold_is_the_one_with_the_best_f1() -> None:
    # Change probabilities 0.33 on the changed pixels and 0.1 elsewhere: 0.5 finds nothing, 0.2 finds all.
    y = np.zeros((4, 4), np.uint8)
    y[:2] = 1
    p = np.where(y == 1, 0.33, 0.1)
    model = FixedLogits(torch.logit(torch.tensor(p, dtype=torch.float32)))
    patch = (np.zeros((3, 4, 4), np.float32), np.zeros((3, 4, 4), np.float32), y)
    chosen = evaluate_patches(model, [patch], lambda x: x, 1, torch.device("cpu"))
    assert chosen["f1"] == 1.0 and 0.1 <= chosen["threshold"] < 0.33
    fixed = evaluate_patches(model, [patch], lambda x: x, 1, torch.device("cpu"), choose_threshold=False)
    assert fixed["threshold"] == 0.5 and fixed["f1"] == 0.0
