"""change.evaluate on georeferenced LEVIR-CD pairs and a hand-checkable semantic change pair."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fiona
import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import ROOT, levir
from rasterio.enums import Resampling
from rasterio.warp import calculate_default_transform, reproject
from shapely.geometry import box, mapping

from backend.context import JobContext
from backend.io.vectorize import vectorize
from backend.jobs import JOBS
from backend.jobs.base import run_job
from backend.metrics.change import BinaryConfusion
from backend.protocol import JobError, JobResult

BINARY = ("precision", "recall", "f1", "iou", "oa", "kappa")


def run(name: str, **params: Any) -> JobResult:
    spec = JOBS[name]
    return run_job(spec, spec.validate(params), JobContext())


def evaluate(**params: Any) -> JobResult:
    return run("change.evaluate", **{k: str(v) if isinstance(v, Path) else v for k, v in params.items()})


@pytest.fixture(scope="module")
def cva(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, JobResult]:
    """change.cva on test_1 (1024 x 1024: four evaluation blocks): its mask, its polygons and its result."""
    before, after, ref = levir("test_1")
    out = tmp_path_factory.mktemp("cva")
    result = run("change.cva", before=str(before), after=str(after), reference=str(ref), out_dir=str(out))
    return Path(result.outputs[1].path), Path(result.outputs[2].path), result


def write_polygons(
    path: Path, polygons: list[tuple[Any, dict[str, int]]], crs: str, fields: tuple[str, ...] = ()
) -> Path:
    schema = {"geometry": "Polygon", "properties": dict.fromkeys(fields, "int")}
    with fiona.open(path, "w", driver="GPKG", schema=schema, crs=crs) as dst:
        for geom, props in polygons:
            dst.write({"geometry": mapping(geom), "properties": props})
    return path


def test_scores_equal_the_ones_change_cva_reports(cva: tuple[Path, Path, JobResult]) -> None:
    mask, _, cva_result = cva
    result = evaluate(prediction=mask, reference=levir("test_1")[2])
    m = result.metrics
    for key in BINARY:
        assert m[key] == pytest.approx(cva_result.metrics[key], abs=1e-12), key
    assert m["tp"] + m["fp"] == cva_result.metrics["changed_pixels"]
    assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == m["scored_pixels"] == 1024 * 1024
    assert result.outputs == [] and result.warnings == []


def test_polygon_reference_scores_like_the_raster(cva: tuple[Path, Path, JobResult], tmp_path: Path) -> None:
    mask, changes, cva_result = cva
    label = levir("test_1")[2]
    gpkg = tmp_path / "label.gpkg"
    assert vectorize(label, gpkg, layer="changes") > 0
    m = evaluate(prediction=mask, reference=gpkg).metrics
    assert m["f1"] == pytest.approx(cva_result.metrics["f1"], abs=1e-6)
    assert m["scored_pixels"] == 1024 * 1024
    # With a class field: the prediction against its own polygons (class 1 = change) is perfect.
    own = evaluate(prediction=mask, reference=changes, reference_field="class").metrics
    assert own["f1"] == 1.0 and own["fp"] == own["fn"] == 0


def test_aoi_restricts_the_scored_pixels(cva: tuple[Path, Path, JobResult], tmp_path: Path) -> None:
    mask, _, _ = cva
    label = levir("test_1")[2]
    with rasterio.open(mask) as ds:
        pred, (left, bottom, right, top) = ds.read(1), ds.bounds
    with rasterio.open(label) as ds:
        ref = ds.read(1)
    # The left half of the scene: pixel centres of columns 0..511 lie inside.
    aoi = write_polygons(tmp_path / "aoi.gpkg", [(box(left, bottom, (left + right) / 2, top), {})], "EPSG:4326")
    m = evaluate(prediction=mask, reference=label, aoi=aoi).metrics
    assert m["scored_pixels"] == 1024 * 512
    expected = BinaryConfusion()
    expected.update(pred[:, :512] == 1, ref[:, :512] > 0)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (expected.tp, expected.fp, expected.fn, expected.tn)
    assert m["f1"] == pytest.approx(expected.metrics()["f1"])

    far = write_polygons(tmp_path / "far.gpkg", [(box(0, 0, 1, 1), {})], "EPSG:4326")
    with pytest.raises(JobError, match="area of interest does not overlap"):
        evaluate(prediction=mask, reference=label, aoi=far)


def test_reference_in_another_crs(cva: tuple[Path, Path, JobResult], tmp_path: Path) -> None:
    mask, _, cva_result = cva
    utm = tmp_path / "label_utm.tif"
    with rasterio.open(levir("test_1")[2]) as src:
        tf, w, h = calculate_default_transform(src.crs, "EPSG:32614", src.width, src.height, *src.bounds)
        profile = src.profile | {"crs": "EPSG:32614", "transform": tf, "width": w, "height": h, "nodata": 254}
        with rasterio.open(utm, "w", **profile) as dst:
            reproject(rasterio.band(src, 1), rasterio.band(dst, 1), resampling=Resampling.nearest, dst_nodata=254)
    m = evaluate(prediction=mask, reference=utm).metrics
    assert m["f1"] == pytest.approx(cva_result.metrics["f1"], abs=0.02)
    assert m["scored_pixels"] > 0.98 * 1024 * 1024


# A 3 x 4 semantic change pair (classes 1-2, 0 = unchanged, 255 = nodata); (date-1, date-2) per pixel:
#   row 0-1: the eight pixels of test_metrics_scd.py (two right changes, one date-1 class wrong,
#            two false changes, one missed change, two right no-changes)
#   row 2:   (0,0)/(0,0) right no change | prediction nodata | prediction (2,2), reference nodata | both nodata
PRED = np.array(
    [
        [[0, 1, 0, 1], [2, 2, 1, 0], [0, 255, 2, 255]],
        [[0, 2, 0, 2], [2, 1, 1, 0], [0, 255, 2, 255]],
    ],
    dtype=np.uint8,
)
REF = np.array(
    [
        [[0, 0, 0, 1], [1, 2, 0, 2], [0, 1, 255, 255]],
        [[0, 0, 0, 2], [2, 1, 0, 1], [0, 1, 255, 255]],
    ],
    dtype=np.uint8,
)
TRANSFORM = Affine(10, 0, 500000, 0, -10, 4000000)


def write_pair(tmp: Path) -> tuple[Path, Path]:
    paths = []
    for name, data in (("pred", PRED), ("ref", REF)):
        path = tmp / f"{name}.tif"
        profile = dict(driver="GTiff", width=4, height=3, count=2, dtype="uint8", nodata=255)
        with rasterio.open(path, "w", crs="EPSG:32614", transform=TRANSFORM, **profile) as ds:
            ds.write(data)
        paths.append(path)
    return paths[0], paths[1]


def test_semantic_change_on_a_hand_checkable_pair(tmp_path: Path) -> None:
    pred, ref = write_pair(tmp_path)
    m = evaluate(prediction=pred, reference=ref, mode="scd", num_classes=2).metrics
    # Scored: rows 0-1 and pixel (2, 0). H = [[4+2, 3, 1], [1, 2, 1], [1, 0, 3]], total 18.
    assert m["scored_pixels"] == 9
    assert m["oa"] == pytest.approx(11 / 18)
    # labelled changed 18 - 10 = 8, predicted changed 18 - 8 = 10, both 6: IoU_change = 6/12, IoU_nochange = 6/12
    assert m["miou"] == pytest.approx(0.5)
    # semantic TP 5: P_sc = 5/10, R_sc = 5/8 -> Fscd = 5/9
    assert m["fscd"] == pytest.approx(5 / 9)
    # H_n0 as in test_metrics_scd.py: kappa_n0 = 1/8
    assert m["sek"] == pytest.approx(0.125 * math.exp(0.5 - 1))


def test_semantic_change_against_polygons(tmp_path: Path) -> None:
    pred, _ = write_pair(tmp_path)
    cells = []
    for r, c in zip(*np.nonzero((REF[0] > 0) & (REF[0] < 255)), strict=True):
        x, y = TRANSFORM * (int(c), int(r))
        cells.append((box(x, y - 10, x + 10, y), {"before": int(REF[0, r, c]), "after": int(REF[1, r, c])}))
    gpkg = write_polygons(tmp_path / "changes.gpkg", cells, "EPSG:32614", ("before", "after"))
    params = dict(prediction=pred, reference=gpkg, mode="scd", num_classes=2)
    m = evaluate(**params, from_field="before", to_field="after").metrics
    # Polygons have no nodata: pixel (2, 2) is scored too, as reference (0,0) vs prediction (2,2).
    # H = [[6, 3, 1+2], [1, 2, 1], [1, 0, 3]], total 20, predicted changed 20 - 8 = 12
    assert m["scored_pixels"] == 10
    assert m["oa"] == pytest.approx(11 / 20)
    assert m["precision_sc"] == pytest.approx(5 / 12) and m["recall_sc"] == pytest.approx(5 / 8)
    with pytest.raises(JobError, match="date-1 and date-2 classes"):
        evaluate(**params)


def test_semantic_change_input_errors(tmp_path: Path) -> None:
    pred, ref = write_pair(tmp_path)
    with pytest.raises(JobError, match="holds class 2, but classes must be 0 \\(no change\\) to 1"):
        evaluate(prediction=pred, reference=ref, mode="scd", num_classes=1)
    with pytest.raises(JobError, match="needs the number of land-cover classes"):
        evaluate(prediction=pred, reference=ref, mode="scd")
    with pytest.raises(JobError, match="has 1 band\\(s\\), but semantic change needs 2"):
        evaluate(prediction=levir("test_2_0000_0000")[2], reference=ref, mode="scd", num_classes=2)


def bad_inputs(tmp: Path) -> dict[str, tuple[dict[str, Any], str]]:
    _, _, label = levir("test_2_0000_0000")
    _, _, other = levir("test_77_0512_0256")
    text = tmp / "notes.gpkg"
    text.write_text("neither")
    empty = write_polygons(tmp / "empty.gpkg", [], "EPSG:4326")
    return {
        "missing reference": ({"prediction": label, "reference": tmp / "nope.tif"}, "reference file .* does not exist"),
        "missing prediction": ({"prediction": tmp / "nope.tif", "reference": label}, "prediction file .* not exist"),
        "no overlap": ({"prediction": label, "reference": other}, "prediction and reference rasters do not overlap"),
        "unreadable": ({"prediction": label, "reference": text}, "neither a raster nor a vector layer"),
        "no polygons": ({"prediction": label, "reference": empty}, "reference layer contains no polygons"),
    }


@pytest.mark.parametrize("case", ["missing reference", "missing prediction", "no overlap", "unreadable", "no polygons"])
def test_bad_input_is_a_clear_error(case: str, tmp_path: Path) -> None:
    params, message = bad_inputs(tmp_path)[case]
    with pytest.raises(JobError, match=message) as err:
        evaluate(**params)
    assert err.value.code == "INVALID_INPUT"


def test_cli_help_and_json(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "backend", "change.evaluate", *args]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    help_text = cli("--help").stdout
    for flag in ("--prediction", "--reference", "--reference-field", "--aoi", "--mode", "--num-classes"):
        assert flag in help_text
    assert "--from-field" in help_text and "--to-field" in help_text
    label = str(levir("test_2_0000_0000")[2])
    proc = cli("--prediction", label, "--reference", label, "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["outputs"] == [] and result["metrics"]["f1"] == 1.0
    assert result["metrics"]["scored_pixels"] == 256 * 256
