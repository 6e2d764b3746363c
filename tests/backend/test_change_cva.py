"""change.cva through the whole pipe on georeferenced LEVIR-CD pairs, and its bad-input handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from conftest import ROOT, levir, sha256
from test_raster_io import reproject_file

from backend.context import JobContext
from backend.jobs import JOBS
from backend.jobs.base import run_job
from backend.methods.cva import otsu_threshold
from backend.protocol import JobError


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def run_cva(**params) -> tuple[JobContext, object]:
    spec = JOBS["change.cva"]
    ctx = JobContext()
    return ctx, run_job(spec, spec.validate(params), ctx)


@pytest.mark.parametrize("pair", ["test_1", "test_2_0000_0512", "test_55_0256_0000"])
def test_cva_on_levir_writes_georeferenced_outputs_and_scores(pair: str, tmp_path: Path) -> None:
    before, after, ref = levir(pair)
    proc = cli(
        "change.cva",
        "--before",
        str(before),
        "--after",
        str(after),
        "--reference",
        str(ref),
        "--out-dir",
        str(tmp_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    m = result["metrics"]
    assert 0 < m["f1"] <= 1 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    paths = {o["layer_name"].split(" ", 1)[1]: Path(o["path"]) for o in result["outputs"]}
    with (
        rasterio.open(before) as src,
        rasterio.open(paths["change probability"]) as prob,
        rasterio.open(paths["change mask"]) as mask,
    ):
        assert prob.crs == src.crs == mask.crs
        assert prob.transform.almost_equals(src.transform) and (prob.width, prob.height) == (src.width, src.height)
        p, k = prob.read(1), mask.read(1)
    assert ((p >= 0) & (p <= 1)).all()
    assert np.array_equal(k == 1, p > 0.5)  # the mask is the probability thresholded at 0.5
    assert m["changed_pixels"] == int((k == 1).sum())
    with fiona.open(paths["changes"]) as gpkg:
        assert gpkg.crs.to_epsg() == 4326 and len(gpkg) == m["polygons"] > 0
        f = next(iter(gpkg))
        assert f.properties["area_m2"] > 0 and 0.5 <= f.properties["confidence"] <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(x.name for x in paths.values())


def test_cva_with_after_in_another_crs(tmp_path: Path) -> None:
    before, after, ref = levir("test_1")
    after_utm = tmp_path / "after_utm.tif"
    reproject_file(after, after_utm, "EPSG:32614")
    _, same = run_cva(before=str(before), after=str(after), reference=str(ref), out_dir=str(tmp_path / "a"))
    ctx, moved = run_cva(before=str(before), after=str(after_utm), reference=str(ref), out_dir=str(tmp_path / "b"))
    with rasterio.open(moved.outputs[1].path) as ds:
        assert ds.crs.to_epsg() == 4326  # outputs stay on the before grid
    # Resampling twice blurs a little; the detection must stay about as good.
    assert moved.metrics["f1"] == pytest.approx(same.metrics["f1"], abs=0.05)
    assert ctx.warnings == []


def test_inputs_are_never_modified(tmp_path: Path) -> None:
    before, after, ref = levir("test_2_0000_0000")
    hashes = {p: sha256(p) for p in (before, after, ref)}
    run_cva(before=str(before), after=str(after), reference=str(ref), out_dir=str(tmp_path))
    assert {p: sha256(p) for p in hashes} == hashes


def test_an_output_name_that_would_replace_an_input_is_refused(tmp_path: Path) -> None:
    before, after, _ = levir("test_2_0000_0000")
    victim = tmp_path / "cva_change_mask.tif"
    victim.write_bytes(Path(after).read_bytes())
    with pytest.raises(JobError, match="overwrite one of the inputs"):
        run_cva(before=str(before), after=str(victim), out_dir=str(tmp_path))
    assert victim.read_bytes() == Path(after).read_bytes()


def _write(path: Path, data: np.ndarray, **extra) -> Path:
    profile = dict(
        driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype.name
    )
    with rasterio.open(path, "w", **(profile | extra)) as ds:
        ds.write(data)
    return path


def bad_inputs(tmp: Path) -> dict[str, tuple[dict, str]]:
    before, after, _ = levir("test_2_0000_0000")
    other, _, _ = levir("test_77_0512_0256")
    with rasterio.open(before) as src:
        # MINISBLACK: a fourth data band (GDAL would call a 4th byte band alpha and leave it out by default).
        four = _write(
            tmp / "four.tif",
            np.concatenate([src.read(), src.read(1)[None]]),
            crs=src.crs,
            transform=src.transform,
            photometric="minisblack",
        )
    text = tmp / "notes.tif"
    text.write_text("not a raster")
    return {
        "missing file": ({"before": str(tmp / "nope.tif"), "after": str(after)}, "does not exist"),
        "not a raster": ({"before": str(before), "after": str(text)}, "not a raster"),
        "no overlap": ({"before": str(before), "after": str(other)}, "do not overlap"),
        "band count": ({"before": str(before), "after": str(four)}, "3 band(s) to compare but the after raster has 4"),
        "missing band": ({"before": str(before), "after": str(after), "bands": [1, 5]}, "band(s) 5 do not exist"),
    }


@pytest.mark.parametrize("case", ["missing file", "not a raster", "no overlap", "band count", "missing band"])
def test_bad_input_is_a_clear_error_with_no_output(case: str, tmp_path: Path) -> None:
    params, message = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    flags = []
    for k, v in params.items():
        flags += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, list) else v]
    proc = cli("change.cva", *flags, "--out-dir", str(out))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_non_georeferenced_pair_works_in_pixel_space_with_a_warning(tmp_path: Path) -> None:
    before, after, ref = levir("test_2_0000_0000")
    plain = {}
    for name, p in (("a", before), ("b", after), ("r", ref)):
        with rasterio.open(p) as src:
            plain[name] = _write(tmp_path / f"{name}.tif", src.read())
    _, result = run_cva(
        before=str(plain["a"]), after=str(plain["b"]), reference=str(plain["r"]), out_dir=str(tmp_path / "o")
    )
    assert any("not georeferenced" in w for w in result.warnings)
    assert result.metrics["f1"] > 0
    with rasterio.open(result.outputs[0].path) as ds:
        assert ds.crs is None
    with fiona.open(result.outputs[2].path) as gpkg:
        assert len(gpkg) > 0


def test_fixed_threshold_and_otsu() -> None:
    hist = np.array([0, 10, 50, 10, 0, 0, 0, 5, 20, 5, 0], dtype=np.int64)
    edges = np.arange(12, dtype=float)
    t = otsu_threshold(hist, edges)
    assert 4 <= t <= 7  # between the two modes


def test_cli_info_and_help() -> None:
    proc = cli("info")
    assert proc.returncode == 0 and "torch" in proc.stdout and "device cpu" in proc.stdout
    info = json.loads(cli("info", "--json").stdout)
    assert info["devices"][0]["type"] == "cpu"
    help_text = cli("change.cva", "--help").stdout
    for flag in ("--before", "--after", "--out-dir", "--tile-size", "--overlap", "--batch-size", "--json"):
        assert flag in help_text


def test_ctrl_c_cancels_cleanly(tmp_path: Path) -> None:
    before, after, _ = levir("test_1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backend",
            "change.cva",
            "--before",
            str(before),
            "--after",
            str(after),
            "--out-dir",
            str(tmp_path),
            "--tile-size",
            "32",
            "--overlap",
            "16",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    # The first progress line: the job runs (an event, not a fixed sleep: a loaded machine must not fail this).
    assert any("%" in line for line in iter(proc.stderr.readline, ""))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "cancelled" in err.lower() and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_start_up_is_a_plain_cancel() -> None:
    """SIGINT while `python -m backend` is still importing (before any handler of ours) ends with a message."""
    # An import hook sends the signal at the moment backend.cli starts loading: no race, no sleep.
    code = (
        "import os, runpy, signal, sys\n"
        "class Hook:\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'backend.cli':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Hook())\n"
        "sys.argv = ['backend', 'models', 'list']\n"
        "runpy.run_module('backend', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Cancelled." in proc.stderr and "Traceback" not in proc.stderr


def test_errors_show_a_traceback_only_with_debug(tmp_path: Path) -> None:
    args = ("change.cva", "--before", "/nope.tif", "--after", "/nope2.tif", "--out-dir", str(tmp_path))
    assert "Traceback" not in cli(*args).stderr
    assert "Traceback" in cli(*args, "--debug").stderr


def test_aoi_limits_the_outputs_to_its_polygon(tmp_path: Path) -> None:
    """An AOI crops the output grid to its bounding box and leaves pixels outside the polygon as nodata."""
    import fiona
    from shapely.geometry import Polygon, mapping

    before, after, _ = levir("test_2_0000_0512")
    with rasterio.open(before) as src:
        crs, tf = src.crs, src.transform
    # A triangle over the upper-left quarter, in map coordinates.
    corners = [tf * (10, 10), tf * (138, 10), tf * (10, 138)]
    aoi = tmp_path / "aoi.gpkg"
    schema = {"geometry": "Polygon", "properties": {}}
    with fiona.open(aoi, "w", driver="GPKG", crs=crs.to_wkt(), schema=schema) as dst:
        dst.write({"geometry": mapping(Polygon(corners)), "properties": {}})
    _, result = run_cva(before=str(before), after=str(after), out_dir=str(tmp_path / "out"), aoi=str(aoi))
    prob = next(o.path for o in result.outputs if o.key == "probability")
    with rasterio.open(prob) as ds:
        assert (ds.width, ds.height) == (128, 128)
        assert ds.transform.c == pytest.approx((tf * (10, 10))[0])
        valid = ds.read_masks(1) > 0
    assert valid[5, 5] and not valid[120, 120]  # inside vs outside the triangle's hypotenuse
    assert 0.4 < valid.mean() < 0.6


def test_alpha_band_is_a_mask_not_a_band_by_default(tmp_path: Path) -> None:
    from rasterio.windows import Window

    from backend.io.raster import RasterSource

    before, _, _ = levir("test_2_0000_0000")
    with rasterio.open(before) as src:
        rgb, profile = src.read(), src.profile
    alpha = np.full(rgb.shape[1:], 255, np.uint8)
    alpha[:10] = 0
    rgba = tmp_path / "rgba.tif"
    with rasterio.open(rgba, "w", **(profile | {"count": 4, "photometric": "RGB", "alpha": "YES"})) as ds:
        ds.write(np.concatenate([rgb, alpha[None]]))
    with RasterSource(rgba) as source:
        assert source.bands == [1, 2, 3]
        _, valid = source.read(Window(0, 0, 64, 64))
    assert not valid[:10].any() and valid[10:].all()
