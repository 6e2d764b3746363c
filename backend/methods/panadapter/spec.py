"""PanAdapter as the product's pansharpening method: pansharpen.finetune on the analyst's own PAN + MS pair
(reduced-resolution protocol, no reference needed), pansharpen.apply over whole scenes.

Fine-tuning reads the centre window of the pair (at most max_size PAN pixels per side), degrades it by the
ratio with the sensor's MTF filters (Wald's protocol) and learns to give back the original MS: stage 1 (local
priors) then stage 2 (adapters on the frozen IPT).

Applying streams the scene in blended tiles on the PAN grid. The MS is read on whole MS pixels around each
tile (exactly when its grid nests in the PAN's, warped with cubic resampling otherwise) and interpolated to the
PAN grid with the same 23-tap filter as in training, so the model sees at full resolution what it learnt on.
The output keeps the MS's bands, dtype, value scale and nodata.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window
from torch import nn

from backend import adapters, weights
from backend.adapters import AdapterMeta
from backend.context import JobContext
from backend.io.pairs import (
    FusedImage,
    Pair,
    centre_window,
    fill_nearest,
    open_pair,
    read_padded,
    read_window,
)
from backend.io.raster import Grid, RasterSource
from backend.io.rasterize import restrict_to_aoi
from backend.methods.pansharpening_classic import (
    MAX_SIZE,
    MS,
    MS_BANDS,
    PAN,
    PANSHARPENED,
    RATIO,
    SENSOR,
    sensor_gains,
    upsample,
)
from backend.methods.spec import RANDOM_BACKBONE_SEED, Application, MethodSpec, Training, register
from backend.models.backbones.loading import read_checkpoint
from backend.params import (
    AOI,
    LR,
    NAME,
    PATCH_SIZE,
    PATIENCE,
    STEPS_PER_EPOCH,
    TRAIN_BATCH_SIZE,
    VAL_FRACTION,
    Param,
)
from backend.protocol import INVALID_INPUT, JobError
from backend.training.loop import FitResult

from .model import build_panadapter
from .training import STAGE_NAMES, Scales, recipe, reduced_resolution_set, split, validate

METHOD = "panadapter"
MS_HALO = 8  # MS pixels read around a tile: the 23-tap interpolator reaches about 6
TILE = 256  # applying: a multiple of IPT's 64² window keeps the transformer windows aligned across tiles
NOT_GEOREFERENCED = (
    "The PAN and MS are not georeferenced: they are matched in pixel space (same top-left corner, one MS pixel per "
    "ratio x ratio PAN pixels) and the result has no CRS."
)

FINETUNE_PARAMS = (
    PAN.but(help="Panchromatic raster (one band)."),
    MS.but(help="Multispectral raster of the same scene (any band count and CRS)."),
    SENSOR,
    RATIO,
    MS_BANDS,
    AOI.but(help="Polygon layer: train inside its bounding box (default: the whole overlap)."),
    MAX_SIZE.but(
        help="Side of the training window in PAN pixels (the centre of the area when it is larger).",
        default=2048,
        group="finetune",
    ),
    Param(
        "prior_epochs",
        int,
        "Stage 1 (local priors) epochs; early stopping may end sooner.",
        default=10,
        minimum=0,
        maximum=100_000,
        step=1,
        group="finetune",
    ),
    Param(
        "adapter_epochs",
        int,
        "Stage 2 (adapters) epochs; early stopping may end sooner.",
        default=10,
        minimum=0,
        maximum=100_000,
        step=1,
        group="finetune",
    ),
    STEPS_PER_EPOCH.but(default=50),
    TRAIN_BATCH_SIZE.but(default=4),
    PATCH_SIZE.but(help="Training patch side in PAN pixels at reduced resolution (default: 64)."),
    LR.but(name="lr_prior", help="Stage 1 learning rate (Adam).", default=1e-3),
    LR.but(name="lr_adapter", help="Stage 2 learning rate (Adam).", default=5e-4),
    VAL_FRACTION.but(default=0.2, help="Share of the training window kept for validation (a strip)."),
    PATIENCE.but(default=4, help="Stop a stage after this many epochs without a better validation Q2n."),
)

APPLY_PARAMS = (
    PAN,
    MS.but(help="Multispectral raster (the adapter's bands; any CRS, read onto the PAN grid on the fly)."),
    RATIO,
    MS_BANDS.but(help="MS bands, e.g. 1,2,3,4 (default: the adapter's training bands)."),
    AOI.but(help="Polygon layer: only the area inside it is pansharpened (default: all)."),
    NAME.but(default="panadapter", help="Prefix of the output file name."),
)


def build(backbone: str, config: dict[str, Any], bands: int, checkpoints: dict[str, str | None]) -> nn.Module:
    """PanAdapter with the official IPT/EDSR checkpoints where known (random, from a fixed seed, otherwise)."""
    ipt_name, edsr_name = SPEC.backbones[backbone]
    ipt, edsr = checkpoints.get(ipt_name), checkpoints.get(edsr_name)
    return build_panadapter(
        bands,
        ipt_variant=weights.backbone_info(ipt_name).variant,
        edsr_variant=weights.backbone_info(edsr_name).variant,
        ipt_state=read_checkpoint(ipt) if ipt else None,
        edsr_state=read_checkpoint(edsr) if edsr else None,
        ratio=config["ratio"],
        seed=RANDOM_BACKBONE_SEED,
    )


def prepare(ctx: JobContext, p: dict[str, Any]) -> Training:
    if p["prior_epochs"] + p["adapter_epochs"] < 1:
        raise JobError(INVALID_INPUT, "The epochs of the two stages must not be negative, and not both zero.")
    pair = open_pair(p["pan"], p["ms"], p["ms_bands"], p["ratio"], ctx.warn)
    r = pair.ratio
    sensor_gains(p["sensor"], pair.bands)  # a sensor that does not fit the bands fails here, in plain words
    patch = p["patch_size"] or 64
    if patch % r:
        raise JobError(INVALID_INPUT, f"The patch size must be a multiple of the ratio ({r}).")
    grid = pair.overlap()
    if p["aoi"]:
        grid, _ = restrict_to_aoi(grid, p["aoi"], ctx.warnings)
    if not pair.georeferenced:
        ctx.warn("The PAN and MS are not georeferenced: they are matched in pixel space (same top-left corner).")
    ctx.progress(0.0, "reading the training window", force=True)
    pan_grid = grid.window_grid(centre_window(grid, pair, p["max_size"]))
    pan, ms = read_window(pair, pan_grid, ctx.warn)
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
    start: dict[str, float] = {}
    counts: dict[str, int] = {}

    def make_recipe(model: nn.Module, device: str) -> Any:
        for stage in ("prior", "adapter"):
            model.set_stage(stage)
            counts[stage] = sum(t.numel() for t in model.parameters() if t.requires_grad)
        ctx.log(f"Trainable parameters: {counts['prior']:,} in stage 1, {counts['adapter']:,} in stage 2.")
        model.set_stage("prior")
        model.to(device)
        start.update(validate(model, val, r, torch.device(device)))  # zero-initialised heads: the interpolated MS
        ctx.log(f"Before training (the interpolated MS): validation Q2n {start['q2n']:.4f}, SAM {start['sam']:.3f}.")
        return recipe(model, train, val, p, patch, device)

    def report(model: nn.Module, result: FitResult) -> dict[str, Any]:
        ctx.log(
            f"Best: stage {result.best_stage}, epoch {result.best_epoch}, validation Q2n "
            f"{result.val_metrics['q2n']:.4f} (interpolated MS: {start['q2n']:.4f})."
        )
        return {
            "trainable_parameters_prior": counts["prior"],
            "trainable_parameters_adapter": counts["adapter"],
            **{f"val_start_{k}": v for k, v in start.items()},
        }

    return Training(
        bands=pair.ms_bands,
        dtype=pair.ms_dtype,
        normalization={"pan_scale": [scales.pan], "ms_scale": [scales.ms]},
        grid=pan_grid,
        config={"ratio": r, "sensor": p["sensor"], "patch_size": patch},
        recipe=make_recipe,
        report=report,
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


def open_apply(ctx: JobContext, p: dict[str, Any], meta: AdapterMeta) -> Application:
    pair = open_pair(p["pan"], p["ms"], p["ms_bands"] or meta.bands, p["ratio"], ctx.warn)
    adapters.check_compatible(meta, METHOD, meta.backbone, pair.bands)
    r = pair.ratio
    if r != meta.config["ratio"]:
        raise JobError(
            INVALID_INPUT,
            f"The adapter '{meta.name}' was trained at ratio {meta.config['ratio']}, but this pair has ratio {r}.",
            "Fine-tune an adapter on a pair with this ratio.",
        )
    grid = pair.overlap()
    aoi = None
    if p["aoi"]:
        grid, aoi = restrict_to_aoi(grid, p["aoi"], ctx.warnings)
    if not pair.georeferenced:
        ctx.warn(NOT_GEOREFERENCED)
    ctx.log(
        f"PanAdapter '{meta.name}' on {grid.width} x {grid.height} PAN pixels "
        f"({grid.width * grid.height / 1e6:.1f} MP), {pair.bands} band(s), ratio {r} ({pair.ratio_note})."
    )
    pan_scale, ms_scale = meta.normalization["pan_scale"][0], meta.normalization["ms_scale"][0]
    nb = pair.bands
    with ExitStack() as opened:  # on a failure here, what is open closes; on success the job closes it
        pan_src = opened.enter_context(RasterSource(pair.pan, grid=grid, what="PAN"))
        ms_src = UpsampledMS(pair, grid)
        opened.callback(ms_src.close)
        sources = opened.pop_all()

    def read(win: Window) -> tuple[np.ndarray, np.ndarray]:
        pan, pvalid = pan_src.read(win)
        ms_up, mvalid = ms_src.read(win)
        valid = pvalid & mvalid
        if aoi is not None:
            valid &= aoi.burn(grid.window_grid(win)) > 0
        pan = fill_nearest(pan, pvalid)
        return np.concatenate([ms_up / ms_scale, pan / pan_scale]).astype(np.float32), valid

    def sink(block: int) -> FusedImage:
        title = f"{p['name']} (PanAdapter {meta.name})"
        return FusedImage(ctx, Path(p["out_dir"]) / f"{p['name']}.tif", grid, pair, block, title)

    return Application(
        grid,
        read,
        lambda model, x: model(x[:, :nb], x[:, nb:]).float() * ms_scale,
        nb,
        sink,
        tile=TILE,
        activity="pansharpening",
        tiles_share=1.0,
        # When stage 2 never beat stage 1 its tail is still zero: the prior stage alone gives the same, faster.
        stage="adapter" if meta.config.get("best_stage") == "adapter" else "prior",
        close=sources.close,
        output_bytes_per_pixel=nb * pair.ms_dtype.itemsize,
    )


SPEC = register(
    MethodSpec(
        name=METHOD,
        task="pansharpen",
        title="PanAdapter",
        backbones={"ipt": ("ipt", "edsr_baseline_x2"), "tiny": ("ipt_tiny", "edsr_tiny")},
        default_backbone="ipt",
        build=build,
        finetune_summary="Fine-tune a PanAdapter pansharpening adapter on your own PAN + MS pair (no reference "
        "image needed: reduced-resolution protocol).",
        finetune_params=FINETUNE_PARAMS,
        prepare=prepare,
        apply_summary="Pansharpen a PAN + MS pair with a PanAdapter adapter: the MS's bands at the PAN's resolution.",
        apply_params=APPLY_PARAMS,
        build_config=("ratio",),
        open=open_apply,
        outputs=PANSHARPENED,
        stages={stage: f"stage {i} ({name})" for i, (stage, name) in enumerate(STAGE_NAMES.items(), start=1)},
        apply_title="Pansharpen (PanAdapter adapter)",
        cpu_mp_per_s=0.0034,  # SpaceNet-6, 256² tiles, 2-core dev VM (docs/BENCHMARKS.md)
        apply_batch_size=2,
        default_tile=TILE,
    )
)
