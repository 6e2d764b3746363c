"""pansharpen.evaluate: quality indices of pansharpening on a PAN + MS pair (methods.md §6).

Reduced resolution (Wald's protocol), with a method: PAN and MS are degraded by the ratio with the sensor's
MTF filters, the method fuses the degraded pair, and the result is compared with the original MS (Q2n, SAM,
ERGAS, SCC, PSNR). Plain 23-tap interpolation of the degraded MS (EXP) is scored alongside as the reference
every method must beat. Full resolution, without a reference: D_lambda, D_s and HQNR of the method, of EXP
and of an optional pansharpened raster (`fused`, read on the PAN grid).

The indices need whole arrays, so the job scores the centre window of at most max_size x max_size PAN pixels
of the PAN/MS overlap (or of the area of interest's bounding box), whole MS pixels only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend.io.raster import Grid, RasterSource
from backend.io.rasterize import restrict_to_aoi
from backend.jobs.base import JobContext, JobSpec, Param
from backend.jobs.pansharpen_classic import (
    METHOD_TITLES,
    METHODS,
    RATIO,
    SENSOR,
    Pair,
    open_pair,
    sensor_gains,
)
from backend.methods.pansharpening_classic import brovey, gsa, mtf_glp_hpm, upsample, wald_protocol
from backend.metrics.pansharpening import full_resolution_metrics, reduced_resolution_metrics
from backend.protocol import INVALID_INPUT, JobError, JobResult

MIN_MS_PIXELS = 8  # per side of the twice-degraded MS (window / ratio^2): less leaves nothing to interpolate
MAX_INVALID = 0.5  # above this fraction of nodata in the window the scores would mean little

PARAMS = (
    Param("pan", str, "Panchromatic raster (one band).", required=True, kind="raster"),
    Param("ms", str, "Multispectral raster (any CRS; read onto the PAN's grid).", required=True, kind="raster"),
    Param(
        "fused",
        str,
        "A pansharpened result of this pair to score at full resolution (D_lambda, D_s, HQNR).",
        kind="raster",
    ),
    Param(
        "method",
        str,
        "Also score a classical method at reduced resolution (Wald's protocol) and at full resolution, "
        "next to plain interpolation (EXP); none = only the fused raster.",
        default="none",
        choices=(*METHODS, "none"),
    ),
    SENSOR,
    RATIO,
    Param("ms_bands", list, "MS bands to evaluate, e.g. 1,2,3 (default: all).", kind="bands"),
    Param("aoi", str, "Polygon layer: evaluate inside its bounding box (default: the whole overlap).", kind="polygons"),
    Param(
        "max_size",
        int,
        "Side of the evaluated window in PAN pixels (its centre part when the area is larger).",
        default=1024,
    ),
)


def run(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    method = p["method"]
    if method == "none" and not p["fused"]:
        raise JobError(
            INVALID_INPUT,
            "Nothing to evaluate: choose a method, or give a pansharpened raster (fused) to score.",
        )
    pair = open_pair(ctx, p["pan"], p["ms"], p["ms_bands"], p["ratio"])
    r = pair.ratio
    gains = sensor_gains(p["sensor"], pair.bands)
    grid = pair.overlap()
    if p["aoi"]:
        grid, _ = restrict_to_aoi(grid, p["aoi"], ctx.warnings)
    if not pair.georeferenced:
        ctx.warn("The PAN and MS are not georeferenced: they are matched in pixel space (same top-left corner).")
    win = centre_window(grid, pair, p["max_size"])
    pan_grid = grid.window_grid(win)
    ctx.log(
        f"Evaluating the centre window of {pan_grid.width} x {pan_grid.height} PAN pixels of the "
        f"{grid.width} x {grid.height} {'area of interest' if p['aoi'] else 'PAN/MS overlap'} "
        f"(ratio {r}, {pair.ratio_note}): the indices need whole arrays, so larger areas are scored by their "
        "centre (max_size sets the window)."
    )
    ctx.progress(0.05, "reading")
    pan, ms = read_window(ctx, pair, pan_grid)

    metrics: dict[str, Any] = {}
    if method != "none":
        ctx.progress(0.2, "reduced resolution", METHOD_TITLES[method])
        ms_lr, pan_lr = wald_protocol(ms, pan, r, p["sensor"])
        exp_lr = upsample(ms_lr, r)
        fused_lr = _fuse(method, pan_lr, exp_lr, ms_lr, r, gains)
        # PSNR against the reference's own peak: 11-bit data stored as uint16 would look better than it is
        # against the dtype's.
        rr = {
            "method": reduced_resolution_metrics(fused_lr, ms, r),
            "exp": reduced_resolution_metrics(exp_lr, ms, r),
        }
        for key in ("q2n", "sam", "ergas", "scc", "psnr"):
            for who in ("method", "exp"):
                metrics[f"rr_{who}_{key}"] = rr[who][key]
        ctx.progress(0.6, "full resolution", METHOD_TITLES[method])
        ms_up = upsample(ms, r)
        fr_method = full_resolution_metrics(_fuse(method, pan, ms_up, ms, r, gains), ms, pan, r, gains)
        fr_exp = full_resolution_metrics(ms_up, ms, pan, r, gains)
        for key in ("hqnr", "d_lambda", "d_s"):
            metrics[f"fr_method_{key}"] = fr_method[key]
            metrics[f"fr_exp_{key}"] = fr_exp[key]
    if p["fused"]:
        ctx.progress(0.8, "full resolution", "fused raster")
        fused = _read_fused(ctx, p["fused"], pan_grid, pair)
        fr = full_resolution_metrics(fused, ms, pan, r, gains)
        metrics |= {f"fused_{k}": fr[k] for k in ("hqnr", "d_lambda", "d_s")}
        if method == "none":
            fr_exp = full_resolution_metrics(upsample(ms, r), ms, pan, r, gains)
            metrics |= {f"fr_exp_{k}": fr_exp[k] for k in ("hqnr", "d_lambda", "d_s")}
    metrics |= {
        "method": method,
        "ratio": r,
        "window_width": pan_grid.width,
        "window_height": pan_grid.height,
    }
    ctx.progress(1.0, "done", force=True)
    # Identical arrays give an infinite PSNR, which JSON cannot carry.
    return JobResult(
        metrics={k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    )


def _fuse(method: str, pan: np.ndarray, ms_up: np.ndarray, ms: np.ndarray, ratio: int, gains: np.ndarray) -> np.ndarray:
    if method == "brovey":
        return brovey(pan, ms_up)
    if method == "gsa":
        return gsa(pan, ms_up, ms, ratio)
    return mtf_glp_hpm(pan, ms_up, ratio, gains)


def centre_window(grid: Grid, pair: Pair, max_size: int) -> Window:
    """The centre window of the grid: at most max_size per side, whole MS pixels, a multiple of ratio^2."""
    r = pair.ratio
    step = r * r  # the reference MS (window / r) must itself be divisible by r for Wald's degradation
    need = MIN_MS_PIXELS * step
    if max_size < need:
        raise JobError(INVALID_INPUT, f"max_size must be at least {need} PAN pixels at ratio {r}.")
    phase = pair.ms_origin_phase(grid)
    sizes = []
    for length, ph in ((grid.height, phase[0]), (grid.width, phase[1])):
        usable = length - ph  # start on an MS pixel corner
        size = min(max_size, usable) // step * step
        if size < need:
            raise JobError(
                INVALID_INPUT,
                f"The area to evaluate is only {grid.width} x {grid.height} PAN pixels; at ratio {r} the "
                f"evaluation needs at least {need} x {need}.",
                "Use a larger area of interest (or larger rasters).",
            )
        start = ph + (usable - size) // 2 // r * r
        sizes.append((start, size))
    (row, h), (col, w) = sizes
    return Window(col, row, w, h)


def ms_scale_grid(pan_grid: Grid, ratio: int) -> Grid:
    """The grid of MS pixels covering `pan_grid` (ratio x ratio PAN pixels each)."""
    return Grid(
        pan_grid.crs, pan_grid.transform * Affine.scale(ratio), pan_grid.width // ratio, pan_grid.height // ratio
    )


def _fill(ctx: JobContext, data: np.ndarray, valid: np.ndarray, what: str) -> np.ndarray:
    """Nodata pixels filled with the band means (the indices need whole arrays), with a warning."""
    bad = float(1.0 - valid.mean())
    if bad == 0:
        return data.astype(np.float64)
    if bad > MAX_INVALID:
        raise JobError(
            INVALID_INPUT,
            f"{100 * bad:.0f} % of the {what} in the evaluation window is nodata; the scores would mean little.",
            "Choose an area of interest where the PAN and MS hold data.",
        )
    ctx.warn(f"{100 * bad:.1f} % of the {what} in the evaluation window is nodata; it is filled with band means.")
    out = data.astype(np.float64)
    for b in range(out.shape[0]):
        out[b][~valid] = out[b][valid].mean()
    return out


def read_window(ctx: JobContext, pair: Pair, pan_grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """PAN on its own grid and MS on its native pixels (resampled only when its grid does not nest)."""
    full = Window(0, 0, pan_grid.width, pan_grid.height)
    with RasterSource(pair.pan, grid=pan_grid, what="PAN") as src:
        pan, pvalid = src.read(full)
    ms_grid = ms_scale_grid(pan_grid, pair.ratio)
    with pair.ms_reader(ms_grid, Resampling.cubic) as src:
        ms, mvalid = src.read(Window(0, 0, ms_grid.width, ms_grid.height))
    return _fill(ctx, pan, pvalid, "PAN")[0], _fill(ctx, ms, mvalid, "MS")


def _read_fused(ctx: JobContext, path: str, pan_grid: Grid, pair: Pair) -> np.ndarray:
    with RasterSource(path, grid=pan_grid, resampling=Resampling.cubic, what="fused") as src:
        if src.count != pair.bands:
            raise JobError(
                INVALID_INPUT,
                f"The fused raster has {src.count} band(s) but {pair.bands} MS band(s) are evaluated.",
                "Give the pansharpened result of these MS bands (or choose the same bands with ms_bands).",
            )
        data, valid = src.read(Window(0, 0, pan_grid.width, pan_grid.height))
    return _fill(ctx, data, valid, "fused raster")


SPEC = JobSpec(
    "pansharpen.evaluate",
    "Score pansharpening on a PAN + MS pair: reduced-resolution Q2n, SAM, ERGAS, SCC, PSNR (Wald's protocol) "
    "against plain interpolation, and full-resolution D_lambda, D_s, HQNR.",
    PARAMS,
    run,
    title="Evaluate pansharpening",
)
