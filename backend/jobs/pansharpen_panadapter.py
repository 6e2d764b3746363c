"""pansharpen.finetune and pansharpen.apply: PanAdapter fine-tuned on the analyst's own PAN + MS pair, applied
to whole scenes.

Fine-tuning needs no ground truth: the centre window of the pair (at most max_size PAN pixels per side) is
degraded by the ratio with the sensor's MTF filters (Wald's protocol) and the model learns to give back the
original MS (backend/training/pansharpen.py), stage 1 (local priors) then stage 2 (adapters on the frozen IPT).

Applying streams the scene in blended tiles on the PAN grid. The MS is read on whole MS pixels around each
tile (exactly when its grid nests in the PAN's, warped with cubic resampling otherwise) and interpolated to the
PAN grid with the same 23-tap filter as in training, so the model sees at full resolution what it learnt on.
The output keeps the MS's bands, dtype, value scale and nodata.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend import adapters
from backend.adapters import AdapterMeta
from backend.io.raster import Grid, RasterSource
from backend.io.rasterize import restrict_to_aoi
from backend.io.tiling import TileSpec, run_tiled
from backend.io.writer import GeoTiffWriter
from backend.jobs.base import JobContext, JobSpec, Param, prepare_out_dir
from backend.jobs.checkpoints import backbone_checkpoint, training_checkpoint
from backend.jobs.pansharpen_classic import (
    DECLARED,
    PAN,
    RATIO,
    SENSOR,
    Pair,
    fill_nearest,
    open_pair,
    output_nodata,
    read_padded,
    sensor_gains,
    to_dtype,
)
from backend.jobs.pansharpen_evaluate import centre_window, read_window
from backend.methods.panadapter import PanAdapter, build_panadapter
from backend.methods.pansharpening_classic import upsample
from backend.models.backbones.loading import CheckpointMismatch, read_checkpoint
from backend.protocol import INVALID_INPUT, JobError, JobResult, Output
from backend.runtime import halve_batch_on_oom, resolve_device
from backend.training.pansharpen import PanTrainConfig, Scales, fit_panadapter, reduced_resolution_set, split

METHOD = "panadapter"
RANDOM_BACKBONE_SEED = 0  # random frozen IPT/EDSR weights are rebuilt identically when applying
# backbone -> (IPT variant, its registry name, EDSR variant, its registry name); "tiny" is for tests only.
BACKBONES = {
    "ipt": ("base", "ipt", "edsr_baseline", "edsr_baseline_x2"),
    "tiny": ("tiny", "tiny", "tiny", None),
}
MS_HALO = 8  # MS pixels read around a tile: the 23-tap interpolator reaches about 6
ADAPTER = Param("adapter", str, "Name of a PanAdapter adapter in the library.", required=True, kind="adapter")
DEVICE = Param("device", str, "auto, cpu or cuda.", default="auto")


def build_model(backbone: str, ms_bands: int, ratio: int, ipt: str | None, edsr: str | None) -> PanAdapter:
    """PanAdapter on `backbone` with the official IPT/EDSR checkpoints at `ipt`/`edsr` (random when None)."""
    ipt_variant, _, edsr_variant, _ = BACKBONES[backbone]
    return build_panadapter(
        ms_bands,
        ipt_variant=ipt_variant,
        edsr_variant=edsr_variant,
        ipt_state=read_checkpoint(ipt) if ipt else None,
        edsr_state=read_checkpoint(edsr) if edsr else None,
        ratio=ratio,
        seed=RANDOM_BACKBONE_SEED,
    )


# --- pansharpen.finetune ------------------------------------------------------------------------------------

FINETUNE_PARAMS = (
    Param("pan", str, "Panchromatic raster (one band).", required=True, kind="raster"),
    Param("ms", str, "Multispectral raster of the same scene (any band count and CRS).", required=True, kind="raster"),
    Param("adapter_name", str, "Name under which the adapter is saved in the library.", required=True),
    SENSOR,
    RATIO,
    Param("ms_bands", list, "MS bands to use, e.g. 1,2,3,4 (default: all).", kind="bands"),
    Param("aoi", str, "Polygon layer: train inside its bounding box (default: the whole overlap).", kind="polygons"),
    Param(
        "max_size",
        int,
        "Side of the training window in PAN pixels (the centre of the area when it is larger).",
        default=2048,
    ),
    Param(
        "backbone",
        str,
        "Frozen transformer (ipt = IPT + EDSR-baseline priors).",
        default="ipt",
        choices=("ipt", "tiny"),
    ),
    Param(
        "allow_random_backbone",
        bool,
        "Use random frozen IPT/EDSR weights if their checkpoints are missing.",
        default=False,
    ),
    Param("prior_epochs", int, "Stage 1 (local priors) epochs; early stopping may end sooner.", default=10),
    Param("adapter_epochs", int, "Stage 2 (adapters) epochs; early stopping may end sooner.", default=10),
    Param("steps_per_epoch", int, "Optimisation steps per epoch.", default=50),
    Param("batch_size", int, "Patches per step.", default=4),
    Param("patch_size", int, "Training patch side in PAN pixels at reduced resolution (default: 64).", default=None),
    Param("lr_prior", float, "Stage 1 learning rate (Adam).", default=1e-3),
    Param("lr_adapter", float, "Stage 2 learning rate (Adam).", default=5e-4),
    Param("val_fraction", float, "Share of the training window kept for validation (a strip).", default=0.2),
    Param("patience", int, "Stop a stage after this many epochs without a better validation Q2n.", default=4),
    DEVICE,
    Param("overwrite", bool, "Replace an adapter of the same name.", default=False),
)


def finetune(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    ctx.protect_inputs(p["pan"], p["ms"], p["aoi"])
    device = resolve_device(p["device"])  # a wrong device fails before the data is read
    if min(p["prior_epochs"], p["adapter_epochs"]) < 0 or p["prior_epochs"] + p["adapter_epochs"] < 1:
        raise JobError(INVALID_INPUT, "The epochs of the two stages must not be negative, and not both zero.")
    if p["steps_per_epoch"] < 1 or p["batch_size"] < 1:
        raise JobError(INVALID_INPUT, "Steps per epoch and batch size must each be at least 1.")
    if not 0 < p["val_fraction"] < 1:
        raise JobError(INVALID_INPUT, "The validation fraction must be between 0 and 1.")
    name = adapters.sanitize(p["adapter_name"])
    if not p["overwrite"] and any(a["name"] == name for a in adapters.list_adapters()):
        raise JobError(
            INVALID_INPUT, f"An adapter named '{name}' already exists.", "Choose another name or allow overwriting."
        )
    pair = open_pair(ctx, p["pan"], p["ms"], p["ms_bands"], p["ratio"])
    r = pair.ratio
    sensor_gains(p["sensor"], pair.bands)  # a sensor that does not fit the bands fails here, in plain words
    patch = p["patch_size"] or 64
    if patch < 16 or patch % r:
        raise JobError(INVALID_INPUT, f"The patch size must be at least 16 and a multiple of the ratio ({r}).")
    grid = pair.overlap()
    if p["aoi"]:
        grid, _ = restrict_to_aoi(grid, p["aoi"], ctx.warnings)
    if not pair.georeferenced:
        ctx.warn("The PAN and MS are not georeferenced: they are matched in pixel space (same top-left corner).")

    _, ipt_name, _, edsr_name = BACKBONES[p["backbone"]]
    ipt_path, ipt_sha = backbone_checkpoint(ipt_name, p["allow_random_backbone"], ctx)
    edsr_path, edsr_sha = backbone_checkpoint(edsr_name, p["allow_random_backbone"], ctx) if edsr_name else (None, None)

    ctx.progress(0.0, "reading the training window", force=True)
    pan_grid = grid.window_grid(centre_window(grid, pair, p["max_size"]))
    pan, ms = read_window(ctx, pair, pan_grid)
    scales = Scales.of(pan, ms)
    ctx.log(
        f"Reduced-resolution training on {pan_grid.width} x {pan_grid.height} PAN pixels ({pair.bands} MS band(s), "
        f"ratio {r}, {pair.ratio_note}, sensor {p['sensor']}): degraded by {r}, so the model learns on "
        f"{pan_grid.width // r} x {pan_grid.height // r} pixels."
    )
    data = reduced_resolution_set(pan, ms, r, p["sensor"], scales)
    try:
        train, val = split(data, p["val_fraction"], r, patch)
    except ValueError as exc:
        raise JobError(INVALID_INPUT, str(exc), "Use a larger area (max_size, AOI) or a smaller patch size.") from None

    model = build_model(p["backbone"], pair.bands, r, ipt_path, edsr_path)
    counts = {}
    for stage in ("prior", "adapter"):
        model.set_stage(stage)  # type: ignore[arg-type]
        counts[stage] = sum(t.numel() for t in model.trainable_parameters())
    total = sum(t.numel() for t in model.parameters())
    ctx.log(
        f"PanAdapter on {p['backbone']}: {counts['prior']:,} trainable parameters in stage 1, "
        f"{counts['adapter']:,} in stage 2, of {total:,}."
    )
    cfg = PanTrainConfig(
        prior_epochs=p["prior_epochs"],
        adapter_epochs=p["adapter_epochs"],
        steps_per_epoch=p["steps_per_epoch"],
        batch_size=p["batch_size"],
        patch=patch,
        lr_prior=p["lr_prior"],
        lr_adapter=p["lr_adapter"],
        patience=p["patience"],
        device=device,
    )
    started = time.monotonic()
    result = fit_panadapter(model, train, val, cfg, ctx, r)
    seconds = time.monotonic() - started
    ctx.log(
        f"Best: stage {result.best_stage}, epoch {result.best_epoch}, validation Q2n "
        f"{result.val_metrics['q2n']:.4f} (interpolated MS: {result.start_metrics['q2n']:.4f})."
    )
    val_metrics = {f"val_{k}": v for k, v in result.val_metrics.items()}
    g = pan_grid
    meta = AdapterMeta(
        method=METHOD,
        backbone=p["backbone"],
        checkpoint_sha256=ipt_sha,
        bands=pair.ms_bands,
        normalization={"pan_scale": [scales.pan], "ms_scale": [scales.ms]},
        training_area={"bounds": list(g.bounds), "crs": g.crs.to_string() if g.crs else None},
        metrics=val_metrics,
        config={
            "ratio": r,
            "sensor": p["sensor"],
            "edsr_sha256": edsr_sha,
            "patch_size": patch,
            "random_backbone_seed": RANDOM_BACKBONE_SEED
            if ipt_sha is None or (edsr_name and edsr_sha is None)
            else None,
            "best_stage": result.best_stage,
            "best_epoch": result.best_epoch,
            "history": result.history,
            "dtype": pair.ms_dtype.name,
        },
    )
    folder = adapters.save(name, result.best_state, meta, overwrite=p["overwrite"])
    return JobResult(
        metrics={
            "adapter": name,
            "adapter_path": str(folder),
            "best_stage": result.best_stage,
            "best_epoch": result.best_epoch,
            "trainable_parameters_prior": counts["prior"],
            "trainable_parameters_adapter": counts["adapter"],
            "total_parameters": total,
            "finetune_seconds": seconds,
            **val_metrics,
            **{f"val_start_{k}": v for k, v in result.start_metrics.items()},
        }
    )


# --- pansharpen.apply ---------------------------------------------------------------------------------------

APPLY_PARAMS = (
    PAN,
    Param(
        "ms",
        str,
        "Multispectral raster (the adapter's bands; any CRS, read onto the PAN grid on the fly).",
        required=True,
        kind="raster",
    ),
    ADAPTER,
    Param("out_dir", str, "Folder for the result.", required=True, kind="folder"),
    RATIO,
    Param("ms_bands", list, "MS bands, e.g. 1,2,3,4 (default: the adapter's training bands).", kind="bands"),
    Param("aoi", str, "Polygon layer: only the area inside it is pansharpened (default: all).", kind="polygons"),
    Param("name", str, "Prefix of the output file name.", default="panadapter"),
    Param(
        "tile_size",
        int,
        "Tile size in PAN pixels (a multiple of 64 keeps the transformer windows aligned).",
        default=256,
    ),
    Param("overlap", int, "Tile overlap in PAN pixels (blended).", default=64),
    Param("batch_size", int, "Tiles per forward pass.", default=2),
    DEVICE,
)


class UpsampledMS:
    """The MS on the PAN grid as the model saw it in training: whole MS pixels around a window, 23-tap interpolated.

    MS pixels are read on an MS-scale grid whose pixel corners fall on the MS's own (phase) on `grid`; a nested
    MS is read exactly, any other is warped onto that grid with cubic resampling. Nodata MS pixels take the
    value of the nearest valid one before interpolating, and are reported invalid.
    """

    def __init__(self, pair: Pair, grid: Grid) -> None:
        r = self.ratio = pair.ratio
        phase = pair.ms_origin_phase(grid)
        self.origin = tuple(ph - r if ph else 0 for ph in phase)  # PAN (row, col) of MS pixel (0, 0), in (-r, 0]
        oy, ox = self.origin
        self.ms_grid = Grid(
            grid.crs,
            grid.transform * Affine.translation(ox, oy) * Affine.scale(r),
            math.ceil((grid.width - ox) / r),
            math.ceil((grid.height - oy) / r),
        )
        self.src = pair.ms_reader(self.ms_grid, Resampling.cubic)

    def read(self, win: Window) -> tuple[np.ndarray, np.ndarray]:
        """(ms_up (C, h, w) float64, valid (h, w)) for a window of the PAN grid."""
        r, (oy, ox) = self.ratio, self.origin
        y0, x0, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        k0, j0 = (y0 - oy) // r - MS_HALO, (x0 - ox) // r - MS_HALO
        k1, j1 = -(-(y0 + h - oy) // r) + MS_HALO, -(-(x0 + w - ox) // r) + MS_HALO
        ms, valid = read_padded(self.src, self.ms_grid, k0, j0, k1 - k0, j1 - j0)
        up = upsample(fill_nearest(ms.astype(np.float64), valid), r)
        dy, dx = y0 - (oy + r * k0), x0 - (ox + r * j0)
        valid_up = np.repeat(np.repeat(valid, r, axis=0), r, axis=1)
        return up[:, dy : dy + h, dx : dx + w], valid_up[dy : dy + h, dx : dx + w]

    def close(self) -> None:
        self.src.close()


def apply(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    started = time.monotonic()
    ctx.protect_inputs(p["pan"], p["ms"], p["aoi"])
    out_dir = prepare_out_dir(p["out_dir"])
    device = torch.device(resolve_device(p["device"]))
    state, meta = adapters.load(p["adapter"])
    if meta.method != METHOD:
        raise JobError(INVALID_INPUT, f"The adapter '{meta.name}' was trained for {meta.method}, not pansharpening.")
    pair = open_pair(ctx, p["pan"], p["ms"], p["ms_bands"] or meta.bands, p["ratio"])
    adapters.check_compatible(meta, METHOD, meta.backbone, pair.bands)
    r = pair.ratio
    if r != meta.config["ratio"]:
        raise JobError(
            INVALID_INPUT,
            f"The adapter '{meta.name}' was trained at ratio {meta.config['ratio']}, but this pair has ratio {r}.",
            "Fine-tune an adapter on a pair with this ratio.",
        )
    try:
        spec = TileSpec(p["tile_size"], p["overlap"], p["batch_size"])
    except ValueError as exc:
        raise JobError(INVALID_INPUT, str(exc)) from None
    _, ipt_name, _, edsr_name = BACKBONES[meta.backbone]
    ipt_path = training_checkpoint(ipt_name, meta.checkpoint_sha256, meta.name)
    edsr_path = training_checkpoint(edsr_name, meta.config.get("edsr_sha256"), meta.name) if edsr_name else None
    if meta.config.get("random_backbone_seed") is not None:
        ctx.warn(f"The adapter '{meta.name}' was trained on randomly initialised frozen IPT/EDSR weights.")
    model = build_model(meta.backbone, pair.bands, r, ipt_path, edsr_path)
    try:
        model.load_adapter_state(state)
    except CheckpointMismatch as exc:
        raise JobError(INVALID_INPUT, f"The adapter '{meta.name}' is damaged or from another version: {exc}") from None
    # When stage 2 never beat stage 1 its tail is still zero: the prior stage alone gives the same result, faster.
    model.set_stage("adapter" if meta.config.get("best_stage") == "adapter" else "prior")
    model.to(device).eval()

    grid = pair.overlap()
    aoi = None
    if p["aoi"]:
        grid, aoi = restrict_to_aoi(grid, p["aoi"], ctx.warnings)
    if not pair.georeferenced:
        ctx.warn(
            "The PAN and MS are not georeferenced: they are matched in pixel space (same top-left corner, one MS "
            "pixel per ratio x ratio PAN pixels) and the result has no CRS."
        )
    ctx.log(
        f"PanAdapter '{meta.name}' on {grid.width} x {grid.height} PAN pixels "
        f"({grid.width * grid.height / 1e6:.1f} MP), {pair.bands} band(s), ratio {r} ({pair.ratio_note}), "
        f"tiles of {spec.tile} px on {device}."
    )
    pan_scale, ms_scale = meta.normalization["pan_scale"][0], meta.normalization["ms_scale"][0]
    nb = pair.bands
    pan_src = RasterSource(pair.pan, grid=grid, what="PAN")
    ms_src = UpsampledMS(pair, grid)

    def read(win: Window) -> tuple[np.ndarray, np.ndarray]:
        pan, pvalid = pan_src.read(win)
        ms_up, mvalid = ms_src.read(win)
        valid = pvalid & mvalid
        if aoi is not None:
            valid &= aoi.burn(grid.window_grid(win)) > 0
        pan = fill_nearest(pan, pvalid)
        stack = np.concatenate([ms_up / ms_scale, pan / pan_scale]).astype(np.float32)
        return stack, valid

    @halve_batch_on_oom
    def predict(batch: np.ndarray, valid: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x[:, :nb], x[:, nb:])
        return out.float().cpu().numpy() * ms_scale

    nodata = output_nodata(pair)
    final = out_dir / f"{p['name']}.tif"
    written = 0

    def sink(win: Window, values: np.ndarray, valid: np.ndarray) -> None:
        nonlocal written
        out, ok = to_dtype(values, valid, pair.ms_dtype, nodata)
        writer.write(win, out, ok)
        written += int(np.count_nonzero(ok))

    block = spec.stride if spec.stride % 16 == 0 else 256
    with (
        pan_src,
        GeoTiffWriter(
            ctx.output_path(final), grid, nb, pair.ms_dtype.name, nodata, pair.descriptions, block=block
        ) as writer,
    ):
        try:
            run_tiled(
                grid.height,
                grid.width,
                read,
                predict,
                sink,
                nb,
                spec,
                on_tile=lambda d, t: ctx.progress(d / t, "pansharpening", f"tile {d}/{t}"),
            )
        finally:
            ms_src.close()
    if written == 0:
        raise JobError(
            INVALID_INPUT,
            "The PAN and MS rasters have no pixel where both hold data"
            + (" inside the area of interest." if aoi is not None else "."),
            "Check their nodata values and that they cover the same area.",
        )
    pixels = grid.width * grid.height
    seconds = time.monotonic() - started
    return JobResult(
        outputs=[Output(str(final), "raster", f"{p['name']} (PanAdapter {meta.name})", "", "pansharpened")],
        metrics={
            "adapter": meta.name,
            "ratio": r,
            "bands": nb,
            "width": grid.width,
            "height": grid.height,
            "valid_fraction": written / pixels,
            "megapixels_per_second": pixels / 1e6 / max(seconds, 1e-9),
        },
    )


FINETUNE = JobSpec(
    "pansharpen.finetune",
    "Fine-tune a PanAdapter pansharpening adapter on your own PAN + MS pair (no reference image needed: "
    "reduced-resolution protocol).",
    FINETUNE_PARAMS,
    finetune,
    title="Fine-tune a PanAdapter adapter",
)
APPLY = JobSpec(
    "pansharpen.apply",
    "Pansharpen a PAN + MS pair with a PanAdapter adapter: the MS's bands at the PAN's resolution.",
    APPLY_PARAMS,
    apply,
    title="Pansharpen (PanAdapter adapter)",
    outputs=DECLARED,
)
