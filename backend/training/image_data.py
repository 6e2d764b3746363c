"""Training data for single-image tasks (object segmentation, land cover): one raster and its class labels.

The labelled area (an AOI, or the whole raster when small) is read once on the raster's grid with a label
raster: 0 = background, 1 … K = classes, IGNORE where nothing is known. Labels are polygons with a class field
(whole numbers, or names such as "tank" that become classes 1 … K in sorted order) or a class raster (one
non-zero value = a binary mask; several = class numbers). Whether unlabelled pixels inside the area are
background (objects: the analyst drew every object there) or unknown (land cover: class 0 is "unlabelled")
is the task's choice.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from rasterio.windows import Window

from backend.io.raster import RasterSource, is_raster
from backend.io.rasterize import IGNORE, rasterize_labels, read_polygons
from backend.protocol import INVALID_INPUT, JobError
from backend.training.areas import TrainingArea, check_size, read_label_rasters

Unlabelled = Literal["background", "ignore"]


def load_labelled_image(
    image: str,
    labels: str,
    aoi: str | None = None,
    bands: list[int] | None = None,
    label_field: str | None = None,
    warnings: list[str] | None = None,
    unlabelled: Unlabelled = "background",
    what: str = "object",
) -> tuple[TrainingArea, list[str]]:
    """The labelled area and the class names (class k is names[k - 1]); `what` names a class in messages."""
    with RasterSource(image, bands, what="image") as src:
        grid = src.native
    aoi_polys = read_polygons(aoi, grid.crs, what="area of interest", warnings=warnings) if aoi else None
    if is_raster(labels, "label"):
        data, known, sub = read_label_rasters([(labels, "label")], grid, aoi_polys)
        values = data[0]
        present = np.unique(values[known & (values > 0)])
        if len(present) == 1:  # a mask (often 0/255): every non-zero pixel is the one class
            label, names = (values > 0).astype(np.uint8), [what]
        else:
            if present.size and (present.max() >= IGNORE or np.any(present != np.round(present))):
                raise JobError(
                    INVALID_INPUT,
                    f"The label raster holds values up to {present.max():g}; class rasters hold whole numbers "
                    f"1 … {IGNORE - 1}.",
                )
            top = int(present.max()) if present.size else 0
            label, names = values.astype(np.uint8), [f"class {k}" for k in range(1, top + 1)]
        label = np.where(known, label, IGNORE).astype(np.uint8)
    else:
        polys = read_polygons(labels, grid.crs, class_field=label_field, what="label", warnings=warnings, names=True)
        if aoi_polys is None:
            check_size(grid)
        label, sub = rasterize_labels(polys, grid, aoi=aoi_polys)
        top = max(polys.values)
        names = polys.names or ([what] if top <= 1 else [f"class {k}" for k in range(1, top + 1)])
    if unlabelled == "ignore":
        label = np.where(label == 0, IGNORE, label).astype(np.uint8)
    if not np.any((label > 0) & (label != IGNORE)):
        raise JobError(
            INVALID_INPUT,
            f"The labels mark no {what} inside the area of interest.",
            f"Draw at least one {what} polygon inside the area.",
        )
    with RasterSource(image, bands, grid=sub, what="image") as src:
        x, valid = src.read(Window(0, 0, sub.width, sub.height))
    label = np.where(valid, label, IGNORE).astype(np.uint8)
    return TrainingArea((x,), label, sub), names
