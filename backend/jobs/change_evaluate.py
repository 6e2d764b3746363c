"""change.evaluate: accuracy of a change map against reference changes.

Binary change (mode bcd): the prediction is a change mask as change.cva and change.detect write
it (non-zero = change, 0 = no change, its nodata is not scored). The reference is a raster mask
(non-zero = change) or a polygon layer (every polygon is change; with `reference_field`, polygons
whose field is 0 are no change).

Semantic change (mode scd): prediction and reference rasters have 2 bands, band 1 = class at
date 1 and band 2 = class at date 2, with classes 1..num_classes and 0 where nothing changed. A
polygon reference gives the date-1 class in `from_field` and the date-2 class in `to_field`.

The prediction's grid is the evaluation grid: a raster reference is read onto it (nearest
neighbour, any CRS or resolution) and polygons are burnt onto it, block by block. Pixels that
are nodata in either layer, or outside the optional area of interest, are not scored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import shapely
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend.context import JobContext
from backend.io.raster import Grid, RasterSource, is_raster, overlap_grid
from backend.io.rasterize import PolygonBurner, read_polygons, restrict_to_aoi
from backend.io.tiling import block_windows
from backend.jobs.base import JobSpec
from backend.metrics.change import BinaryConfusion, SemanticChangeConfusion, too_few_scored
from backend.params import Param
from backend.protocol import INVALID_INPUT, JobError, JobResult

BLOCK = 512

PARAMS = (
    Param(
        "prediction",
        str,
        "Change map to score: a change mask (1 change, 0 no change), or for mode scd a 2-band raster of "
        "date-1/date-2 classes (0 = unchanged). Its grid is the evaluation grid.",
        required=True,
        kind="raster",
    ),
    Param(
        "reference",
        str,
        "Reference changes: a raster mask (non-zero = change; 2 class bands for mode scd) or a polygon layer.",
        required=True,
        kind="layer",
    ),
    Param(
        "reference_field",
        str,
        "Field of the reference polygons that holds the change class (0 = no change); "
        "default: every polygon is change.",
        default=None,
        kind="field",
        parent="reference",
    ),
    Param("aoi", str, "Polygon layer of the area of interest: only pixels inside it are scored.", kind="polygons"),
    Param(
        "mode",
        str,
        "bcd: binary change (change / no change); scd: semantic change (from/to classes).",
        default="bcd",
        choices=("bcd", "scd"),
    ),
    Param("num_classes", int, "Mode scd: number of land-cover classes (1..N; 0 = no change).", default=None),
    Param(
        "from_field", str, "Mode scd, polygon reference: field with the date-1 class.", kind="field", parent="reference"
    ),
    Param(
        "to_field", str, "Mode scd, polygon reference: field with the date-2 class.", kind="field", parent="reference"
    ),
)

ReadFn = Callable[[Window], tuple[np.ndarray, np.ndarray]]


def run(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    scd = p["mode"] == "scd"
    _check_params(ctx, p, scd)
    bands = [1, 2] if scd else [1]
    with RasterSource(p["prediction"], what="prediction") as probe:
        _check_band_count(probe, len(bands), "prediction", exact=True)
        grid = probe.native
    predicted_px = grid.width * grid.height
    ref_is_raster = is_raster(p["reference"], "reference")
    if ref_is_raster:
        with RasterSource(p["reference"], what="reference") as probe:
            _check_band_count(probe, len(bands), "reference")
            grid = overlap_grid(grid, probe.native, ("prediction", "reference"))
    elif scd and not (p["from_field"] and p["to_field"]):
        raise JobError(
            INVALID_INPUT,
            "A polygon reference for semantic change needs the fields with the date-1 and date-2 classes.",
            "Set from_field and to_field.",
        )
    if not grid.georeferenced:
        ctx.warn("The prediction is not georeferenced: layers are matched pixel by pixel.")

    aoi = None
    if p["aoi"]:
        grid, aoi = restrict_to_aoi(grid, p["aoi"], ctx.warnings)

    conf: BinaryConfusion | SemanticChangeConfusion = (
        SemanticChangeConfusion(p["num_classes"]) if scd else BinaryConfusion()
    )
    scored = 0
    values: set[float] = set()  # a change mask holds two values; an image given by mistake holds many
    pred = RasterSource(p["prediction"], bands, grid=grid, resampling=Resampling.nearest, what="prediction")
    ref = (
        RasterSource(p["reference"], bands, grid=grid, resampling=Resampling.nearest, what="reference")
        if ref_is_raster
        else None
    )
    try:
        read_ref = ref.read if ref is not None else _vector_reader(ctx, p, grid, scd)
        wins = list(block_windows(grid.width, grid.height, BLOCK))
        for i, win in enumerate(wins):
            pv, valid = pred.read(win)
            rv, rvalid = read_ref(win)
            valid &= rvalid
            if aoi is not None:
                valid &= aoi.burn(grid.window_grid(win)) > 0
            if isinstance(conf, SemanticChangeConfusion):
                try:
                    conf.update(pv[0], pv[1], rv[0], rv[1], valid)
                except ValueError as exc:
                    raise JobError(
                        INVALID_INPUT, str(exc), "Set num_classes to the number of land-cover classes."
                    ) from None
            else:
                if len(values) <= 2:
                    values.update(np.unique(pv[0][valid])[:3].tolist())
                if len(values) > 2:
                    shown = ", ".join(f"{v:g}" for v in sorted(values)[:3])
                    raise JobError(
                        INVALID_INPUT,
                        f"The prediction holds more than two values ({shown} …), so it is not a change mask.",
                        "Choose the change mask a detection wrote (1 = change, 0 = no change), not an image.",
                    )
                conf.update(pv[0] != 0, rv[0] != 0, valid)
            scored += int(np.count_nonzero(valid))
            ctx.progress((i + 1) / len(wins), "scoring", f"block {i + 1}/{len(wins)}")
    finally:
        pred.close()
        if ref is not None:
            ref.close()
    if scored == 0:
        raise JobError(
            INVALID_INPUT,
            "No pixel could be scored: the prediction and the reference hold no data at the same place"
            + (" inside the area of interest." if aoi is not None else "."),
            "Check the nodata values of both layers and that they cover the same area.",
        )
    few = too_few_scored(scored, predicted_px)
    if few:
        raise JobError(INVALID_INPUT, f"{few}.", "Check that the reference covers the prediction.")
    if aoi is None and grid.width * grid.height < predicted_px / 2:
        share = grid.width * grid.height / predicted_px
        ctx.warn(f"The reference covers only {share:.0%} of the prediction: the scores describe that part only.")
    metrics: dict[str, Any] = conf.metrics()
    if isinstance(conf, BinaryConfusion):
        metrics |= {"tp": conf.tp, "fp": conf.fp, "fn": conf.fn, "tn": conf.tn}
    metrics["scored_pixels"] = scored
    return JobResult(metrics=metrics)


def _check_params(ctx: JobContext, p: dict[str, Any], scd: bool) -> None:
    if scd:
        if p["num_classes"] is None or p["num_classes"] < 1:
            raise JobError(
                INVALID_INPUT,
                "Semantic change evaluation needs the number of land-cover classes.",
                "Set num_classes (1 or more).",
            )
        if p["reference_field"]:
            ctx.warn("reference_field is for binary change; mode scd reads from_field and to_field instead.")
    elif p["num_classes"] is not None or p["from_field"] or p["to_field"]:
        ctx.warn("num_classes, from_field and to_field only apply to mode scd; they are ignored.")


def _check_band_count(src: RasterSource, needed: int, what: str, exact: bool = False) -> None:
    if src.count < needed:
        raise JobError(
            INVALID_INPUT,
            f"The {what} raster has {src.count} band(s), but semantic change needs {needed}: "
            "the class at date 1 in band 1 and the class at date 2 in band 2.",
            "Use a 2-band from/to class raster, or mode bcd for a change mask.",
        )
    if exact and src.count > needed:
        kind = "a change mask has one (1 = change, 0 = no change)" if needed == 1 else "a from/to class raster has 2"
        raise JobError(
            INVALID_INPUT,
            f"The {what} raster has {src.count} bands, but {kind}: is it an image rather than a change map?",
            "Choose the change mask (or, for semantic change, the change classes raster) a detection wrote.",
        )


def _vector_reader(ctx: JobContext, p: dict[str, Any], grid: Grid, scd: bool) -> ReadFn:
    """Reads the reference polygons as class bands on any window of `grid` (every pixel valid)."""
    fields = [p["from_field"], p["to_field"]] if scd else [p["reference_field"]]
    burners = [
        PolygonBurner(read_polygons(p["reference"], grid.crs, field, what="reference", warnings=ctx.warnings))
        for field in fields
    ]
    extent = shapely.box(*grid.bounds)
    if not any(b.tree.query(extent, predicate="intersects").size for b in burners):
        ctx.warn("None of the reference polygons lies on the prediction: every scored pixel counts as no change.")

    def read(win: Window) -> tuple[np.ndarray, np.ndarray]:
        g = grid.window_grid(win)
        return np.stack([b.burn(g) for b in burners]), np.ones((g.height, g.width), dtype=bool)

    return read


SPEC = JobSpec(
    "change.evaluate",
    "Score a change map against reference changes (binary: F1, IoU ...; semantic: mIoU, SeK, Fscd).",
    PARAMS,
    run,
    title="Evaluate a change map",
)
