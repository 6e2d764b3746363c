"""change.cva: classical change-vector analysis with an Otsu threshold.

Both dates are standardised per band (mean/std over the overlap), the magnitude of the
difference vector is smoothed with a small Gaussian, and Otsu's threshold on its histogram
separates change from no change. It is the baseline learned change detectors must beat.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling

from backend.context import JobContext
from backend.io.maps import CHANGE, MapOutputs, stack_reader
from backend.io.raster import Grid, RasterSource, overlap_grid, require_same_band_count
from backend.io.rasterize import restrict_to_aoi
from backend.io.tiling import TileSpec, block_windows, run_tiled
from backend.io.writer import GeoTiffWriter
from backend.jobs.base import JobSpec
from backend.methods.cva import magnitude, otsu_threshold, smoothing_radius
from backend.params import (
    AFTER,
    AOI,
    BANDS,
    BATCH_SIZE,
    BEFORE,
    MIN_AREA_M2,
    NAME,
    OUT_DIR,
    OVERLAP,
    REFERENCE,
    SIMPLIFY,
    TILE_SIZE,
    Param,
)
from backend.preflight import preflight
from backend.protocol import INVALID_INPUT, JobError, JobResult

HIST_BINS = 2048
CPU_MP_PER_S = 2.0  # whole job, 2-core dev VM (docs/BENCHMARKS.md, raster engine)

PARAMS = (
    BEFORE,
    AFTER,
    OUT_DIR,
    AOI,
    BANDS.but(help="Bands to compare, e.g. 1,2,3 (default: all)."),
    REFERENCE.but(help="Optional reference change mask (non-zero = change) to score against."),
    Param("threshold", float, "Fixed magnitude threshold instead of Otsu's.", minimum=0.0, maximum=1e9, step=0.05),
    Param(
        "smooth",
        float,
        "Gaussian smoothing of the magnitude, sigma in pixels (0 = none).",
        default=1.0,
        minimum=0.0,
        maximum=1000.0,
        step=0.5,
    ),
    MIN_AREA_M2.but(help="Drop change polygons smaller than this (square metres)."),
    SIMPLIFY.but(help="Simplify polygon outlines, tolerance in pixels (0 = exact pixel edges)."),
    NAME.but(default="cva"),
    TILE_SIZE.but(default=512),
    OVERLAP.but(default=64),
    BATCH_SIZE.but(default=4, help="Tiles processed together."),
)


def run(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    ctx.protect_inputs(p["before"], p["after"], p["reference"])
    out_dir = ctx.prepare_out_dir(p["out_dir"])
    radius = smoothing_radius(p["smooth"])
    try:
        spec = TileSpec(p["tile_size"], max(p["overlap"], 2 * radius + 2), p["batch_size"], margin=radius)
    except ValueError as exc:
        raise JobError(INVALID_INPUT, str(exc), "Use a larger tile size or a smaller smoothing.") from None

    with (
        RasterSource(p["before"], p["bands"], what="before") as probe_b,
        RasterSource(p["after"], p["bands"], what="after") as probe_a,
    ):
        require_same_band_count(probe_b, probe_a, ctx.warnings)
        grid = overlap_grid(probe_b.native, probe_a.native, ("before", "after"))
    aoi = None
    if p["aoi"]:
        grid, aoi = restrict_to_aoi(grid, p["aoi"], ctx.warnings)
    if not grid.georeferenced:
        ctx.warn("The rasters are not georeferenced: they are compared pixel by pixel and outputs have no CRS.")

    # The temporary magnitude (float32) sits beside the outputs until they are written.
    preflight(ctx, grid.height, grid.width, spec.stride, out_dir, 5.0 + 4.0, "cpu", CPU_MP_PER_S)
    before = RasterSource(p["before"], p["bands"], grid=grid, what="before")
    after = RasterSource(p["after"], p["bands"], grid=grid, resampling=Resampling.bilinear, what="after")
    with before, after, tempfile.TemporaryDirectory(dir=out_dir, prefix=f".partial-{ctx.job_id}-") as tmp:
        read_pair = stack_reader((before, after), grid, aoi)

        mean, std = _band_stats(ctx, grid, read_pair, before.count)
        nb = before.count

        def tile_magnitude(batch: np.ndarray, valid: np.ndarray) -> np.ndarray:
            return magnitude(batch, valid, mean, std, nb, p["smooth"])

        mag_path = Path(tmp) / "magnitude.tif"
        with GeoTiffWriter(mag_path, grid, 1, "float32", float("nan"), block=spec.stride) as mag_w:
            run_tiled(
                grid.height,
                grid.width,
                read_pair,
                tile_magnitude,
                mag_w.write,
                1,
                spec,
                on_tile=lambda d, t: ctx.progress(0.15 + 0.55 * d / t, "change magnitude", f"tile {d}/{t}"),
            )

        threshold = p["threshold"]
        if threshold is None:
            threshold = otsu_threshold(*_histogram(ctx, mag_path, spec.stride))
        result = _write_outputs(ctx, p, out_dir, grid, mag_path, float(threshold), spec.stride)
    return result


def _band_stats(ctx: JobContext, grid: Grid, read_pair: Any, nb: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std of both dates over pixels valid in both (streamed, float64)."""
    s = np.zeros(2 * nb)
    ss = np.zeros(2 * nb)
    n = 0
    wins = list(block_windows(grid.width, grid.height, 512))
    for i, win in enumerate(wins):
        data, valid = read_pair(win)
        v = data[:, valid].astype(np.float64)
        s += v.sum(axis=1)
        ss += (v * v).sum(axis=1)
        n += v.shape[1]
        ctx.progress(0.15 * (i + 1) / len(wins), "statistics", f"block {i + 1}/{len(wins)}")
    if n == 0:
        raise JobError(
            INVALID_INPUT,
            "The before and after rasters have no pixel where both hold data.",
            "Check their nodata values and that they cover the same area.",
        )
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    return mean.astype(np.float32), np.where(std > 1e-12, std, 1.0).astype(np.float32)


def _histogram(ctx: JobContext, mag_path: Path, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of the magnitude over [0, max] (two streamed reads of the temporary raster)."""
    with rasterio.open(mag_path) as ds:
        wins = list(block_windows(ds.width, ds.height, block))
        hi = 0.0
        for win in wins:
            m = ds.read(1, window=win)
            if np.isfinite(m).any():
                hi = max(hi, float(np.nanmax(m)))
        edges = np.linspace(0.0, max(hi, 1e-6), HIST_BINS + 1)
        hist = np.zeros(HIST_BINS, dtype=np.int64)
        for i, win in enumerate(wins):
            m = ds.read(1, window=win)
            hist += np.histogram(m[np.isfinite(m)], bins=edges)[0]
            ctx.progress(0.70 + 0.05 * (i + 1) / len(wins), "threshold")
    return hist, edges


def _write_outputs(
    ctx: JobContext, p: dict[str, Any], out_dir: Path, grid: Grid, mag_path: Path, threshold: float, block: int
) -> JobResult:
    # Logistic of the distance to the threshold: 0.5 at the threshold, ~0.98 at twice it.
    scale = max(threshold, 1e-6) / 4
    with (
        rasterio.open(mag_path) as mag_ds,
        MapOutputs(
            ctx, out_dir, p["name"], grid, block, CHANGE, p["reference"], 0.5, p["simplify"], p["min_area_m2"]
        ) as outs,
    ):
        wins = list(block_windows(grid.width, grid.height, block))
        for i, win in enumerate(wins):
            mag = mag_ds.read(1, window=win)
            valid = np.isfinite(mag)
            mag = np.where(valid, mag, 0.0)
            outs.write(win, 1.0 / (1.0 + np.exp(-np.clip((mag - threshold) / scale, -60, 60))), valid)
            ctx.progress(0.75 + 0.15 * (i + 1) / len(wins), "writing outputs")
    return outs.finish(extra={"threshold": threshold})


SPEC = JobSpec(
    "change.cva",
    "Change-vector analysis with an Otsu threshold (classical baseline).",
    PARAMS,
    run,
    title="Detect (CVA, no training)",
    outputs=CHANGE.declared(),
)
