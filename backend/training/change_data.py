"""Training data for change detection: the analyst's labelled area (backend/training/areas.py).

The labelled area (an AOI, or the whole overlap when small) is read once on the before grid: both
dates (the after raster aligned on the fly) and a label raster (0 no change, 1 change, IGNORE where
nothing is known); for semantic change also the date-1 and date-2 classes of the changed pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from backend.io.raster import Grid, RasterSource, is_raster, overlap_grid, require_same_band_count
from backend.io.rasterize import IGNORE, Polygons, rasterize_labels, read_polygons
from backend.protocol import INVALID_INPUT, JobError
from backend.training.areas import TrainingArea, check_size, read_label_rasters


def load_training_area(
    before: str,
    after: str,
    labels: str,
    aoi: str | None = None,
    bands: list[int] | None = None,
    label_field: str | None = None,
    warnings: list[str] | None = None,
    require_change: bool = True,
    semantic: SemanticLabels | None = None,
) -> TrainingArea:
    """Read both dates and the labels over the labelled area (see module docstring).

    `require_change=False` accepts an area without any change (negatives next to other areas). With
    `semantic`, the labels carry from/to classes (polygon fields, or `labels` and `semantic.labels_after` as
    date-1 and date-2 class rasters) and a pixel is changed where either class is set.
    """
    with RasterSource(before, bands, what="before") as b0, RasterSource(after, bands, what="after") as a0:
        require_same_band_count(b0, a0, warnings)
        grid = overlap_grid(b0.native, a0.native, ("before", "after"))
    aoi_polys = read_polygons(aoi, grid.crs, what="area of interest", warnings=warnings) if aoi else None
    classes = None
    if semantic is not None:
        label, classes, sub = _semantic_labels(labels, semantic, grid, aoi_polys, warnings)
    elif is_raster(labels, "label"):
        label, sub = _raster_labels(labels, grid, aoi_polys)
    else:
        polys = read_polygons(labels, grid.crs, class_field=label_field, what="label", warnings=warnings)
        if aoi_polys is None:
            check_size(grid)
        label, sub = rasterize_labels(polys, grid, aoi=aoi_polys)
        label = np.where(label == IGNORE, IGNORE, (label > 0).astype(np.uint8))
    if require_change and not np.any(label == 1):
        raise JobError(
            INVALID_INPUT,
            "The labels mark no change inside the area of interest.",
            "Draw at least one change polygon inside the area (everything else in it counts as unchanged).",
        )
    win = Window(0, 0, sub.width, sub.height)
    with (
        RasterSource(before, bands, grid=sub, what="before") as b,
        RasterSource(after, bands, grid=sub, what="after") as a,
    ):
        xb, vb = b.read(win)
        xa, va = a.read(win)
    label = np.where(vb & va, label, IGNORE).astype(np.uint8)
    if classes is not None:
        classes = np.where(label == 1, classes, 0).astype(np.uint8)
    return TrainingArea((xb, xa), label, sub, classes)


@dataclass(frozen=True)
class SemanticLabels:
    """Where the from/to classes of semantic change labels are: two fields of the label polygons, or a second
    class raster for date 2 (the `labels` raster then holds the date-1 classes; 0 = unchanged)."""

    from_field: str | None = None
    to_field: str | None = None
    labels_after: str | None = None


def _semantic_labels(
    labels: str, semantic: SemanticLabels, grid: Grid, aoi: Polygons | None, warnings: list[str] | None
) -> tuple[np.ndarray, np.ndarray, Grid]:
    """(change label, (2, H, W) from/to classes, grid) from class polygons or two class rasters."""
    if is_raster(labels, "label"):
        if not semantic.labels_after:
            raise JobError(
                INVALID_INPUT,
                "Semantic change from rasters needs two class rasters: the date-1 classes and the date-2 classes.",
                "Give the date-2 class raster as 'labels after', or use polygons with from/to class fields.",
            )
        data, known, sub = read_label_rasters(
            [(labels, "date-1 class"), (semantic.labels_after, "date-2 class")], grid, aoi
        )
        classes = np.clip(data, 0, IGNORE - 1).astype(np.uint8)
        return np.where(known, (classes > 0).any(0), IGNORE).astype(np.uint8), classes, sub
    if not (semantic.from_field and semantic.to_field):
        raise JobError(
            INVALID_INPUT,
            "Semantic change polygons need a 'from class' field and a 'to class' field.",
            "Choose the fields that hold the class numbers before and after the change.",
        )
    if aoi is None:
        check_size(grid)
    burnt = []
    for field in (semantic.from_field, semantic.to_field):
        polys = read_polygons(labels, grid.crs, class_field=field, what="label", warnings=warnings)
        burnt.append(rasterize_labels(polys, grid, aoi=aoi))
    (c1, sub), (c2, _) = burnt
    outside = c1 == IGNORE
    classes = np.where(outside, 0, np.stack([c1, c2])).astype(np.uint8)
    label = np.where(outside, IGNORE, (classes > 0).any(0)).astype(np.uint8)
    return label, classes, sub


def _raster_labels(labels: str, grid: Grid, aoi: Polygons | None) -> tuple[np.ndarray, Grid]:
    """A change-mask raster (non-zero = change, nodata = unknown) on the grid, inside the AOI."""
    data, known, sub = read_label_rasters([(labels, "label")], grid, aoi)
    return np.where(known, data[0] > 0, IGNORE).astype(np.uint8), sub
