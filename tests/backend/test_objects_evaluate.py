"""objects.evaluate and the segmentation / object metrics, against hand-counted cases and real SpaceNet-4 data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import DATA
from rasterio.transform import from_origin

from backend.context import JobContext
from backend.jobs import JOBS
from backend.jobs.base import run_job
from backend.metrics.objects import instances, match
from backend.metrics.segmentation import ConfusionMatrix
from backend.protocol import JobError

TRANSFORM = from_origin(500_000, 4_000_000, 1.0, 1.0)  # 1 m pixels, UTM 33N


def evaluate(**params: object) -> dict:
    spec = JOBS["objects.evaluate"]
    return run_job(spec, spec.validate(params), JobContext()).metrics


def mask_file(path: Path, data: np.ndarray, count: int = 1) -> Path:
    profile = dict(driver="GTiff", width=data.shape[-1], height=data.shape[-2], count=count, dtype="uint8")
    with rasterio.open(path, "w", crs="EPSG:32633", transform=TRANSFORM, **profile) as ds:
        ds.write(data.reshape(count, *data.shape[-2:]))
    return path


def square(row: int, col: int, size: int) -> dict:
    x, y = TRANSFORM * (col, row)
    ring = [[x, y], [x + size, y], [x + size, y - size], [x, y - size], [x, y]]
    return {"type": "Feature", "properties": {"kind": "tank"}, "geometry": {"type": "Polygon", "coordinates": [ring]}}


# A 10 × 10 scene. Predicted: A (rows 1-3, cols 1-3, 9 px) and B (rows 7-8, cols 7-8, 4 px).
# Reference: A exactly, and C (rows 6-7, cols 1-2, 4 px) that was missed.
PRED = np.zeros((10, 10), np.uint8)
PRED[1:4, 1:4] = 1
PRED[7:9, 7:9] = 1
REF = np.zeros((10, 10), np.uint8)
REF[1:4, 1:4] = 1
REF[6:8, 1:3] = 1


def test_confusion_matrix_scores_match_hand_counts() -> None:
    cm = ConfusionMatrix(2)
    cm.update(PRED, REF)
    m = cm.metrics()
    # object class: TP 9, FP 4, FN 4; background: TP 83, FP 4, FN 4
    assert m["iou"] == pytest.approx(9 / 17) and m["f1"] == pytest.approx(18 / 26)
    assert m["miou"] == pytest.approx((9 / 17 + 83 / 91) / 2)
    assert m["mdice"] == pytest.approx((18 / 26 + 166 / 174) / 2) and m["oa"] == pytest.approx(92 / 100)


def test_objects_match_one_to_one_at_iou_one_half() -> None:
    m = match(instances(PRED > 0), instances(REF > 0))
    assert (m["objects_matched"], m["objects_predicted"], m["objects_reference"]) == (1, 2, 2)
    assert m["object_precision"] == m["object_recall"] == m["object_f1"] == pytest.approx(0.5)
    # A prediction covering half of a reference object (IoU 0.5) still matches; a third of it does not.
    half, ref = np.zeros((4, 4), int), np.zeros((4, 4), int)
    ref[:, :2] = 1
    half[:2, :2] = 1
    assert match(half, ref)["objects_matched"] == 1
    half[1] = 0
    assert match(half, ref)["objects_matched"] == 0


def test_evaluate_against_polygons_and_a_mask(tmp_path: Path) -> None:
    pred = mask_file(tmp_path / "pred.tif", PRED * 255)  # a 0/255 mask is a mask too
    polygons = tmp_path / "ref.geojson"
    crs = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}
    polygons.write_text(
        json.dumps({"type": "FeatureCollection", "crs": crs, "features": [square(1, 1, 3), square(6, 1, 2)]})
    )
    for reference in (polygons, mask_file(tmp_path / "ref.tif", REF)):
        m = evaluate(prediction=str(pred), reference=str(reference))
        assert m["iou"] == pytest.approx(9 / 17) and m["objects_matched"] == 1 and m["object_f1"] == pytest.approx(0.5)
        assert m["scored_pixels"] == 100


def test_evaluate_refuses_what_is_not_an_object_mask(tmp_path: Path) -> None:
    ref = str(mask_file(tmp_path / "ref.tif", REF))
    with pytest.raises(JobError, match="has 3 bands"):
        evaluate(prediction=str(mask_file(tmp_path / "rgb.tif", np.stack([PRED] * 3), count=3)), reference=ref)
    with pytest.raises(JobError, match="holds the values 0, 1, 2"):
        evaluate(prediction=str(mask_file(tmp_path / "classes.tif", PRED + REF)), reference=ref)


def test_a_real_footprint_mask_scores_perfectly_against_itself() -> None:
    mask = str(DATA / "spacenet4" / "fp_mask.tif")
    m = evaluate(prediction=mask, reference=mask)
    assert m["iou"] == m["miou"] == m["object_f1"] == 1.0 and m["objects_reference"] > 10
