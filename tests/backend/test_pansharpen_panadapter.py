"""pansharpen.finetune and pansharpen.apply on real pairs: the georeferenced SpaceNet-6 crop (ratio 2, 4 bands) and
the WorldView-2 crop (ratio 4, 8 bands, no georeferencing).

The IPT/EDSR checkpoints cannot be downloaded here, so these run the small "tiny" PanAdapter with random frozen
weights (allow_random_backbone): the jobs, the protocol and the raster plumbing are what is tested; the real
architecture's training is covered in test_panadapter_model.py and measured in bench/eval_pansharpen.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import ROOT, sha256
from rasterio.enums import Resampling
from rasterio.warp import reproject
from test_pansharpen_jobs import MS, PAN, bad_inputs, ms_uint16, run, wv2_geotiffs

from backend import adapters
from backend.context import Cancelled, JobContext
from backend.protocol import JobError, JobResult

FAST = {"backbone": "tiny", "allow_random_backbone": True, "steps_per_epoch": 10}


class Recorder:
    """A job context that keeps the progress stages and the epoch records."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.epochs: list[dict] = []
        self.ctx = JobContext()
        self.ctx.on_progress = lambda fraction, stage, message: self.stages.append(stage)
        self.ctx.on_log = self._log

    def _log(self, level: str, message: str, data: dict | None = None) -> None:
        if level == "epoch":
            self.epochs.append(data or {})


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("adapters")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RS_PEFT_QGIS_ADAPTER_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def sn6(library: Path) -> tuple[JobResult, Recorder]:
    """A tiny adapter fine-tuned on the SpaceNet-6 crop: 4 epochs of stage 1, 2 of stage 2."""
    rec = Recorder()
    params = {"pan": str(PAN), "ms": str(MS), "adapter_name": "sn6", "prior_epochs": 4, "adapter_epochs": 2}
    return run("pansharpen.finetune", rec.ctx, **(FAST | params)), rec


def apply(out_dir: Path, ctx: JobContext | None = None, **params) -> tuple[JobResult, Path]:
    params = {"pan": str(PAN), "ms": str(MS), "adapter": "sn6", "out_dir": str(out_dir)} | params
    result = run("pansharpen.apply", ctx, **params)
    (out,) = result.outputs
    assert out.key == "pansharpened" and out.kind == "raster"
    return result, Path(out.path)


# --- fine-tune ----------------------------------------------------------------------------------------------


def test_finetune_runs_both_stages_and_saves_the_adapter(sn6: tuple[JobResult, Recorder]) -> None:
    result, ctx = sn6
    m = result.metrics
    meta = adapters.read_meta("sn6")
    assert meta.method == "panadapter" and meta.backbone == "tiny" and meta.checkpoint_sha256 is None
    assert meta.bands == [1, 2, 3, 4] and meta.config["ratio"] == 2 and meta.config["dtype"] == "float64"
    assert meta.config["random_backbone_seed"] == 0  # random frozen weights: rebuilt from this seed when applying
    assert meta.normalization["ms_scale"][0] > 100  # 11-bit values: the scale is a real peak, not 1
    # Progress per stage, stage 1 first; an epoch record per epoch with the validation indices.
    first = [s for s in dict.fromkeys(ctx.stages) if s.startswith("stage")]
    assert first == ["stage 1/2: local priors", "stage 2/2: adapters"]
    assert [(e["stage"], e["epoch"]) for e in ctx.epochs] == [("prior", i) for i in (1, 2, 3, 4)] + [
        ("adapter", 1),
        ("adapter", 2),
    ]
    assert set(ctx.epochs[0]) == {"stage", "epoch", "loss", "val_q2n", "val_sam", "val_ergas", "val_psnr"}
    best = max(e["val_q2n"] for e in ctx.epochs)
    assert m["val_q2n"] == pytest.approx(best)
    assert (m["best_stage"], m["best_epoch"]) in [(e["stage"], e["epoch"]) for e in ctx.epochs if e["val_q2n"] == best]
    # Learning happened: the kept model is better than its start, the interpolated MS (measured: +0.0011 Q2n).
    assert m["val_q2n"] > m["val_start_q2n"] + 5e-4
    assert m["trainable_parameters_adapter"] > m["trainable_parameters_prior"] > 0


def test_finetune_refuses_an_existing_name_and_bad_settings(sn6: tuple[JobResult, Recorder]) -> None:
    base = FAST | {"pan": str(PAN), "ms": str(MS)}
    cases = {
        "already exists": {"adapter_name": "sn6"},
        "not both zero": {"adapter_name": "x", "prior_epochs": 0, "adapter_epochs": 0},
        "multiple of the ratio": {"adapter_name": "x", "patch_size": 33},
        "too small to keep a validation strip": {"adapter_name": "x", "max_size": 128},
        "no official weights": {"adapter_name": "x", "allow_random_backbone": False},
    }
    for message, params in cases.items():
        with pytest.raises(JobError) as err:
            run("pansharpen.finetune", **(base | params))
        assert err.value.code == "INVALID_INPUT" and message in err.value.message, err.value.message
    assert [a["name"] for a in adapters.list_adapters()] == ["sn6"]


@pytest.mark.parametrize("case", ["no overlap", "non-integer ratio", "three-band PAN"])
def test_finetune_and_apply_give_clear_errors_for_a_bad_pair(case: str, sn6, tmp_path: Path) -> None:
    params, message = bad_inputs(tmp_path)[case]
    with pytest.raises(JobError) as err:
        run("pansharpen.finetune", **(FAST | {"pan": str(PAN), "ms": str(MS), "adapter_name": "bad"} | params))
    assert message in err.value.message
    with pytest.raises(JobError) as err:
        apply(tmp_path / "out", **params)
    assert message in err.value.message
    assert not (tmp_path / "out").exists()  # the folder the job created is removed again
    assert "bad" not in [a["name"] for a in adapters.list_adapters()]


def test_cancelled_finetune_saves_nothing(sn6) -> None:
    ctx = JobContext()
    ctx.on_log = lambda level, message, data=None: ctx.cancel_event.set() if level == "epoch" else None
    with pytest.raises(Cancelled):
        run("pansharpen.finetune", ctx, **(FAST | {"pan": str(PAN), "ms": str(MS), "adapter_name": "stopped"}))
    assert "stopped" not in [a["name"] for a in adapters.list_adapters()]


# --- apply --------------------------------------------------------------------------------------------------


def test_apply_output_is_exactly_on_the_pan_grid_with_the_ms_dtype(sn6, tmp_path: Path) -> None:
    hashes = {p: sha256(p) for p in (PAN, MS)}
    result, out = apply(tmp_path)
    with rasterio.open(out) as ds, rasterio.open(PAN) as pan, rasterio.open(MS) as ms:
        assert (ds.crs, ds.transform, ds.width, ds.height) == (pan.crs, pan.transform, pan.width, pan.height)
        assert ds.dtypes == ms.dtypes and ds.count == ms.count == 4
        data, ms_mean = ds.read(), ms.read().mean(axis=(1, 2))
    assert np.isfinite(data).all()
    np.testing.assert_allclose(data.mean(axis=(1, 2)), ms_mean, rtol=0.05)  # the MS's value scale
    assert result.metrics["ratio"] == 2 and result.metrics["valid_fraction"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["panadapter.tif"]
    assert {p: sha256(p) for p in hashes} == hashes


def test_apply_keeps_an_integer_dtype_nodata_and_band_names(sn6, tmp_path: Path) -> None:
    ms = ms_uint16(tmp_path, nodata_rows=20)
    _, out = apply(tmp_path / "out", ms=str(ms))
    with rasterio.open(out) as ds:
        assert ds.dtypes == ("uint16",) * 4 and ds.nodata == 0
        assert ds.descriptions == ("blue", "green", "red", "nir")
        valid = ds.read_masks(1) > 0
    assert not valid[:38].any() and valid[42:].all()  # 20 MS rows = 40 PAN rows of nodata, cubic-free edge


def test_blended_tiles_stay_close_to_one_whole_tile(sn6, tmp_path: Path) -> None:
    _, whole = apply(tmp_path / "a", tile_size=256, overlap=0)
    _, blended = apply(tmp_path / "b", tile_size=128, overlap=32)
    _, butted = apply(tmp_path / "c", tile_size=128, overlap=0)  # tiles side by side, nothing blended
    with rasterio.open(whole) as a, rasterio.open(blended) as b, rasterio.open(butted) as c:
        x, y, z = a.read(), b.read(), c.read()
    span = x.max() - x.min()
    blend, butt = np.abs(x - y) / span, np.abs(x - z) / span
    # Measured with the tiny adapter: blended mean 2.6e-5 (max 8e-3) of the data range, butted 5.2e-5 (1.1e-2).
    assert blend.mean() < 1e-4 and blend.max() < 0.02
    assert blend.mean() < 0.75 * butt.mean()


def test_apply_refuses_another_ratio_another_method_and_other_bands(sn6, tmp_path: Path) -> None:
    coarse = tmp_path / "ms_ratio4.tif"  # the SpaceNet-6 MS aggregated to 2 m: ratio 4 under the 0.5 m PAN
    with rasterio.open(MS) as src:
        tf = src.transform * Affine.scale(2)
        profile = src.profile | {"width": src.width // 2, "height": src.height // 2, "transform": tf}
        with rasterio.open(coarse, "w", **profile) as dst:
            for b in range(1, 5):
                reproject(rasterio.band(src, b), rasterio.band(dst, b), resampling=Resampling.average)
    cases = {
        "was trained at ratio 2, but this pair has ratio 4": {"ms": str(coarse)},
        "expects 4 band(s)": {"ms_bands": [1, 2, 3]},
        "There is no adapter named": {"adapter": "missing"},
    }
    for message, params in cases.items():
        with pytest.raises(JobError) as err:
            apply(tmp_path / "out", **params)
        assert err.value.code == "INVALID_INPUT" and message in err.value.message, err.value.message
    adapters.save("not_pan", {}, adapters.AdapterMeta("filf", "mobile_sam", None, [1, 2, 3], {}))
    with pytest.raises(JobError, match="trained for filf, not for PanAdapter"):
        apply(tmp_path / "out", adapter="not_pan")
    adapters.delete("not_pan")
    assert not (tmp_path / "out").exists()


def test_cancelled_apply_leaves_no_output(sn6, tmp_path: Path) -> None:
    ctx = JobContext()
    ctx.on_progress = lambda fraction, stage, message: ctx.cancel_event.set() if message.startswith("tile 1/") else None
    with pytest.raises(Cancelled):
        apply(tmp_path, ctx, tile_size=128, overlap=32, batch_size=1)
    assert list(tmp_path.iterdir()) == []


def test_wv2_without_georeferencing_ratio_4_and_8_bands(library: Path, tmp_path: Path) -> None:
    pan, ms = wv2_geotiffs(tmp_path, georeferenced=False)
    params = {"pan": str(pan), "ms": str(ms), "adapter_name": "wv2", "sensor": "WV2", "patch_size": 32}
    result = run("pansharpen.finetune", **(FAST | params | {"prior_epochs": 1, "adapter_epochs": 1}))
    assert result.metrics["adapter"] == "wv2" and adapters.read_meta("wv2").config["ratio"] == 4
    _, out = apply(tmp_path / "out", pan=str(pan), ms=str(ms), adapter="wv2")
    with rasterio.open(out) as ds, rasterio.open(pan) as p:
        assert ds.crs is None and (ds.width, ds.height) == (p.width, p.height)
        assert ds.count == 8 and ds.dtypes == ("uint16",) * 8
        assert 100 < ds.read().mean() < 2047


def test_cli_fine_tunes_and_applies(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RS_PEFT_QGIS_ADAPTER_DIR": str(tmp_path / "lib")}

    def cli(*args: str) -> dict:
        proc = subprocess.run(
            [sys.executable, "-m", "backend", *args, "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    common = ["--pan", str(PAN), "--ms", str(MS)]
    tuned = cli(
        "pansharpen.finetune",
        *common,
        "--adapter-name",
        "cli",
        "--backbone",
        "tiny",
        "--allow-random-backbone",
        "--prior-epochs",
        "1",
        "--adapter-epochs",
        "1",
        "--steps-per-epoch",
        "2",
    )
    assert tuned["metrics"]["adapter"] == "cli" and (tmp_path / "lib" / "cli" / "adapter.safetensors").is_file()
    applied = cli("pansharpen.apply", *common, "--adapter", "cli", "--out-dir", str(tmp_path / "out"))
    assert Path(applied["outputs"][0]["path"]) == tmp_path / "out" / "panadapter.tif"
