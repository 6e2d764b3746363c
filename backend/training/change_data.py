"""Training data for change detection: the analyst's labelled area, split by area, sampled as patches.

The labelled area (an AOI, or the whole overlap when small) is read once on the before grid: both
dates (the after raster aligned on the fly) and a label raster (0 no change, 1 change, IGNORE where
nothing is known); for semantic change also the date-1 and date-2 classes of the changed pixels. The area
is split into a training and a validation part along its longer side,
so validation pixels never appear in a training patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend.io.raster import Grid, RasterSource, is_raster, overlap_grid, require_same_band_count
from backend.io.rasterize import IGNORE, Polygons, rasterize_labels, read_polygons
from backend.protocol import INVALID_INPUT, JobError

# Without an AOI the whole overlap is the training area; beyond this many pixels, ask for an AOI.
MAX_AREA_PX = 4096 * 4096


@dataclass
class TrainingArea:
    before: np.ndarray  # (C, H, W) float32, raw values
    after: np.ndarray  # (C, H, W) float32, aligned onto the before grid
    label: np.ndarray  # (H, W) uint8: 0, 1, IGNORE
    grid: Grid
    # Semantic change: (2, H, W) uint8, the from/to classes (1..K) of changed pixels; 0 = unchanged or unknown.
    classes: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.label.shape

    @property
    def images(self) -> tuple[np.ndarray, ...]:
        return self.before, self.after

    @property
    def targets(self) -> tuple[np.ndarray, ...]:
        """What a patch is scored against: the change label, and the from/to classes when known."""
        return (self.label,) if self.classes is None else (self.label, self.classes)


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
            _check_size(grid)
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
    return TrainingArea(xb, xa, label, sub, classes)


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
        data, known, sub = _read_label_rasters(
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
        _check_size(grid)
    burnt = []
    for field in (semantic.from_field, semantic.to_field):
        polys = read_polygons(labels, grid.crs, class_field=field, what="label", warnings=warnings)
        burnt.append(rasterize_labels(polys, grid, aoi=aoi))
    (c1, sub), (c2, _) = burnt
    outside = c1 == IGNORE
    classes = np.where(outside, 0, np.stack([c1, c2])).astype(np.uint8)
    label = np.where(outside, IGNORE, (classes > 0).any(0)).astype(np.uint8)
    return label, classes, sub


def _check_size(grid: Grid) -> None:
    if grid.width * grid.height > MAX_AREA_PX:
        raise JobError(
            INVALID_INPUT,
            f"The rasters overlap over {grid.width}x{grid.height} pixels, too large to use whole as a training area.",
            "Choose an area of interest around your labels.",
        )


def _raster_labels(labels: str, grid: Grid, aoi: Polygons | None) -> tuple[np.ndarray, Grid]:
    """A change-mask raster (non-zero = change, nodata = unknown) on the grid, inside the AOI."""
    data, known, sub = _read_label_rasters([(labels, "label")], grid, aoi)
    return np.where(known, data[0] > 0, IGNORE).astype(np.uint8), sub


def _read_label_rasters(
    rasters: list[tuple[str, str]], grid: Grid, aoi: Polygons | None
) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Band 1 of each (path, what) on the grid, inside the AOI (nearest neighbour): (n, H, W) values, where all
    are known (valid in every raster and inside the AOI), and the grid they were read on."""
    sub, known = grid, None
    if aoi is not None:
        inside, sub = rasterize_labels(aoi, grid)  # the AOI burned as 1 on its own sub-grid
        known = inside > 0
    else:
        _check_size(grid)
    stack = []
    for path, what in rasters:
        with RasterSource(path, [1], grid=sub, resampling=Resampling.nearest, what=what) as src:
            data, valid = src.read(Window(0, 0, sub.width, sub.height))
        stack.append(data[0])
        known = valid if known is None else known & valid
    return np.stack(stack), known, sub


@dataclass
class Split:
    """Row/column ranges of the training and validation parts of an area."""

    train: tuple[slice, slice]
    val: tuple[slice, slice]


def split_by_area(shape: tuple[int, int], patch: int, val_fraction: float) -> Split:
    """Cut the area along its longer side: the last `val_fraction` (at least one patch) validates."""
    h, w = shape
    axis_len = max(h, w)
    n_val = max(round(axis_len * val_fraction), patch)
    if axis_len - n_val < patch or min(h, w) < patch:
        raise JobError(
            INVALID_INPUT,
            f"The labelled area ({w}x{h} pixels) is too small to train and validate on patches of {patch} pixels.",
            "Choose a larger area of interest or a smaller patch size.",
        )
    cut = axis_len - n_val
    if h >= w:
        return Split((slice(0, cut), slice(0, w)), (slice(cut, h), slice(0, w)))
    return Split((slice(0, h), slice(0, cut)), (slice(0, h), slice(cut, w)))


Part = tuple[TrainingArea, tuple[slice, slice]]


def train_val_parts(areas: list[TrainingArea], patch: int, val_fraction: float) -> tuple[list[Part], list[Part]]:
    """One area: split by area. Several: whole areas are held out for validation (the last ones)."""
    if len(areas) == 1:
        split = split_by_area(areas[0].shape, patch, val_fraction)
        return [(areas[0], split.train)], [(areas[0], split.val)]
    for a in areas:
        if min(a.shape) < patch:
            raise JobError(
                INVALID_INPUT, f"A labelled area of {a.shape[1]}x{a.shape[0]} pixels is smaller than a patch."
            )
    n_val = min(max(round(len(areas) * val_fraction), 1), len(areas) - 1)
    whole = [(a, (slice(0, a.shape[0]), slice(0, a.shape[1]))) for a in areas]
    return whole[:-n_val], whole[-n_val:]


def val_patches(part: Part, patch: int) -> list[tuple[np.ndarray, ...]]:
    """A validation part cut into patches (the last row/column shifted back to stay inside): the images of
    both dates, then the targets (see TrainingArea.targets)."""
    area, (rows, cols) = part
    out = []
    for r in _starts(rows.start, rows.stop, patch):
        for c in _starts(cols.start, cols.stop, patch):
            if np.any(area.label[r : r + patch, c : c + patch] != IGNORE):
                out.append(tuple(a[..., r : r + patch, c : c + patch] for a in (*area.images, *area.targets)))
    return out


def _starts(lo: int, hi: int, patch: int) -> list[int]:
    starts = list(range(lo, hi - patch + 1, patch))
    if not starts or starts[-1] + patch < hi:
        starts.append(max(hi - patch, lo))
    return starts
