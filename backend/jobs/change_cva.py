"""change.cva: classical change-vector analysis with an Otsu threshold.

Both dates are standardised per band (mean/std over the overlap), the magnitude of the
difference vector is smoothed with a small Gaussian, and Otsu's threshold on its histogram
separates change from no change. It is the baseline learned change detectors must beat.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend.context import JobContext
from backend.io.maps import CHANGE, MapOutputs, stack_reader
from backend.io.raster import Grid, RasterSource, overlap_grid, require_same_band_count
from backend.io.rasterize import PolygonBurner, restrict_to_aoi
from backend.io.tiling import TiledPass, TileSpec, block_windows
from backend.io.writer import GeoTiffWriter
from backend.jobs.base import JobSpec
from backend.methods.cva import magnitude, otsu_threshold, smoothing_radius
from backend.params import (
    AFTER,
    AOI,
    BANDS,
    BATCH_SIZE,
    BEFORE,
    CLUSTER,
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
STATS_BLOCK = 512  # windows of the band statistics (their sums are added in this order)
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
    CLUSTER,
)


def _area(ctx: JobContext, p: dict[str, Any]) -> tuple[Grid, PolygonBurner | None, TileSpec]:
    """The grid both dates cover (inside the area of interest) and the tiles, checked."""
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
    return grid, aoi, spec


class _Pair:
    """Both dates open on the grid: `read` stacks a window of both (valid where both are)."""

    def __init__(self, p: dict[str, Any], grid: Grid, aoi: PolygonBurner | None) -> None:
        self.before = RasterSource(p["before"], p["bands"], grid=grid, what="before")
        self.after = RasterSource(p["after"], p["bands"], grid=grid, resampling=Resampling.bilinear, what="after")
        self.read = stack_reader((self.before, self.after), grid, aoi)
        self.bands = self.before.count

    def close(self) -> None:
        self.before.close()
        self.after.close()


def run(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    ctx.protect_inputs(p["before"], p["after"], p["reference"])
    out_dir = ctx.prepare_out_dir(p["out_dir"])
    grid, aoi, spec = _area(ctx, p)
    # The temporary magnitude (float32) sits beside the outputs until they are written.
    preflight(ctx, grid.height, grid.width, spec.stride, out_dir, 5.0 + 4.0, "cpu", CPU_MP_PER_S)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".partial-{ctx.job_id}-") as tmp:
        pair = _Pair(p, grid, aoi)
        try:
            windows = list(block_windows(grid.width, grid.height, STATS_BLOCK))
            sums = []
            for i, win in enumerate(windows):
                sums.append(_window_sums(pair.read, win))
                ctx.progress(0.15 * (i + 1) / len(windows), "statistics", f"block {i + 1}/{len(windows)}")
            mean, std = _band_stats(sums, pair.bands)
            tiles = _magnitude_pass(p, grid, spec, pair, mean, std)
            mag_path = Path(tmp) / "magnitude.tif"
            with GeoTiffWriter(mag_path, grid, 1, "float32", float("nan"), block=spec.stride) as mag_w:
                tiles.run(
                    mag_w.write,
                    on_tile=lambda d, t: ctx.progress(0.15 + 0.55 * d / t, "change magnitude", f"tile {d}/{t}"),
                )
        finally:
            pair.close()
        with rasterio.open(mag_path) as mag_ds:

            def magnitudes() -> Iterator[tuple[Window, np.ndarray, np.ndarray]]:
                for win in block_windows(grid.width, grid.height, spec.stride):
                    m = mag_ds.read(1, window=win)
                    yield win, m, np.isfinite(m)

            threshold = p["threshold"]
            if threshold is None:
                hi = max((_finite_max(m, v) for _, m, v in magnitudes()), default=0.0)
                edges = _edges(hi)
                hist = np.zeros(HIST_BINS, dtype=np.int64)
                total = len(list(block_windows(grid.width, grid.height, spec.stride)))
                for i, (_, m, v) in enumerate(magnitudes()):
                    hist += _counts(m, v, edges)
                    ctx.progress(0.70 + 0.05 * (i + 1) / total, "threshold")
                threshold = otsu_threshold(hist, edges)
            return _write_outputs(ctx, p, out_dir, grid, magnitudes(), float(threshold), spec.stride)


def _magnitude_pass(
    p: dict[str, Any], grid: Grid, spec: TileSpec, pair: _Pair, mean: np.ndarray, std: np.ndarray
) -> TiledPass:
    def tile_magnitude(batch: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return magnitude(batch, valid, mean, std, pair.bands, p["smooth"])

    return TiledPass(grid.height, grid.width, pair.read, tile_magnitude, 1, spec, pair.close)


def _window_sums(read_pair: Any, win: Window) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-band sum and sum of squares of both dates over a window's pixels valid in both (float64)."""
    data, valid = read_pair(win)
    v = data[:, valid].astype(np.float64)
    return v.sum(axis=1), (v * v).sum(axis=1), v.shape[1]


def _band_stats(sums: list[tuple[np.ndarray, np.ndarray, int]], nb: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std of both dates from the windows' sums, added in window order (so that any split of
    the windows among processes gives the same numbers)."""
    s = np.zeros(2 * nb)
    ss = np.zeros(2 * nb)
    n = 0
    for ws, wss, wn in sums:
        s += ws
        ss += wss
        n += wn
    if n == 0:
        raise JobError(
            INVALID_INPUT,
            "The before and after rasters have no pixel where both hold data.",
            "Check their nodata values and that they cover the same area.",
        )
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    return mean.astype(np.float32), np.where(std > 1e-12, std, 1.0).astype(np.float32)


def _finite_max(m: np.ndarray, valid: np.ndarray) -> float:
    vals = m[valid & np.isfinite(m)]
    return float(vals.max()) if vals.size else 0.0


def _edges(hi: float) -> np.ndarray:
    """The magnitude histogram's bins over [0, max]."""
    return np.linspace(0.0, max(hi, 1e-6), HIST_BINS + 1)


def _counts(m: np.ndarray, valid: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.histogram(m[valid & np.isfinite(m)], bins=edges)[0]


def _write_outputs(
    ctx: JobContext,
    p: dict[str, Any],
    out_dir: Path,
    grid: Grid,
    magnitudes: Iterable[tuple[Window, np.ndarray, np.ndarray]],
    threshold: float,
    block: int,
) -> JobResult:
    # Logistic of the distance to the threshold: 0.5 at the threshold, ~0.98 at twice it.
    scale = max(threshold, 1e-6) / 4
    total = len(list(block_windows(grid.width, grid.height, block)))
    with MapOutputs(
        ctx, out_dir, p["name"], grid, block, CHANGE, p["reference"], 0.5, p["simplify"], p["min_area_m2"]
    ) as outs:
        for i, (win, mag, valid) in enumerate(magnitudes):
            mag = np.where(valid, mag, 0.0)
            outs.write(win, 1.0 / (1.0 + np.exp(-np.clip((mag - threshold) / scale, -60, 60))), valid)
            ctx.progress(0.75 + 0.15 * (i + 1) / total, "writing outputs")
    return outs.finish(extra={"threshold": threshold})


# --- on a Ray cluster (backend/distributed/cluster.py) -------------------------------------------------------------


def _sums_task(job: tuple[dict[str, Any], list[Window]]) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """A cluster task: the window sums of a run of windows of one scene."""
    p, windows = job
    grid, aoi, _ = _area(JobContext(), p)
    pair = _Pair(p, grid, aoi)
    try:
        return [_window_sums(pair.read, win) for win in windows]
    finally:
        pair.close()


def _actor_pass(p: dict[str, Any], mean: np.ndarray, std: np.ndarray) -> TiledPass:
    """A cluster actor's magnitude pass of one scene."""
    grid, aoi, spec = _area(JobContext(), p)
    return _magnitude_pass(p, grid, spec, _Pair(p, grid, aoi), mean, std)


def _part_blocks(path: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(magnitude, valid) of a part file, block by block (a part may be large)."""
    with rasterio.open(path) as ds:
        for win in block_windows(ds.width, ds.height, STATS_BLOCK):
            m, v = ds.read(window=win)
            yield m, v > 0.5


def _part_max(path: str) -> float:
    return max((_finite_max(m, v) for m, v in _part_blocks(path)), default=0.0)


def _part_counts(job: tuple[str, np.ndarray]) -> np.ndarray:
    return np.sum([_counts(m, v, job[1]) for m, v in _part_blocks(job[0])], axis=0, dtype=np.int64)


def run_on_cluster(scenes: list, cluster: Any) -> list[JobResult]:
    """CVA on a Ray cluster: the band statistics, the magnitude and the Otsu histogram are computed by parts on the
    cluster (the statistics added in window order, the histogram counts summed), so the threshold and the maps
    are those of `run`; the outputs are written here."""
    from backend.distributed.cluster import PassRef, read_blocks

    areas = []
    for scene in scenes:
        ctx, p = scene.ctx, scene.params
        ctx.protect_inputs(p["before"], p["after"], p["reference"])
        p["out_dir"] = str(ctx.prepare_out_dir(p["out_dir"]))
        areas.append(_area(ctx, p))
    # Statistics: runs of windows (a block row at a time) as cluster tasks.
    jobs, owners = [], []
    for i, (scene, (grid, _, _)) in enumerate(zip(scenes, areas, strict=True)):
        for row in range(0, grid.height, STATS_BLOCK):
            jobs.append((scene.params, list(block_windows(grid.width, grid.height, STATS_BLOCK, row // STATS_BLOCK))))
            owners.append(i)
    sums = cluster.map(_sums_task, jobs, 0.0, 0.1, "statistics")
    refs = []
    for i, (scene, (grid, _, spec)) in enumerate(zip(scenes, areas, strict=True)):
        mine = [w for owner, run in zip(owners, sums, strict=True) if owner == i for w in run]
        mean, std = _band_stats(mine, len(mine[0][0]) // 2)
        refs.append(PassRef(partial(_actor_pass, scene.params, mean, std), grid, spec, 1))
    vrts = cluster.tiled(refs, "cpu", 0.1, 0.7)
    results = []
    for i, (scene, (grid, _, spec), vrt) in enumerate(zip(scenes, areas, vrts, strict=True)):
        threshold = scene.params["threshold"]
        if threshold is None:
            files = [str(f) for f in cluster.part_files(i)]
            hi = max(cluster.map(_part_max, files, 0.7, 0.72, "threshold"), default=0.0)
            edges = _edges(hi)
            counts = cluster.map(_part_counts, [(f, edges) for f in files], 0.72, 0.75, "threshold")
            threshold = otsu_threshold(np.sum(counts, axis=0, dtype=np.int64), edges)
        blocks = ((win, values[0], valid) for win, values, valid in read_blocks(vrt, grid, spec.stride))
        results.append(
            _write_outputs(
                scene.ctx, scene.params, Path(scene.params["out_dir"]), grid, blocks, float(threshold), spec.stride
            )
        )
    return results


SPEC = JobSpec(
    "change.cva",
    "Change-vector analysis with an Otsu threshold (classical baseline).",
    PARAMS,
    run,
    title="Detect (CVA, no training)",
    outputs=CHANGE.declared(),
    cluster=run_on_cluster,
)
