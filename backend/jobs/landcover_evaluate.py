"""landcover.evaluate: accuracy of a land-cover class raster against reference classes (methods.md §2.4, §6).

OA, mIoU, mean F1, κ and the per-class table (IoU, F1, producer's and user's accuracy) from one confusion
matrix over the whole area, read block by block; class 0 (unlabelled) and classes without reference pixels are
left out. The prediction's grid is the evaluation grid. Reference polygons whose class field holds names are
numbered as the adapter numbers its classes (given `adapter`), else in sorted order as fine-tuning does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend import adapters
from backend.context import JobContext
from backend.io.raster import RasterSource, is_raster, overlap_grid
from backend.io.rasterize import PolygonBurner, Polygons, read_polygons, restrict_to_aoi
from backend.jobs.base import JobSpec
from backend.metrics.change import too_few_scored
from backend.metrics.landcover import landcover_scores
from backend.metrics.segmentation import ConfusionMatrix
from backend.params import AOI, Param
from backend.protocol import INVALID_INPUT, JobError, JobResult

MAX_CLASS = 254
ROWS = 512  # rows read per block

PARAMS = (
    Param(
        "prediction",
        str,
        "Land-cover class raster to score, e.g. the '…_landcover_classes.tif' of landcover.map (its grid is the "
        "evaluation grid).",
        required=True,
        kind="raster",
    ),
    Param(
        "reference",
        str,
        "Reference classes: a class raster (0 = unlabelled) or polygons with a class field.",
        required=True,
        kind="layer",
    ),
    Param(
        "reference_field", str, "Field of the reference polygons naming their class.", kind="field", parent="reference"
    ),
    Param(
        "adapter",
        str,
        "The adapter that made the prediction: its class names number reference polygons named by class.",
        kind="adapter",
    ),
    AOI.but(help="Polygon layer of the area of interest: only pixels inside it are scored."),
)


def reference_reader(p: dict[str, Any], grid: Any, names: list[str] | None, warnings: list[str]) -> Any:
    """read(window) -> (reference classes (h, w), known (h, w))."""
    if is_raster(p["reference"], "reference"):
        src = RasterSource(p["reference"], [1], grid=grid, resampling=Resampling.nearest, what="reference")

        def read_raster(win: Window) -> tuple[np.ndarray, np.ndarray]:
            values, valid = src.read(win)
            return values[0], valid

        return read_raster, src.close
    polys = read_polygons(
        p["reference"], grid.crs, p["reference_field"], what="reference", warnings=warnings, names=True
    )
    values = polys.values
    if polys.names and names:
        missing = sorted(set(polys.names) - set(names))
        if missing:
            raise JobError(
                INVALID_INPUT,
                f"The reference names classes the adapter does not know: {', '.join(missing)}.",
                f"The adapter's classes are: {', '.join(names[1:])}.",
            )
        values = [names.index(polys.names[v - 1]) if v > 0 else 0 for v in values]
    burner = PolygonBurner(Polygons(polys.geoms, values))

    def read_polys(win: Window) -> tuple[np.ndarray, np.ndarray]:
        classes = burner.burn(grid.window_grid(win))
        return classes, np.ones(classes.shape, dtype=bool)

    return read_polys, lambda: None


def run(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    names = adapters.read_meta(p["adapter"]).classes if p["adapter"] else None
    with RasterSource(p["prediction"], what="prediction") as probe:
        if probe.count != 1:
            raise JobError(
                INVALID_INPUT,
                f"The prediction raster has {probe.count} bands, but a class raster has one.",
                "Choose the '…_landcover_classes.tif' that landcover.map wrote.",
            )
        grid = probe.native
    if is_raster(p["reference"], "reference"):
        with RasterSource(p["reference"], [1], what="reference") as probe:
            grid = overlap_grid(grid, probe.native, ("prediction", "reference"))
    aoi = None
    if p["aoi"]:
        grid, aoi = restrict_to_aoi(grid, p["aoi"], ctx.warnings)
    read_ref, close_ref = reference_reader(p, grid, names, ctx.warnings)
    confusion = ConfusionMatrix(MAX_CLASS + 1)
    scored = 0
    try:
        with RasterSource(p["prediction"], grid=grid, resampling=Resampling.nearest, what="prediction") as src:
            for row in range(0, grid.height, ROWS):
                win = Window(0, row, grid.width, min(ROWS, grid.height - row))
                pred, valid = src.read(win)
                ref, known = read_ref(win)
                keep = valid & known & (ref > 0)
                if aoi is not None:
                    keep &= aoi.burn(grid.window_grid(win)) > 0
                if np.any((pred[0][keep] > MAX_CLASS) | (ref[keep] > MAX_CLASS) | (pred[0][keep] % 1 != 0)):
                    raise JobError(INVALID_INPUT, f"Class rasters hold whole numbers 0 … {MAX_CLASS}.")
                confusion.update(pred[0][keep].astype(np.int64), ref[keep].astype(np.int64))
                scored += int(keep.sum())
                ctx.progress(0.9 * (row + win.height) / grid.height, "scoring")
    finally:
        close_ref()
    few = too_few_scored(scored, grid.width * grid.height)
    if not scored or few:
        raise JobError(
            INVALID_INPUT,
            f"{few or 'No labelled reference pixel lies under the prediction'}.",
            "Check that the reference covers the prediction and labels classes other than 0.",
        )
    if names and is_raster(p["reference"], "reference"):
        # A class raster carries numbers, not names: say how they were read, and what the adapter cannot know.
        ctx.warn(
            "The reference raster's class numbers are read as the adapter's classes: "
            + ", ".join(f"{k} = {n}" for k, n in enumerate(names) if k > 0)
            + "."
        )
        unknown = np.flatnonzero(confusion.matrix[len(names) :].sum(axis=1)) + len(names)
        if unknown.size:
            ctx.warn(
                f"The reference raster holds class numbers the adapter does not know ({', '.join(map(str, unknown))}); "
                "their pixels count as errors, and those classes enter mIoU and mean F1 with a score of 0."
            )
    metrics = landcover_scores(confusion.matrix, names)
    metrics["scored_pixels"] = scored
    return JobResult(metrics=metrics)


SPEC = JobSpec(
    "landcover.evaluate",
    "Score a land-cover class raster against reference classes (OA, mIoU, mean F1, κ, per-class table).",
    PARAMS,
    run,
    title="Evaluate a land-cover map",
)
