"""pansharpen.classic and pansharpen.evaluate on real pairs: a georeferenced SpaceNet-6 crop (ratio 2) and the
WorldView-2 crop (ratio 4) written to GeoTIFF here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import ROOT, sha256
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform
from shapely.geometry import Polygon, mapping
from test_raster_io import feature_offset

from backend.context import Cancelled, JobContext
from backend.jobs import JOBS
from backend.jobs.base import run_job
from backend.protocol import JobError, JobResult

DATA = ROOT / "tests" / "data" / "pansharpening"
PAN = DATA / "spacenet6" / "pan.tif"
MS = DATA / "spacenet6" / "ms.tif"
METHODS = ("brovey", "gsa", "mtf_glp_hpm")
BAND_NAMES = ("blue", "green", "red", "nir")


def run(job: str, ctx: JobContext | None = None, **params) -> JobResult:
    spec = JOBS[job]
    return run_job(spec, spec.validate(params), ctx or JobContext())


def classic(out_dir: Path, ctx: JobContext | None = None, **params) -> tuple[JobResult, Path]:
    params = {"pan": str(PAN), "ms": str(MS), "out_dir": str(out_dir)} | params
    result = run("pansharpen.classic", ctx, **params)
    (out,) = result.outputs
    assert out.key == "pansharpened" and out.kind == "raster" and out.style == ""
    return result, Path(out.path)


def write(path: Path, data: np.ndarray, **profile) -> Path:
    base = {"driver": "GTiff", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2]}
    with rasterio.open(path, "w", **(base | {"dtype": data.dtype.name} | profile)) as ds:
        ds.write(data)
    return path


def ms_uint16(tmp: Path, nodata_rows: int = 0) -> Path:
    """The SpaceNet-6 MS (11-bit values stored as float64) as uint16 with band names, optionally with
    its first rows set to a declared nodata value 0."""
    with rasterio.open(MS) as src:
        data, crs, tf = src.read().astype(np.uint16), src.crs, src.transform
    extra = {}
    if nodata_rows:
        data[:, :nodata_rows] = 0
        extra["nodata"] = 0
    path = write(tmp / "ms_u16.tif", data, crs=crs, transform=tf, **extra)
    with rasterio.open(path, "r+") as ds:
        ds.descriptions = BAND_NAMES
    return path


def reprojected(src_path: Path, dst_path: Path, crs: str, res: tuple[float, float] | None = None) -> Path:
    """src reprojected to `crs`: with `res` (x, y) given, pixels of that size; otherwise GDAL's default grid."""
    from rasterio.warp import calculate_default_transform

    with rasterio.open(src_path) as src:
        if res is None:
            tf, w, h = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        else:
            left, bottom, right, top = rasterio.warp.transform_bounds(src.crs, crs, *src.bounds)
            w, h = math.ceil((right - left) / res[0]), math.ceil((top - bottom) / res[1])
            tf = Affine(res[0], 0, left, 0, -res[1], top)
        profile = src.profile | {"crs": crs, "transform": tf, "width": w, "height": h, "nodata": 0}
        with rasterio.open(dst_path, "w", **profile) as dst:
            for b in range(1, src.count + 1):
                reproject(rasterio.band(src, b), rasterio.band(dst, b), resampling=Resampling.cubic, dst_nodata=0)
    return dst_path


def wv2_geotiffs(tmp: Path, georeferenced: bool = True) -> tuple[Path, Path]:
    """The WV2 crop (8 bands, ratio 4) as GeoTIFFs: a made-up UTM grid, MS pixel = 4 x PAN pixel."""
    with np.load(DATA / "wv2_crop.npz") as z:
        pan, ms = z["pan"], z["ms"]
    geo: dict = {}
    ms_geo: dict = {}
    if georeferenced:
        tf = Affine(0.5, 0, 500000, 0, -0.5, 4000000)
        geo = {"crs": "EPSG:32633", "transform": tf}
        ms_geo = {"crs": "EPSG:32633", "transform": tf * Affine.scale(4)}
    tag = "geo" if georeferenced else "plain"
    return write(tmp / f"wv2_pan_{tag}.tif", pan[None], **geo), write(tmp / f"wv2_ms_{tag}.tif", ms, **ms_geo)


def read(path: Path) -> tuple[np.ndarray, rasterio.profiles.Profile, np.ndarray]:
    with rasterio.open(path) as ds:
        return ds.read(), ds.profile, ds.read_masks(1) > 0


# --- classic: the grid, dtype and value scale ------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_output_is_exactly_on_the_pan_grid_with_the_ms_dtype(method: str, tmp_path: Path) -> None:
    hashes = {p: sha256(p) for p in (PAN, MS)}
    result, out = classic(tmp_path, method=method)
    data, profile, _ = read(out)
    with rasterio.open(PAN) as pan, rasterio.open(MS) as ms:
        assert profile["crs"] == pan.crs
        assert profile["transform"] == pan.transform  # the MS covers the whole PAN here
        assert (profile["width"], profile["height"]) == (pan.width, pan.height)
        assert profile["dtype"] == ms.dtypes[0] == "float64" and profile["count"] == ms.count == 4
        assert math.isnan(profile["nodata"])  # a float MS without nodata: NaN marks nodata
        ms_mean = ms.read().mean(axis=(1, 2))
    assert np.isfinite(data).all()
    # The MS's value scale (11-bit numbers), not a 0..1 range (Brovey follows the PAN's brightness a little).
    np.testing.assert_allclose(data.mean(axis=(1, 2)), ms_mean, rtol=0.2)
    assert result.metrics["ratio"] == 2 and result.metrics["valid_fraction"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == [f"pansharpened_{method}.tif"]
    assert {p: sha256(p) for p in hashes} == hashes  # inputs untouched


@pytest.mark.parametrize("method", METHODS)
def test_integer_ms_keeps_its_dtype_band_names_and_range(method: str, tmp_path: Path) -> None:
    ms = ms_uint16(tmp_path)
    _, out = classic(tmp_path / "out", ms=str(ms), method=method, ms_bands=[3, 2, 1])
    with rasterio.open(out) as ds:
        assert ds.dtypes == ("uint16",) * 3 and ds.nodata == 0
        assert ds.descriptions == ("red", "green", "blue")
        data = ds.read()
    with rasterio.open(ms) as src:
        ms_mean = src.read([3, 2, 1]).mean(axis=(1, 2))
    # Brovey (as GDAL's) takes the PAN's brightness, here that of the visible bands' sum: brighter.
    np.testing.assert_allclose(data.mean(axis=(1, 2)), ms_mean, rtol=0.5 if method == "brovey" else 0.1)
    assert data.max() <= 4095  # 11-bit data: clipped and rounded, no wrap-around


@pytest.mark.parametrize("method", METHODS)
def test_tile_size_does_not_change_the_result(method: str, tmp_path: Path) -> None:
    """Tiles are computed with enough context for the filters: no seams, whatever the tile size."""
    _, small = classic(tmp_path / "a", method=method, tile_size=96)
    _, large = classic(tmp_path / "b", method=method, tile_size=512)
    a, _, _ = read(small)
    b, _, _ = read(large)
    assert np.abs(a - b).max() <= 1.0  # within one unit of the 11-bit data (in fact equal up to rounding)


def test_ms_in_another_crs_lands_on_the_pan_grid(tmp_path: Path) -> None:
    ms = ms_uint16(tmp_path)
    _, same = classic(tmp_path / "same", ms=str(ms))
    # The MS in geographic coordinates with ~1 m pixels: the ratio is still detected (pixel areas).
    with rasterio.open(ms) as src:
        cx, cy = src.xy(src.height // 2, src.width // 2)
        lon, lat = transform(src.crs, "EPSG:4326", [cx, cx + 1, cx], [cy, cy, cy + 1])
    geo = reprojected(ms, tmp_path / "ms_4326.tif", "EPSG:4326", (lon[1] - lon[0], lat[2] - lat[0]))
    ctx = JobContext()
    _, moved = classic(tmp_path / "moved", ctx, ms=str(geo))
    a, profile, _ = read(same)
    b, profile_b, valid = read(moved)
    with rasterio.open(PAN) as pan:
        assert profile_b["crs"] == pan.crs and profile_b["transform"] == pan.transform
        assert (profile_b["width"], profile_b["height"]) == (pan.width, pan.height)
    assert ctx.warnings == []
    inner = (slice(16, -16), slice(16, -16))
    assert valid[inner].all()
    dy, dx = feature_offset(a[3][inner].astype(float), b[3][inner].astype(float))
    assert abs(dy) < 0.5 and abs(dx) < 0.5  # PAN pixels
    # Resampled twice, the colours stay close.
    assert np.abs(a[:, 16:-16, 16:-16].astype(float) - b[:, 16:-16, 16:-16]).mean() < 0.05 * a.mean()
    # GDAL's default grid in degrees has non-square ground pixels: the ratio must be set, then it works.
    square = reprojected(ms, tmp_path / "ms_4326_default.tif", "EPSG:4326")
    with pytest.raises(JobError, match="integer ratio"):
        classic(tmp_path / "square", ms=str(square))
    _, out = classic(tmp_path / "square", JobContext(), ms=str(square), ratio=2)
    with rasterio.open(out) as ds:
        assert ds.crs == profile["crs"] and ds.transform == profile["transform"]


def test_ms_already_resampled_to_the_pan_grid_needs_the_ratio(tmp_path: Path) -> None:
    with rasterio.open(PAN) as pan, rasterio.open(MS) as src:
        profile = src.profile | {"width": pan.width, "height": pan.height, "transform": pan.transform}
        on_pan = tmp_path / "ms_on_pan.tif"
        with rasterio.open(on_pan, "w", **profile) as dst:
            for b in range(1, src.count + 1):
                reproject(rasterio.band(src, b), rasterio.band(dst, b), resampling=Resampling.cubic)
    with pytest.raises(JobError, match="same pixel size") as exc:
        classic(tmp_path / "a", ms=str(on_pan))
    assert "set the ratio" in exc.value.hint
    _, out = classic(tmp_path / "b", ms=str(on_pan), ratio=2)
    _, direct = classic(tmp_path / "c")
    np.testing.assert_allclose(read(out)[0], read(direct)[0], atol=1e-6)  # the same cubic resampling either way


def test_ms_nodata_stays_nodata_and_the_aoi_limits_the_output(tmp_path: Path) -> None:
    ms = ms_uint16(tmp_path, nodata_rows=16)  # 16 MS rows = 32 PAN rows of nodata
    _, out = classic(tmp_path / "nd", ms=str(ms))
    data, profile, valid = read(out)
    assert profile["nodata"] == 0
    assert not valid[:31].any() and valid[33:].all()
    assert (data[:, 33:] > 0).all()  # a valid pixel never takes the nodata value
    # An AOI: a triangle over the lower-left part of the PAN.
    with rasterio.open(PAN) as pan:
        tf, crs = pan.transform, pan.crs
    aoi = tmp_path / "aoi.gpkg"
    corners = [tf * (20, 100), tf * (200, 240), tf * (20, 240)]
    with fiona.open(aoi, "w", driver="GPKG", crs=crs.to_wkt(), schema={"geometry": "Polygon", "properties": {}}) as f:
        f.write({"geometry": mapping(Polygon(corners)), "properties": {}})
    _, out = classic(tmp_path / "aoi", aoi=str(aoi), method="gsa")
    with rasterio.open(out) as ds:
        assert (ds.width, ds.height) == (180, 140)
        assert ds.transform.c == pytest.approx((tf * (20, 100))[0])
        inside = ds.read_masks(1) > 0
    assert inside[-5, 5] and not inside[5, -5]


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the test's own files
def test_non_georeferenced_pair_works_in_pixel_space_with_a_warning(tmp_path: Path) -> None:
    pan, ms = wv2_geotiffs(tmp_path, georeferenced=False)
    ctx = JobContext()
    result, out = classic(tmp_path / "out", ctx, pan=str(pan), ms=str(ms), sensor="WV2")
    assert result.metrics["ratio"] == 4
    assert any("not georeferenced" in w for w in ctx.warnings)
    with rasterio.open(out) as ds:
        assert ds.crs is None and (ds.width, ds.height) == (256, 256) and ds.count == 8 and ds.dtypes[0] == "uint16"


# --- classic: errors, cancel, CLI ------------------------------------------------------------------------


def bad_inputs(tmp: Path) -> dict[str, tuple[dict, str]]:
    with rasterio.open(MS) as src:
        data, crs, tf = src.read(), src.crs, src.transform
    far = write(tmp / "far.tif", data, crs=crs, transform=Affine.translation(10_000, 0) * tf)
    # The MS resampled to 3.3 x the PAN pixel (1.65 m).
    coarse = tmp / "ms_165.tif"
    with rasterio.open(MS) as src:
        w, h = int(src.width / 1.65 * 1.0000483), int(src.height / 1.65 * 1.0000483)
        dst_tf = Affine(0.5 * 3.3, 0, tf.c, 0, -0.5 * 3.3, tf.f)
        with rasterio.open(coarse, "w", **(src.profile | {"width": w, "height": h, "transform": dst_tf})) as dst:
            for b in range(1, src.count + 1):
                reproject(rasterio.band(src, b), rasterio.band(dst, b), resampling=Resampling.average)
    with rasterio.open(PAN) as src:
        three = write(tmp / "pan3.tif", np.repeat(src.read(), 3, axis=0), crs=src.crs, transform=src.transform)
        ms_band = tmp / "ms_band1.tif"
    with rasterio.open(MS) as src:
        write(ms_band, src.read([1]), crs=src.crs, transform=src.transform)
    return {
        "no overlap": ({"ms": str(far)}, "do not overlap"),
        "non-integer ratio": (
            {"ms": str(coarse)},
            "The MS pixel is 3.3 times the PAN pixel; pansharpening needs an integer ratio (2, 4 …)",
        ),
        "three-band PAN": ({"pan": str(three)}, "The PAN raster has 3 bands"),
        "MS finer than PAN": ({"pan": str(ms_band), "ms": str(PAN)}, "coarser than the PAN"),
        "wrong sensor": ({"sensor": "WV2", "ms_bands": [1, 2, 3, 4, 1, 2, 3]}, "has 8 MS bands"),
    }


@pytest.mark.parametrize(
    "case", ["no overlap", "non-integer ratio", "three-band PAN", "MS finer than PAN", "wrong sensor"]
)
def test_bad_input_is_a_clear_error_with_no_output(case: str, tmp_path: Path) -> None:
    params, message = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(JobError) as exc:
        classic(out, **params)
    assert exc.value.code == "INVALID_INPUT" and message in exc.value.message, exc.value.message
    assert not out.exists()  # the folder the job created is removed with its partial files


def test_cancel_leaves_no_output(tmp_path: Path) -> None:
    """Cancelled between tiles (the output file is already being written): nothing is left."""
    ctx = JobContext()
    seen: list[str] = []

    def on_progress(fraction: float, stage: str, message: str) -> None:
        seen.append(message)
        ctx.cancel_event.set()  # the next tile's progress check stops the job

    ctx.on_progress = on_progress
    with pytest.raises(Cancelled):
        classic(tmp_path, ctx, method="brovey", tile_size=64)
    assert seen == ["tile 1/16"]
    assert list(tmp_path.iterdir()) == []


def test_cli_runs_the_job(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "backend",
            "pansharpen.classic",
            "--pan",
            str(PAN),
            "--ms",
            str(MS),
            "--out-dir",
            str(tmp_path),
            "--method",
            "brovey",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    (out,) = result["outputs"]
    assert Path(out["path"]) == tmp_path / "pansharpened_brovey.tif" and out["key"] == "pansharpened"
    with rasterio.open(out["path"]) as ds:
        assert ds.count == 4 and ds.crs.to_epsg() == 32631


# --- evaluate ------------------------------------------------------------------------------------------------


def test_evaluate_wv2_mtf_glp_hpm_beats_plain_interpolation(tmp_path: Path) -> None:
    pan, ms = wv2_geotiffs(tmp_path)
    ctx = JobContext()
    logs: list[str] = []
    ctx.on_log = lambda level, message, data=None: logs.append(message)
    m = run("pansharpen.evaluate", ctx, pan=str(pan), ms=str(ms), method="mtf_glp_hpm", sensor="WV2").metrics
    assert m["ratio"] == 4 and (m["window_width"], m["window_height"]) == (256, 256)
    assert m["rr_method_q2n"] > m["rr_exp_q2n"] + 0.1
    assert m["rr_method_ergas"] < m["rr_exp_ergas"] and m["rr_method_scc"] > m["rr_exp_scc"]
    assert 0 < m["fr_method_hqnr"] <= 1 and m["fr_method_d_s"] < m["fr_exp_d_s"]
    assert any("centre window of 256 x 256 PAN pixels" in line for line in logs)
    # The classic job's own output, scored at full resolution.
    _, fused = classic(tmp_path / "out", pan=str(pan), ms=str(ms), sensor="WV2")
    m2 = run("pansharpen.evaluate", pan=str(pan), ms=str(ms), fused=str(fused), sensor="WV2").metrics
    assert 0.7 < m2["fused_hqnr"] <= 1 and 0 <= m2["fused_d_lambda"] < 0.1 and "rr_method_q2n" not in m2


def test_evaluate_window_is_limited_by_max_size(tmp_path: Path) -> None:
    ctx = JobContext()
    m = run("pansharpen.evaluate", ctx, pan=str(PAN), ms=str(MS), method="gsa", max_size=102).metrics
    assert (m["window_width"], m["window_height"]) == (100, 100)  # a multiple of ratio^2 = 4
    assert all(isinstance(v, (int, float, str)) for v in m.values())
    with pytest.raises(JobError, match="Nothing to evaluate"):
        run("pansharpen.evaluate", pan=str(PAN), ms=str(MS))
