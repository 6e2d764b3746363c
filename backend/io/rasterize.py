"""Annotation polygons (with a class field) -> label raster on a reference grid, inside an AOI."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fiona
import numpy as np
import shapely
from rasterio.crs import CRS
from rasterio.features import rasterize
from rasterio.warp import transform_geom
from rasterio.windows import Window, from_bounds
from shapely.geometry import shape

from backend.io.raster import Grid
from backend.protocol import INVALID_INPUT, JobError

IGNORE = 255  # label value for pixels outside the AOI: never trained on, never scored
BACKGROUND = "background"  # a class name that marks a polygon as class 0 (e.g. a rejected detection)


@dataclass
class Polygons:
    geoms: list[dict[str, Any]]  # GeoJSON-like, already in the target CRS
    values: list[int]
    names: list[str] | None = None  # class k's name is names[k - 1] when the field held names, not numbers


def read_polygons(
    path: str | Path,
    target_crs: CRS | None,
    class_field: str | None = None,
    layer: str | None = None,
    what: str = "label",
    warnings: list[str] | None = None,
    names: bool = False,
) -> Polygons:
    """Read (multi)polygons and their integer class from any OGR vector file, in target_crs.

    With `names`, a class field holding text ("tank", "ship") is allowed: its distinct values, sorted, become
    classes 1 … K and `Polygons.names`, and "background" is class 0; a field of whole numbers is read as class
    numbers either way."""
    p = Path(path).expanduser()
    if not p.exists():
        raise JobError(
            INVALID_INPUT, f"The {what} file {p} does not exist.", "Check the path, or pick the layer again."
        )
    try:
        src = fiona.open(p, layer=layer)
    except (fiona.errors.DriverError, ValueError) as exc:
        raise JobError(
            INVALID_INPUT, f"The {what} file {p.name} is not a vector layer that can be read ({exc})."
        ) from None
    with src:
        if class_field and class_field not in src.schema["properties"]:
            fields = ", ".join(src.schema["properties"]) or "none"
            raise JobError(
                INVALID_INPUT,
                f"The {what} layer has no field named '{class_field}' (its fields: {fields}).",
                "Pick the field that holds the class numbers.",
            )
        src_crs = CRS.from_wkt(src.crs.to_wkt()) if src.crs and src.crs.to_wkt() else None
        if src_crs is None and target_crs is not None and warnings is not None:
            warnings.append(f"The {what} layer has no CRS; it is assumed to be in the raster's CRS.")
        geoms, raw = [], []
        for feat in src:
            if feat.geometry is None or feat.geometry.type not in ("Polygon", "MultiPolygon"):
                continue
            value = 1 if not class_field else feat.properties[class_field]
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            geom = dict(feat.geometry.__geo_interface__)
            if src_crs is not None and target_crs is not None and src_crs != target_crs:
                try:
                    geom = transform_geom(src_crs, target_crs, geom)
                except Exception as exc:  # GDAL's own error types: e.g. far outside a UTM zone
                    raise JobError(
                        INVALID_INPUT,
                        f"A polygon of the {what} file {p.name} (feature {feat.id}) cannot be placed in the raster's "
                        f"coordinate system ({str(exc).rstrip('.')}).",
                        "It lies far from the raster, or the layer's CRS is wrong: check both on the map.",
                    ) from None
            try:  # a polygon with too few vertices (hand-edited, or a broken export) cannot be used
                shape(geom)
            except (ValueError, TypeError, shapely.errors.GEOSException) as exc:
                raise JobError(
                    INVALID_INPUT,
                    f"The {what} file {p.name} holds a damaged polygon (feature {feat.id}): {str(exc).rstrip('.')}.",
                    "Fix or delete that feature (Vector > Geometry Tools > Check Validity helps).",
                ) from None
            geoms.append(geom)
            raw.append(value)
    if not geoms:
        raise JobError(
            INVALID_INPUT,
            f"The {what} layer contains no polygons.",
            "Draw at least one polygon (or check that the layer is a polygon layer).",
        )
    if names and not all(_whole(v) for v in raw):
        text = [str(v).strip() for v in raw]
        classes = sorted({t for t in text if t.lower() != BACKGROUND})
        if len(classes) >= IGNORE:
            raise JobError(INVALID_INPUT, f"The class field '{class_field}' holds {len(classes)} different names.")
        values = [0 if t.lower() == BACKGROUND else classes.index(t) + 1 for t in text]
        return Polygons(geoms, values, classes)
    values = []
    for value in raw:
        if not _whole(value):
            raise JobError(INVALID_INPUT, f"The class field '{class_field}' holds {value!r}, not a class number.")
        if not 0 <= int(value) < IGNORE:
            raise JobError(INVALID_INPUT, f"Class numbers must be between 0 and {IGNORE - 1}; found {int(value)}.")
        values.append(int(value))
    return Polygons(geoms, values)


def _whole(value: Any) -> bool:
    """A class number: a whole number, or text that reads as one ("3")."""
    if isinstance(value, bool):
        return False
    try:
        return float(value) == int(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def rasterize_labels(
    labels: Polygons,
    grid: Grid,
    aoi: Polygons | None = None,
    all_touched: bool = False,
) -> tuple[np.ndarray, Grid]:
    """Burn labels onto the part of `grid` covered by the AOI (the whole grid without one).

    Returns a uint8 raster (0 = background, class values, IGNORE outside the AOI) and its grid.
    Later polygons win where polygons overlap.
    """
    sub = grid
    if aoi is not None:
        aoi_union = shapely.union_all([shape(g) for g in aoi.geoms])
        if not any(shape(g).intersects(aoi_union) for g in labels.geoms):
            raise JobError(
                INVALID_INPUT,
                "None of the label polygons lies inside the area of interest.",
                "Draw labels inside the area of interest, or choose a larger area.",
            )
        sub = aoi_grid(grid, aoi)
    size = (sub.height, sub.width)
    out = rasterize(
        zip(labels.geoms, labels.values, strict=True),
        out_shape=size,
        transform=sub.transform,
        fill=0,
        dtype="uint8",
        all_touched=all_touched,
    )
    if aoi is not None:
        inside = rasterize(((g, 1) for g in aoi.geoms), out_shape=size, transform=sub.transform, fill=0, dtype="uint8")
        out[inside == 0] = IGNORE
    return out, sub


def aoi_grid(grid: Grid, aoi: Polygons) -> Grid:
    """The smallest whole-pixel part of `grid` containing the area of interest (clear error if none)."""
    left, bottom, right, top = shapely.total_bounds([shape(g) for g in aoi.geoms]).tolist()
    win = from_bounds(left, bottom, right, top, grid.transform)
    # Whole pixels, tolerant of float noise at pixel edges, clipped to the grid.
    c0 = max(math.floor(round(win.col_off, 6)), 0)
    r0 = max(math.floor(round(win.row_off, 6)), 0)
    c1 = min(math.ceil(round(win.col_off + win.width, 6)), grid.width)
    r1 = min(math.ceil(round(win.row_off + win.height, 6)), grid.height)
    if c1 <= c0 or r1 <= r0:
        raise JobError(
            INVALID_INPUT,
            "The area of interest does not overlap the raster.",
            "Check that the area of interest lies on the raster (and that its CRS is right).",
        )
    return grid.window_grid(Window(c0, r0, c1 - c0, r1 - r0))


class PolygonBurner:
    """Burns polygons onto any window of a grid, using only those whose bounding box reaches it."""

    def __init__(self, polygons: Polygons) -> None:
        self.geoms = [shape(g) for g in polygons.geoms]
        self.values = polygons.values
        self.tree = shapely.STRtree(self.geoms)

    def burn(self, grid: Grid) -> np.ndarray:
        """uint8 raster of the polygon values on `grid` (0 outside every polygon; later polygons win)."""
        hits = sorted(self.tree.query(shapely.box(*grid.bounds)).tolist())
        if not hits:
            return np.zeros((grid.height, grid.width), dtype=np.uint8)
        return rasterize(
            ((self.geoms[i], self.values[i]) for i in hits),
            out_shape=(grid.height, grid.width),
            transform=grid.transform,
            fill=0,
            dtype="uint8",
        )


def restrict_to_aoi(grid: Grid, aoi: str, warnings: list[str] | None = None) -> tuple[Grid, PolygonBurner]:
    """The part of `grid` covering the AOI polygons, and a burner that masks pixels outside them."""
    polygons = read_polygons(aoi, grid.crs, what="area of interest", warnings=warnings)
    return aoi_grid(grid, polygons), PolygonBurner(polygons)
