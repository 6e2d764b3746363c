"""Labelled training areas, for every task: read once on a grid, split by area, cut into validation patches.

An area holds its images (one per date: `before`/`after` for change, one image for objects or land cover),
a label raster (0 = background / unchanged, 1.. = classes, IGNORE where nothing is known) and optional extra
targets. The area is split along its longer side into a training and a validation part, so validation pixels
never appear in a training patch; several areas are held out whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend.io.raster import Grid, RasterSource
from backend.io.rasterize import IGNORE, Polygons, aoi_grid, rasterize_labels
from backend.protocol import INVALID_INPUT, JobError

# Without an AOI the whole raster (or the dates' overlap) is the training area; beyond this many pixels, ask for an AOI.
MAX_AREA_PX = 4096 * 4096


@dataclass
class TrainingArea:
    images: tuple[np.ndarray, ...]  # (C, H, W) float32 raw values, one per date, all on `grid`
    label: np.ndarray  # (H, W) uint8: 0, 1 … (classes), IGNORE
    grid: Grid
    # Semantic change: (2, H, W) uint8, the from/to classes (1..K) of changed pixels; 0 = unchanged or unknown.
    classes: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.label.shape

    @property
    def targets(self) -> tuple[np.ndarray, ...]:
        """What a patch is scored against: the change label, and the from/to classes when known."""
        return (self.label,) if self.classes is None else (self.label, self.classes)


def check_size(grid: Grid) -> None:
    if grid.width * grid.height > MAX_AREA_PX:
        raise JobError(
            INVALID_INPUT,
            f"The labelled area is {grid.width}x{grid.height} pixels, too large to use whole as a training area.",
            "Choose an area of interest around your labels.",
        )


def read_label_rasters(
    rasters: list[tuple[str, str]], grid: Grid, aoi: Polygons | None
) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Band 1 of each (path, what) on the grid, inside the AOI (nearest neighbour): (n, H, W) values, where all
    are known (valid in every raster and inside the AOI), and the grid they were read on."""
    sub, known = grid, None
    if aoi is not None:
        sub = aoi_grid(grid, aoi)  # only the AOI's part of the grid is read
        inside, _ = rasterize_labels(aoi, sub)  # the AOI burned as 1 on it
        known = inside > 0
    else:
        check_size(grid)
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


def can_split_by_area(shape: tuple[int, int], patch: int, val_fraction: float) -> bool:
    """Whether the area holds a training and a validation part of at least one patch each."""
    h, w = shape
    axis_len = max(h, w)
    return axis_len - max(round(axis_len * val_fraction), patch) >= patch and min(h, w) >= patch


def split_by_area(shape: tuple[int, int], patch: int, val_fraction: float, known: np.ndarray | None = None) -> Split:
    """Cut the area along its longer side: the last `val_fraction` (at least one patch) validates.

    With `known` (H, W), where labels are known, the cut holds back the last `val_fraction` of the labelled
    pixels rather than of the extent, so that sparse labels (a few polygons in a large area) leave labels on both
    sides; for labels that fill the area the two agree."""
    h, w = shape
    axis_len = max(h, w)
    n_val = max(round(axis_len * val_fraction), patch)
    if not can_split_by_area(shape, patch, val_fraction):
        raise JobError(
            INVALID_INPUT,
            f"The labelled area ({w}x{h} pixels) is too small to train and validate on patches of {patch} pixels.",
            "Choose a larger area of interest or a smaller patch size.",
        )
    cut = axis_len - n_val
    if known is not None and known.any():
        along = np.flatnonzero(known.any(axis=1 if h >= w else 0))  # rows (or columns) that hold labels
        counts = known.sum(axis=1 if h >= w else 0)[along]
        index = np.searchsorted(np.cumsum(counts), (1 - val_fraction) * counts.sum())
        at = along[min(int(index), len(along) - 1)]
        cut = int(min(max(at + 1, patch), axis_len - patch))  # the train part ends after that row
    if h >= w:
        return Split((slice(0, cut), slice(0, w)), (slice(cut, h), slice(0, w)))
    return Split((slice(0, h), slice(0, cut)), (slice(0, h), slice(cut, w)))


Part = tuple[TrainingArea, tuple[slice, slice]]


def train_val_parts(
    areas: list[TrainingArea], patch: int, val_fraction: float, small: Literal["refuse", "pixels"] = "refuse"
) -> tuple[list[Part], list[Part]]:
    """One area: split by area, or, with small="pixels", by labelled pixels when it is too small for that
    (see split_by_pixels). Several: whole areas are held out for validation (the last ones)."""
    if len(areas) == 1 and small == "pixels" and not can_split_by_area(areas[0].shape, patch, val_fraction):
        train, val = split_by_pixels(pad_to_patches(areas[0], patch), val_fraction)
        return [whole(train)], [whole(val)]
    if len(areas) == 1:
        split = split_by_area(areas[0].shape, patch, val_fraction, areas[0].label != IGNORE)
        return [(areas[0], split.train)], [(areas[0], split.val)]
    for a in areas:
        if min(a.shape) < patch:
            raise JobError(
                INVALID_INPUT, f"A labelled area of {a.shape[1]}x{a.shape[0]} pixels is smaller than a patch."
            )
    n_val = min(max(round(len(areas) * val_fraction), 1), len(areas) - 1)
    parts = [whole(a) for a in areas]
    return parts[:-n_val], parts[-n_val:]


def whole(area: TrainingArea) -> Part:
    return area, (slice(0, area.shape[0]), slice(0, area.shape[1]))


def grow_to_patches(a: np.ndarray, patch: int, fill: int | None = None) -> np.ndarray:
    """(…, H, W) grown at the bottom and right to whole patches (at least one): mirrored, or `fill`."""
    pads = [(0, 0)] * (a.ndim - 2) + [(0, -a.shape[-2] % patch), (0, -a.shape[-1] % patch)]
    return np.pad(a, pads, mode="symmetric") if fill is None else np.pad(a, pads, constant_values=fill)


def pad_to_patches(area: TrainingArea, patch: int) -> TrainingArea:
    """The area grown to whole patches, images mirrored and the padding unlabelled, so that validation
    patches tile it without overlap (no pixel counted twice)."""
    return TrainingArea(
        tuple(grow_to_patches(x, patch) for x in area.images),
        grow_to_patches(area.label, patch, IGNORE),
        area.grid,  # the area's own; the padding exists only in training
        None if area.classes is None else grow_to_patches(area.classes, patch, 0),
    )


def split_by_pixels(area: TrainingArea, val_fraction: float, seed: int = 0) -> tuple[TrainingArea, TrainingArea]:
    """For an area too small to cut in two (a hyperspectral chip with a few labelled pixels): the same area
    twice, each class's labelled pixels dealt at random between them (`val_fraction` of them, at least one and
    leaving one, to validation where a class has two or more), the other copy's pixels unlabelled. Validation
    pixels are then seen as unlabelled context in training patches, as in the hyperspectral literature's pixel
    splits."""
    rng = np.random.default_rng(seed)
    train, val = area.label.copy(), np.full_like(area.label, IGNORE)
    for k in np.unique(area.label[area.label != IGNORE]):
        at = np.flatnonzero(area.label == k)
        if len(at) < 2:
            continue
        held = rng.permutation(at)[: min(max(round(len(at) * val_fraction), 1), len(at) - 1)]
        train.flat[held], val.flat[held] = IGNORE, k
    return (
        TrainingArea(area.images, train, area.grid, area.classes),
        TrainingArea(area.images, val, area.grid, area.classes),
    )


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
