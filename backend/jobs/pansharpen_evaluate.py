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
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend.context import JobContext
from backend.io.pairs import Pair, centre_window, fill_means, open_pair, read_window
from backend.io.raster import Grid, RasterSource
from backend.io.rasterize import restrict_to_aoi
from backend.jobs.base import JobSpec
from backend.jobs.pansharpen_classic import METHOD_TITLES, METHODS
from backend.methods.pansharpening_classic import (
    MAX_SIZE,
    MS,
    MS_BANDS,
    PAN,
    RATIO,
    SENSOR,
    brovey,
    gsa,
    mtf_glp_hpm,
    sensor_gains,
    upsample,
    wald_protocol,
)
from backend.metrics.pansharpening import full_resolution_metrics, reduced_resolution_metrics
from backend.params import AOI, Param
from backend.protocol import INVALID_INPUT, JobError, JobResult

PARAMS = (
    PAN.but(help="Panchromatic raster (one band)."),
    MS.but(help="Multispectral raster (any CRS; read onto the PAN's grid)."),
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
        prominent=True,
    ),
    SENSOR,
    RATIO,
    MS_BANDS.but(help="MS bands to evaluate, e.g. 1,2,3 (default: all)."),
    AOI.but(help="Polygon layer: evaluate inside its bounding box (default: the whole overlap)."),
    MAX_SIZE.but(
        help="Side of the evaluated window in PAN pixels (its centre part when the area is larger).", default=1024
    ),
)


def run(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    method = p["method"]
    if method == "none" and not p["fused"]:
        raise JobError(
            INVALID_INPUT,
            "Nothing to evaluate: choose a method, or give a pansharpened raster (fused) to score.",
        )
    pair = open_pair(p["pan"], p["ms"], p["ms_bands"], p["ratio"], ctx.warn)
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
    pan, ms = read_window(pair, pan_grid, ctx.warn)

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


def _read_fused(ctx: JobContext, path: str, pan_grid: Grid, pair: Pair) -> np.ndarray:
    with RasterSource(path, grid=pan_grid, resampling=Resampling.cubic, what="fused") as src:
        if src.count != pair.bands:
            raise JobError(
                INVALID_INPUT,
                f"The fused raster has {src.count} band(s) but {pair.bands} MS band(s) are evaluated.",
                "Give the pansharpened result of these MS bands (or choose the same bands with ms_bands).",
            )
        data, valid = src.read(Window(0, 0, pan_grid.width, pan_grid.height))
    return fill_means(data, valid, "fused raster", ctx.warn)


SPEC = JobSpec(
    "pansharpen.evaluate",
    "Score pansharpening on a PAN + MS pair: reduced-resolution Q2n, SAM, ERGAS, SCC, PSNR (Wald's protocol) "
    "against plain interpolation, and full-resolution D_lambda, D_s, HQNR.",
    PARAMS,
    run,
    title="Evaluate pansharpening",
)
