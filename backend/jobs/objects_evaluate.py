"""objects.evaluate: accuracy of an object mask against reference objects, by pixel and by object.

Pixel scores as mmseg computes them on the 2-class map {background, object}: the object class's IoU, F1,
precision and recall, and the means over both classes (mIoU, mDice, mFscore). Object scores: predicted objects
(connected regions of the mask) and reference objects (each polygon, or each connected region of a reference
mask) matched one to one at IoU ≥ 0.5 (backend/metrics/objects.py). The prediction's grid is the evaluation
grid; pixels that are nodata in either layer, or outside the area of interest, are not scored. The whole area is
scored in memory (object matching needs every object whole), up to MAX_PIXELS.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.windows import Window

from backend.context import JobContext
from backend.io.raster import RasterSource, is_raster, overlap_grid
from backend.io.rasterize import read_polygons, restrict_to_aoi
from backend.jobs.base import JobSpec
from backend.metrics.change import too_few_scored
from backend.metrics.objects import instances, match
from backend.metrics.segmentation import ConfusionMatrix
from backend.params import AOI, Param
from backend.protocol import INVALID_INPUT, JobError, JobResult

MAX_PIXELS = 8192 * 8192

PARAMS = (
    Param(
        "prediction",
        str,
        "Object mask to score (0 = background, one other value = object), e.g. the '…_object_mask.tif' of "
        "objects.segment. "
        "Its grid is the evaluation grid.",
        required=True,
        kind="raster",
    ),
    Param(
        "reference",
        str,
        "Reference objects: polygons (each one object) or a mask raster (non-zero = object; each connected region "
        "one object).",
        required=True,
        kind="layer",
    ),
    Param(
        "reference_field",
        str,
        "Field of the reference polygons: those holding 0 or 'background' are not objects (default: all are).",
        kind="field",
        parent="reference",
    ),
    AOI.but(help="Polygon layer of the area of interest: only pixels inside it are scored."),
)


def run(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    with RasterSource(p["prediction"], what="prediction") as probe:
        if probe.count != 1:
            raise JobError(
                INVALID_INPUT,
                f"The prediction raster has {probe.count} bands, but an object mask has one (1 = object, 0 = "
                "background): is it an image rather than a mask?",
                "Choose the object mask objects.segment wrote.",
            )
        grid = probe.native
    ref_raster = is_raster(p["reference"], "reference")
    if ref_raster:
        with RasterSource(p["reference"], [1], what="reference") as probe:
            grid = overlap_grid(grid, probe.native, ("prediction", "reference"))
    aoi = None
    if p["aoi"]:
        grid, aoi = restrict_to_aoi(grid, p["aoi"], ctx.warnings)
    if grid.width * grid.height > MAX_PIXELS:
        raise JobError(
            INVALID_INPUT,
            f"The area to score is {grid.width} × {grid.height} pixels; object scores need it whole, up to "
            f"{MAX_PIXELS / 1e6:.0f} megapixels.",
            "Choose an area of interest (aoi) inside it.",
        )
    whole = Window(0, 0, grid.width, grid.height)
    ctx.progress(0.1, "reading the prediction", force=True)
    with RasterSource(p["prediction"], grid=grid, resampling=Resampling.nearest, what="prediction") as src:
        values, scored = src.read(whole)
    present = np.unique(values[0][scored])
    if np.count_nonzero(present) > 1:  # a mask holds 0 and one value (1, or 255 in many tools)
        shown = ", ".join(f"{v:g}" for v in present[:4])
        raise JobError(
            INVALID_INPUT,
            f"The prediction holds the values {shown}{' …' if present.size > 4 else ''}: an object mask holds 0 "
            "and one other value.",
            "Choose the object mask objects.segment wrote (its '…_object_classes.tif' holds class numbers).",
        )
    predicted = values[0] != 0
    ctx.progress(0.4, "reading the reference", force=True)
    if ref_raster:
        with RasterSource(p["reference"], [1], grid=grid, resampling=Resampling.nearest, what="reference") as src:
            ref_values, ref_valid = src.read(whole)
        reference = instances(ref_values[0] > 0)
        scored &= ref_valid
    else:
        polys = read_polygons(
            p["reference"], grid.crs, p["reference_field"], what="reference", warnings=ctx.warnings, names=True
        )
        objects = [(g, i) for i, (g, v) in enumerate(zip(polys.geoms, polys.values, strict=True), 1) if v > 0]
        reference = (
            rasterize(objects, out_shape=(grid.height, grid.width), transform=grid.transform, fill=0, dtype="int32")
            if objects
            else np.zeros((grid.height, grid.width), np.int32)
        )
    if aoi is not None:
        scored &= aoi.burn(grid) > 0
    few = too_few_scored(int(scored.sum()), grid.width * grid.height)
    if not scored.any() or few:
        raise JobError(
            INVALID_INPUT,
            f"{few or 'No pixel lies in both the prediction and the reference'}.",
            "Check that the reference covers the prediction.",
        )
    ctx.progress(0.7, "scoring", force=True)
    pixels = ConfusionMatrix(2)
    pixels.update(predicted, reference > 0, scored)
    metrics = {k: v for k, v in pixels.metrics().items() if not k.startswith("iou_")}
    metrics |= match(instances(predicted), reference, scored)
    metrics["scored_pixels"] = int(scored.sum())
    return JobResult(metrics=metrics)


SPEC = JobSpec(
    "objects.evaluate",
    "Score an object mask against reference objects (pixel IoU/F1, mIoU/mDice, object precision/recall/F1 at IoU 0.5).",
    PARAMS,
    run,
    title="Evaluate an object mask",
)
