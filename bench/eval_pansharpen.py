"""Held-out evaluation of PanAdapter against Brovey, GSA, MTF-GLP-HPM and Z-PNN on real PAN + MS scenes.

Each scene is split along its columns into a left half (training) and a right half (test), on whole MS pixels,
both halves' MS widths divisible by the ratio. PanAdapter runs through the real jobs, in-process:
`pansharpen.finetune` on the left half, then `pansharpen.apply` on the right half, (a) Wald-degraded (reduced
resolution: Q2n, SAM, ERGAS, SCC, PSNR against the half's original MS) and (b) as it is (full resolution:
D_lambda, D_s, HQNR). The classical methods, 23-tap interpolation (EXP) and Z-PNN (the authors' pretrained
weights, applied directly unless --zpnn-adapt) get exactly the same inputs.

Scenes: the GRIP-UNINA WorldView-2, GeoEye-1 (8-bit) and IKONOS samples (ratio 4, no georeferencing: written as
plain GeoTIFFs that the jobs match in pixel space) and the three SpaceNet-6 WorldView-2 pairs (4 bands, ratio 2,
georeferenced; their rows of nodata zeros are cut off first). Z-PNN normalises by 2**bits of each scene; IKONOS
and SpaceNet-6 get the GE1 weights (the only 4-band ones) as a cross-sensor peer.

The IPT/EDSR checkpoints cannot be downloaded on an offline machine; the script then allows random frozen
IPT/EDSR weights, and prints and records that.

    python -m bench.eval_pansharpen [--scenes WV2 GE1 IKONOS SN6-1 SN6-2 SN6-3] [--backbone ipt|tiny]
                                    [--prior-epochs 10 --adapter-epochs 10 --steps 50] [--device auto]
                                    [--max-size 1024] [--out bench/results/eval_pansharpen.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "data"
ZPNN_WEIGHTS = DATA / "weights" / "z_pnn"

MAT = "pansharpening/grip_unina_pnn_samples"
SN6 = "pansharpening/spacenet6_solaris"
# WorldView-2 Nyquist gains of the bands SpaceNet-6 keeps (B, G, R, NIR1 by its source notes; all 0.35 in the
# toolbox's WV2 table) and of the WV2 PAN. The jobs' sensor list has only the 8-band WV2, so they get 'generic'.
SN6_GAINS = (0.35, 0.35, 0.35, 0.35)
SN6_PAN_GAIN = 0.11


@dataclass(frozen=True)
class SceneSource:
    """Where a scene comes from and which sensor settings and Z-PNN weights it gets."""

    kind: str  # "mat" (GRIP-UNINA samples, no georeferencing) or "tif" (SpaceNet-6 GeoTIFF pair)
    files: tuple[str, ...]  # relative to --data: the .mat, or (pan, ms)
    job_sensor: str  # `sensor` parameter of pansharpen.finetune
    zpnn: str | None  # Z-PNN weights (sensor) or None when no weights fit the band count
    zpnn_note: str


SCENES: dict[str, SceneSource] = {
    "WV2": SceneSource("mat", (f"{MAT}/imgWV2.mat",), "WV2", "WV2", "WV2 weights (same sensor)"),
    "GE1": SceneSource("mat", (f"{MAT}/imgGE1.mat",), "GeoEye1", "GE1", "GE1 weights (same sensor)"),
    "IKONOS": SceneSource(
        "mat", (f"{MAT}/imgIK.mat",), "IKONOS", "GE1", "GE1 weights (cross-sensor peer: no IKONOS Z-PNN weights)"
    ),
    **{
        f"SN6-{i}": SceneSource(
            "tif",
            (f"{SN6}/pan{i}.tif", f"{SN6}/ms{i}.tif"),
            "generic",
            "GE1",
            "GE1 weights (cross-sensor peer on WorldView-2, and trained at ratio 4, here ratio 2)",
        )
        for i in (1, 2, 3)
    },
}
METHODS = ("exp", "brovey", "gsa", "mtf_glp_hpm", "zpnn", "panadapter")


@dataclass
class Scene:
    """A PAN (H, W) + MS (C, h, w) pair in their stored dtypes, with H = ratio * h and W = ratio * w."""

    name: str
    pan: np.ndarray
    ms: np.ndarray
    ratio: int
    bits: int
    gains: np.ndarray  # MS Nyquist gains (Wald's protocol, MTF-GLP-HPM, D_lambda)
    pan_gain: float
    sensor: str | None = None  # the .mat scenes' sensor name (Wald's protocol by name); None for SpaceNet-6
    crs: Any = None  # SpaceNet-6 only: CRS and the MS grid's transform (the PAN's is the same at 1/ratio)
    ms_transform: Any = None


@dataclass(frozen=True)
class Half:
    """A window of the scene in MS pixels: rows [r0, r1), columns [c0, c1)."""

    r0: int
    r1: int
    c0: int
    c1: int

    def pan(self, ratio: int) -> tuple[slice, slice]:
        return slice(ratio * self.r0, ratio * self.r1), slice(ratio * self.c0, ratio * self.c1)

    def ms(self) -> tuple[slice, slice]:
        return slice(self.r0, self.r1), slice(self.c0, self.c1)


def split_halves(ms_height: int, ms_width: int, ratio: int, max_size: int | None = None) -> tuple[Half, Half]:
    """Left (train) and right (test) halves of an MS grid, both with sides divisible by `ratio`.

    Wald's protocol decimates each half's MS by the ratio again, so every side is cut down to a multiple of the
    ratio (leftover MS pixels are dropped at the right and bottom edges). With `max_size`, each half is cut to
    its centre window of at most `max_size` PAN pixels per side, still on whole MS pixels.
    """
    if ratio < 1 or ms_width < 2 * ratio or ms_height < ratio:
        raise ValueError(f"An MS of {ms_height} x {ms_width} pixels cannot be split into halves at ratio {ratio}.")
    units = ms_width // ratio
    left_w, right_w = (units // 2) * ratio, (units - units // 2) * ratio
    height = (ms_height // ratio) * ratio
    halves = (Half(0, height, 0, left_w), Half(0, height, left_w, left_w + right_w))
    if max_size is None:
        return halves
    side = (max_size // ratio // ratio) * ratio  # MS pixels: whole PAN windows, divisible by the ratio
    if side < ratio:
        raise ValueError(f"--max-size {max_size} leaves no whole MS pixels at ratio {ratio}.")
    out = []
    for h in halves:
        w_new, h_new = min(side, h.c1 - h.c0), min(side, h.r1 - h.r0)
        # Centre offsets rounded down to a multiple of the ratio, so the windows stay on the same MS lattice.
        dc = ((h.c1 - h.c0 - w_new) // 2) // ratio * ratio
        dr = ((h.r1 - h.r0 - h_new) // 2) // ratio * ratio
        out.append(Half(h.r0 + dr, h.r0 + dr + h_new, h.c0 + dc, h.c0 + dc + w_new))
    return out[0], out[1]


def fit_patch(half: Half, ratio: int, val_fraction: float = 0.2) -> int:
    """The largest training patch (64, 48, 32 or 16) for which pansharpen.finetune can keep its validation strip.

    The job learns at reduced resolution, where the half's PAN is as large as its MS; it keeps a strip of
    `val_fraction` of the longer side, of whole ratios and at least one patch, for validation.
    """
    from backend.methods.panadapter.training import validation_size

    short, long = sorted((half.r1 - half.r0, half.c1 - half.c0))
    for patch in (64, 48, 32, 16):
        if patch % ratio:
            continue
        val = validation_size(long, val_fraction, ratio, patch)
        if short >= patch and long - val >= patch:
            return patch
    raise ValueError(f"A training half of {short} x {long} MS pixels is too small for PanAdapter's patches.")


def load_scene(data: Path, name: str) -> Scene:
    """Read a scene: GRIP-UNINA .mat (I_PAN (H, W), I_MS (h, w, C), ratio, L bits) or a SpaceNet-6 pair."""
    from backend.methods.pansharpening_classic import band_gains, sensor_mtf

    src = SCENES[name]
    if src.kind == "mat":
        from scipy.io import loadmat

        mat = loadmat(data / src.files[0])
        sensor = str(mat["sensor"][0])
        ms = np.ascontiguousarray(mat["I_MS"].transpose(2, 0, 1))
        return Scene(
            name,
            np.ascontiguousarray(mat["I_PAN"]),
            ms,
            int(mat["ratio"].item()),
            int(mat["L"].item()),
            band_gains(sensor, ms.shape[0]),
            sensor_mtf(sensor).pan,
            sensor,
        )
    import rasterio

    with rasterio.open(data / src.files[0]) as p, rasterio.open(data / src.files[1]) as m:
        pan, ms = p.read(1), m.read()
        ratio = round(m.res[0] / p.res[0])
        # The pair shares its top-left corner (source notes); check it rather than trust it.
        if (abs(p.transform.c - m.transform.c) > p.res[0] / 2) or (abs(p.transform.f - m.transform.f) > p.res[1] / 2):
            raise ValueError(f"{name}: the PAN and MS do not share their top-left corner.")
        return Scene(name, pan, ms, ratio, 11, np.array(SN6_GAINS), SN6_PAN_GAIN, None, m.crs, m.transform)


def longest_run(flags: np.ndarray) -> tuple[int, int]:
    """[start, end) of the longest run of True in a 1-D boolean array ((0, 0) when there is none)."""
    best, start = (0, 0), None
    for i, f in enumerate([*flags.tolist(), False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            best = max(best, (start, i), key=lambda run: run[1] - run[0])
            start = None
    return best


def trim_nodata(scene: Scene) -> tuple[Scene, Half]:
    """The scene cut to its largest block of MS rows, then columns, free of nodata (all bands 0) pixels.

    SpaceNet-6 pairs 2 and 3 start with ~100 rows of zeros (outside the image strip) and declare no nodata;
    left in, they would dominate the block-wise Q2n / QNR indices of both halves.
    """
    valid = np.any(scene.ms != 0, axis=0)
    r0, r1 = longest_run(valid.all(axis=1))
    c0, c1 = longest_run(valid[r0:r1].all(axis=0))
    if (r0, r1, c0, c1) == (0, valid.shape[0], 0, valid.shape[1]):
        return scene, Half(r0, r1, c0, c1)
    half = Half(r0, r1, c0, c1)
    pan, ms = crop(scene, half)
    tf = None if scene.ms_transform is None else scene.ms_transform * Affine.translation(c0, r0)
    return replace(scene, pan=np.ascontiguousarray(pan), ms=np.ascontiguousarray(ms), ms_transform=tf), half


def shift(half: Half, by: Half) -> Half:
    """A window of the `by` window in the coordinates of the whole scene."""
    return Half(half.r0 + by.r0, half.r1 + by.r0, half.c0 + by.c0, half.c1 + by.c0)


def crop(scene: Scene, half: Half) -> tuple[np.ndarray, np.ndarray]:
    """(PAN, MS) of a half, in their stored dtypes."""
    return scene.pan[half.pan(scene.ratio)], scene.ms[(slice(None), *half.ms())]


def as_stored(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip to an integer dtype (a degraded product as it would be delivered); floats pass."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


def wald(scene: Scene, pan: np.ndarray, ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wald-degraded (PAN, MS), rounded to the stored dtypes so that every method sees the same inputs."""
    from backend.methods.pansharpening_classic import degrade, wald_protocol

    if scene.sensor is not None:
        ms_lr, pan_lr = wald_protocol(ms, pan, scene.ratio, scene.sensor)
    else:
        ms_lr, pan_lr = degrade(ms, scene.ratio, scene.gains), degrade(pan, scene.ratio, scene.pan_gain)
    return as_stored(pan_lr, pan.dtype), as_stored(ms_lr, ms.dtype)


def write_tif(path: Path, data: np.ndarray, crs: Any = None, transform: Any = None) -> str:
    """A GeoTIFF of (bands, H, W) or (H, W); no CRS/transform for the .mat scenes (pixel space)."""
    import rasterio

    cube = data[None] if data.ndim == 2 else data
    profile = {"driver": "GTiff", "count": cube.shape[0], "height": cube.shape[1], "width": cube.shape[2]}
    # Bands are spectral, not colour: without this GDAL tags a 4-band uint8 image RGBA (band 4 = alpha), which
    # the jobs' warped reader then refuses ("The VRT already has an alpha band").
    profile |= {"dtype": cube.dtype.name, "photometric": "MINISBLACK"}
    if crs is not None:
        profile |= {"crs": crs, "transform": transform}
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(cube)
    return str(path)


def write_pair(folder: Path, scene: Scene, pan: np.ndarray, ms: np.ndarray, half: Half | None, step: int) -> tuple:
    """PAN and MS GeoTIFFs in `folder`; `half` (georeferenced scenes) places them, `step` = MS pixel size / the
    source MS's (1, or the ratio for Wald-degraded images whose PAN then has the source MS's grid)."""
    folder.mkdir(parents=True, exist_ok=True)
    ms_tf = pan_tf = None
    if scene.crs is not None and half is not None:
        origin = scene.ms_transform * Affine.translation(half.c0, half.r0)
        ms_tf = origin * Affine.scale(step)
        pan_tf = origin * Affine.scale(step / scene.ratio)
    return (
        write_tif(folder / "pan.tif", pan, scene.crs, pan_tf),
        write_tif(folder / "ms.tif", ms, scene.crs, ms_tf),
    )


def classical(
    scene: Scene, pan: np.ndarray, ms: np.ndarray, zpnn: Any, zpnn_adapt: int, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """Fused images of the non-trained methods (float64, PAN grid) from the same inputs."""
    from backend.methods.pansharpening_classic import brovey, gsa, mtf_glp_hpm, upsample
    from backend.methods.zpnn import zpnn_fuse

    pan64, ms64 = pan.astype(np.float64), ms.astype(np.float64)
    up = upsample(ms64, scene.ratio)
    out = {
        "exp": up,
        "brovey": brovey(pan64, up),
        "gsa": gsa(pan64, up, ms64, scene.ratio),
        "mtf_glp_hpm": mtf_glp_hpm(pan64, up, scene.ratio, scene.gains),
    }
    if zpnn is not None:
        # Normalised by the scene's own radiometric depth (2**bits), as Z-PNN does with 11-bit products.
        out["zpnn"] = zpnn_fuse(
            pan64,
            ms64,
            scene.ratio,
            zpnn,
            bits=scene.bits,
            adapt_iterations=zpnn_adapt,
            gains=scene.gains,
            device=device,
        )
    return out


def run_job(name: str, params: dict[str, Any], log: Callable[[str], None]) -> tuple[Any, list[str]]:
    """One real job, in-process, the way the worker runs it; (result, warnings)."""
    from backend.context import JobContext
    from backend.jobs import JOBS
    from backend.jobs.base import run_job as run

    spec = JOBS[name]
    ctx = JobContext(on_log=lambda level, msg, data=None: log(f"{name}: {msg}"))
    result = run(spec, spec.validate({k: v for k, v in params.items() if v is not None}), ctx)
    return result, list(ctx.warnings)


def read_output(result: Any) -> np.ndarray:
    import rasterio

    with rasterio.open(result.outputs[0].path) as ds:
        return ds.read().astype(np.float64)


def panadapter_available() -> bool:
    from backend.jobs import JOBS

    return "pansharpen.finetune" in JOBS and "pansharpen.apply" in JOBS


def run_panadapter(
    scene: Scene, train: Half, test: Half, test_rr: tuple[np.ndarray, np.ndarray], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """Fine-tune on the train half, apply to the Wald-degraded and to the original test half."""
    log = (lambda msg: print(f"  [{scene.name}] {msg}", file=sys.stderr)) if args.verbose else (lambda msg: None)
    adapter = f"eval-{scene.name.lower()}"
    pan_tr, ms_tr = crop(scene, train)
    pan_path, ms_path = write_pair(work / "train", scene, pan_tr, ms_tr, train, 1)
    common = {"ratio": scene.ratio, "device": args.device}
    patch = args.patch or fit_patch(train, scene.ratio)
    started = time.perf_counter()
    ft, ft_warnings = run_job(
        "pansharpen.finetune",
        {
            "pan": pan_path,
            "ms": ms_path,
            "adapter_name": adapter,
            "sensor": SCENES[scene.name].job_sensor,
            "backbone": args.backbone,
            "allow_random_backbone": True,
            "prior_epochs": args.prior_epochs,
            "adapter_epochs": args.adapter_epochs,
            "steps_per_epoch": args.steps,
            "batch_size": args.batch,
            "patch_size": patch,
            "overwrite": True,
            **common,
        },
        log,
    )
    finetune_s = time.perf_counter() - started
    fused = {}
    apply_s = {}
    for key, (pan, ms, step) in {"reduced": (*test_rr, scene.ratio), "full": (*crop(scene, test), 1)}.items():
        pan_p, ms_p = write_pair(work / key, scene, pan, ms, test, step)
        t0 = time.perf_counter()
        res, _ = run_job(
            "pansharpen.apply",
            {"pan": pan_p, "ms": ms_p, "adapter": adapter, "out_dir": str(work / key / "out"), **common},
            log,
        )
        apply_s[key] = time.perf_counter() - t0
        fused[key] = read_output(res)
    random_weights = any("random" in w.lower() for w in ft_warnings)
    return {
        "fused": fused,
        "patch_size": patch,
        "finetune_seconds": finetune_s,
        "apply_seconds": apply_s,
        "finetune_metrics": {k: v for k, v in ft.metrics.items() if isinstance(v, int | float | str)},
        "frozen_backbone_weights": "random" if random_weights else "pretrained",
        "warnings": ft_warnings,
    }


def evaluate_scene(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from backend.methods.zpnn import SENSOR_BANDS, load_zpnn
    from backend.metrics.pansharpening import full_resolution_metrics, reduced_resolution_metrics
    from backend.runtime import resolve_device

    scene = load_scene(args.data, name)
    src = SCENES[name]
    if scene.pan.shape != (scene.ratio * scene.ms.shape[1], scene.ratio * scene.ms.shape[2]):
        raise ValueError(f"{name}: the PAN {scene.pan.shape} is not the MS {scene.ms.shape[1:]} x {scene.ratio}.")
    full_shape = scene.ms.shape[1:]
    scene, valid = trim_nodata(scene)
    train, test = split_halves(scene.ms.shape[1], scene.ms.shape[2], scene.ratio, args.max_size)
    pan_te, ms_te = crop(scene, test)
    pan_lr, ms_lr = wald(scene, pan_te, ms_te)

    zpnn: Any = None
    if src.zpnn is not None and SENSOR_BANDS[src.zpnn] == scene.ms.shape[0]:
        zpnn, zpnn_note = load_zpnn(src.zpnn, args.zpnn_weights), src.zpnn_note
    else:
        zpnn_note = f"n/a: no Z-PNN weights for {scene.ms.shape[0]} bands"
    if args.zpnn_adapt:
        zpnn_note += f", target-adapted for {args.zpnn_adapt} iterations"

    device = resolve_device(args.device)
    fused_rr = classical(scene, pan_lr, ms_lr, zpnn, args.zpnn_adapt, device)
    fused_fr = classical(scene, pan_te, ms_te, zpnn, args.zpnn_adapt, device)
    pa: dict[str, Any] | None = None
    if panadapter_available():
        pa = run_panadapter(scene, train, test, (pan_lr, ms_lr), args, work / name)
        fused_rr["panadapter"], fused_fr["panadapter"] = pa["fused"]["reduced"], pa["fused"]["full"]

    ms_ref = ms_te.astype(np.float64)
    methods: dict[str, Any] = {}
    for method in METHODS:
        if method not in fused_rr:
            methods[method] = None
            continue
        methods[method] = {
            "reduced": reduced_resolution_metrics(fused_rr[method], ms_ref, scene.ratio),
            "full": full_resolution_metrics(
                fused_fr[method], ms_ref, pan_te.astype(np.float64), scene.ratio, scene.gains
            ),
        }
    record: dict[str, Any] = {
        "scene": name,
        "source": [str(args.data / f) for f in src.files],
        "sensor_gains": scene.gains.tolist(),
        "pan_gain": scene.pan_gain,
        "bits": scene.bits,
        "ratio": scene.ratio,
        "bands": int(scene.ms.shape[0]),
        "dtype": scene.ms.dtype.name,
        "georeferenced": scene.crs is not None,
        "ms_shape": list(full_shape),
        "valid_ms_window": vars(valid),  # the nodata-free block the halves are cut from (trim_nodata)
        # In MS pixels of the stored scene.
        "train_half_ms_window": vars(shift(train, valid)),
        "test_half_ms_window": vars(shift(test, valid)),
        "test_pan_shape": list(pan_te.shape),
        "job_sensor": src.job_sensor,
        "zpnn": zpnn_note,
        "methods": methods,
    }
    if pa is None:
        record["panadapter"] = "n/a: pansharpen.finetune / pansharpen.apply are not in backend.jobs.JOBS"
    else:
        record["panadapter"] = {k: v for k, v in pa.items() if k != "fused"}
    return record


def machine(device: str) -> dict[str, Any]:
    import torch

    from backend.runtime import resolve_device

    dev = resolve_device(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "node": platform.node(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "device": dev,
        "device_name": torch.cuda.get_device_name() if dev.startswith("cuda") else cpu,
    }


def table(records: list[dict[str, Any]]) -> str:
    """The results as a markdown table, one row per scene and method."""
    head = "| scene | method | Q2n | SAM | ERGAS | SCC | PSNR | D_λ | D_s | HQNR |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        for method in METHODS:
            m = r["methods"][method]
            if m is None:
                lines.append(f"| {r['scene']} | {method} | n/a | | | | | | | |")
                continue
            rr, fr = m["reduced"], m["full"]
            lines.append(
                f"| {r['scene']} | {method} | {rr['q2n']:.4f} | {rr['sam']:.3f} | {rr['ergas']:.3f} | {rr['scc']:.4f} "
                f"| {rr['psnr']:.2f} | {fr['d_lambda']:.4f} | {fr['d_s']:.4f} | {fr['hqnr']:.4f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--zpnn-weights", type=Path, default=ZPNN_WEIGHTS)
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=list(SCENES))
    parser.add_argument("--backbone", default="ipt", choices=["ipt", "tiny"])
    parser.add_argument("--prior-epochs", type=int, default=10)
    parser.add_argument("--adapter-epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50, help="optimisation steps per epoch")
    parser.add_argument("--batch", type=int, default=None, help="patches per step (default: the job's)")
    parser.add_argument("--patch", type=int, default=None, help="training patch, PAN px (default: largest that fits)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-size", type=int, default=None, help="crop each half to its centre window (PAN px)")
    parser.add_argument("--zpnn-adapt", type=int, default=0, help="Z-PNN target-adaptive iterations (official: 100)")
    parser.add_argument("--out", type=Path, default=RESULTS / "eval_pansharpen.json")
    parser.add_argument("--verbose", action="store_true", help="print the jobs' log lines")
    args = parser.parse_args(argv)

    from rasterio.errors import NotGeoreferencedWarning

    logging.getLogger("backend").addHandler(logging.NullHandler())  # messages arrive via the job context
    logging.getLogger("backend").propagate = False
    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)  # the .mat halves have no CRS
    info = machine(args.device)
    if not panadapter_available():
        print("PanAdapter jobs are not registered yet: only the baselines and Z-PNN are evaluated.", file=sys.stderr)
    records = []
    with tempfile.TemporaryDirectory(prefix="rs-peft-eval-pan-") as tmp:
        # A private adapter library: the evaluation's adapters must not land in the analyst's.
        os.environ["RS_PEFT_QGIS_ADAPTER_DIR"] = str(Path(tmp) / "adapters")
        for name in args.scenes:
            t0 = time.perf_counter()
            records.append(evaluate_scene(name, args, Path(tmp)))
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    frozen = sorted({r["panadapter"]["frozen_backbone_weights"] for r in records if isinstance(r["panadapter"], dict)})
    print(table(records))
    if "random" in frozen:
        print(
            f"\nPanAdapter ran on RANDOM frozen {'IPT/EDSR' if args.backbone == 'ipt' else args.backbone} weights "
            "(the checkpoints are not installed and cannot be downloaded here): its scores are not the method's."
        )
    for r in records:
        print(f"{r['scene']}: Z-PNN {r['zpnn']}")
    out = {
        "benchmark": "eval_pansharpen",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": info,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "protocol": (
            "left half (MS columns) trains PanAdapter, right half tests; reduced resolution = Wald's protocol on the "
            "test half (degraded inputs rounded to the stored dtype for every method), scored against the test "
            "half's MS (border 0, PSNR peak = reference maximum); full resolution on the test half itself"
        ),
        "frozen_backbone_weights": frozen,
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
