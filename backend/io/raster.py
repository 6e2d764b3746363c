"""Windowed raster reading on a target grid: band selection, nodata masks, dtype scaling, alignment.

A second raster on another CRS, resolution or extent is read through a warped VRT onto the
reference grid, so users never resample by hand and nothing is loaded whole.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from backend.protocol import INVALID_INPUT, JobError

PIXEL_CRS = CRS.from_epsg(3857)  # stand-in CRS for warping rasters that have none


@dataclass(frozen=True)
class Grid:
    """A pixel grid: CRS (None in pixel space), affine transform and size."""

    crs: CRS | None
    transform: Affine
    width: int
    height: int

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return rasterio.transform.array_bounds(self.height, self.width, self.transform)[:4]

    @property
    def res(self) -> tuple[float, float]:
        return (math.hypot(self.transform.a, self.transform.d), math.hypot(self.transform.b, self.transform.e))

    def window_grid(self, window: Window) -> Grid:
        return Grid(self.crs, rasterio.windows.transform(window, self.transform), int(window.width), int(window.height))

    @classmethod
    def of(cls, ds: rasterio.io.DatasetReaderBase) -> Grid:
        crs = ds.crs if ds.crs else None
        return cls(crs, ds.transform, ds.width, ds.height)


def open_dataset(path: str | Path, what: str = "raster") -> rasterio.io.DatasetReader:
    """Open a raster with a plain-language error for the usual mistakes."""
    p = Path(path).expanduser()
    if not p.exists():
        raise JobError(
            INVALID_INPUT, f"The {what} file {p} does not exist.", "Check the path, or pick the layer again."
        )
    if p.is_dir():
        raise JobError(INVALID_INPUT, f"The {what} path {p} is a folder, not a raster file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(p)
    except RasterioIOError:
        raise JobError(
            INVALID_INPUT,
            f"The {what} file {p.name} is not a raster that can be read.",
            "Use a GeoTIFF or another raster format GDAL reads.",
        ) from None
    if ds.count < 1 or ds.width < 1 or ds.height < 1:
        ds.close()
        raise JobError(INVALID_INPUT, f"The {what} file {p.name} has no pixels or no bands.")
    return ds


def is_raster(path: str | Path, what: str = "reference") -> bool:
    """True for a raster, False for a vector layer; a clear error for a missing or unreadable file."""
    import fiona

    p = Path(path).expanduser()
    if not p.exists():
        raise JobError(
            INVALID_INPUT, f"The {what} file {p} does not exist.", "Check the path, or pick the layer again."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            rasterio.open(p).close()
        return True
    except RasterioIOError:
        pass
    try:
        fiona.open(p).close()
    except (fiona.errors.FionaError, ValueError):
        raise JobError(
            INVALID_INPUT,
            f"The {what} file {p.name} is neither a raster nor a vector layer that can be read.",
            "Use a raster (e.g. GeoTIFF) or a polygon layer (e.g. GeoPackage, shapefile).",
        ) from None
    return False


def check_bands(ds: rasterio.io.DatasetReaderBase, bands: list[int] | None, what: str) -> list[int]:
    """1-based band indexes to read; when none are chosen, every band but alpha (its mask marks nodata)."""
    if not bands:
        data = [i for i, ci in enumerate(ds.colorinterp, 1) if ci != ColorInterp.alpha]
        return data or list(range(1, ds.count + 1))
    bad = [b for b in bands if b < 1 or b > ds.count]
    if bad:
        raise JobError(
            INVALID_INPUT,
            f"The {what} raster has {ds.count} band(s); band(s) {', '.join(map(str, bad))} do not exist.",
            "Band numbers start at 1.",
        )
    return list(bands)


def _aligned(src: Grid, dst: Grid) -> tuple[int, int] | None:
    """Integer pixel offset of dst inside src when both share CRS and pixel size (no resampling needed)."""
    if src.crs != dst.crs:
        return None
    a, b = src.transform, dst.transform
    if not all(
        math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a[:2] + a[3:5], b[:2] + b[3:5], strict=True)
    ):
        return None
    col, row = ~a @ (b.c, b.f)
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return round(col), round(row)


class RasterSource:
    """Reads chosen bands of one raster, window by window, on a target grid.

    `read(window)` returns float32 data (bands, h, w) and a boolean valid mask (h, w): a pixel is
    valid when every chosen band is valid (not nodata, not NaN, inside the source footprint).
    """

    def __init__(
        self,
        path: str | Path,
        bands: list[int] | None = None,
        grid: Grid | None = None,
        resampling: Resampling = Resampling.bilinear,
        scale: str = "none",
        what: str = "raster",
        pixel_scale: int | None = None,
    ) -> None:
        """`pixel_scale`: the raster has no georeferencing and its pixel i covers `grid` pixels
        pixel_scale*i … pixel_scale*(i+1) (an MS under a PAN of the same scene), so it is warped in pixel space."""
        self.path, self.what = Path(path), what
        self.ds = open_dataset(path, what)
        self.bands = check_bands(self.ds, bands, what)
        self.native = Grid.of(self.ds)
        self.grid = grid or self.native
        self.scale = scale
        self.dtype = np.dtype(self.ds.dtypes[self.bands[0] - 1])
        self.nodata = self.ds.nodata
        self._vrt: WarpedVRT | None = None
        self._offset = _aligned(self.native, self.grid) if grid is not None and pixel_scale is None else (0, 0)
        # Without a nodata value the warper would mark pixels outside the footprint valid; an alpha band keeps
        # that information (a raster's own alpha band, e.g. a 4-band 8-bit GeoTIFF tagged RGBA, already does).
        add_alpha = self.ds.nodata is None and ColorInterp.alpha not in self.ds.colorinterp
        if pixel_scale is not None:
            # One made-up CRS on both sides lets GDAL's warper resample by the pixel scale alone.
            self._vrt = WarpedVRT(
                self.ds,
                src_crs=PIXEL_CRS,
                src_transform=Affine.scale(pixel_scale),
                crs=PIXEL_CRS,
                transform=self.grid.transform,
                width=self.grid.width,
                height=self.grid.height,
                resampling=resampling,
                add_alpha=add_alpha,
            )
        elif self._offset is None:
            self._vrt = WarpedVRT(
                self.ds,
                crs=self.grid.crs,
                transform=self.grid.transform,
                width=self.grid.width,
                height=self.grid.height,
                resampling=resampling,
                add_alpha=add_alpha,
            )

    @property
    def count(self) -> int:
        return len(self.bands)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        try:
            data, masks = self._read(window)
        except RasterioIOError as exc:  # a truncated or damaged file opens fine and fails here
            raise JobError(
                INVALID_INPUT,
                f"The {self.what} file {self.path.name} could not be read near row {int(window.row_off)}: it is "
                f"damaged or incomplete ({str(exc)[:120]}).",
                "Copy or export the raster again.",
            ) from None
        valid = np.all(masks > 0, axis=0)
        out = data.astype(np.float32, copy=False)
        if np.issubdtype(self.dtype, np.floating):
            valid &= np.all(np.isfinite(out), axis=0)
        if self.scale == "dtype" and np.issubdtype(self.dtype, np.integer):
            out = out / np.float32(np.iinfo(self.dtype).max)
        return out, valid

    def _read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        if self._vrt is not None:
            data = self._vrt.read(self.bands, window=window)
            masks = self._vrt.read_masks(self.bands, window=window)
        else:
            col, row = self._offset  # type: ignore[misc]
            w = Window(window.col_off + col, window.row_off + row, window.width, window.height)
            inside = (
                w.col_off >= 0
                and w.row_off >= 0
                and w.col_off + w.width <= self.native.width
                and w.row_off + w.height <= self.native.height
            )
            data = self.ds.read(self.bands, window=w, boundless=not inside)
            masks = self.ds.read_masks(self.bands, window=w, boundless=not inside)
        return data, masks

    def close(self) -> None:
        if self._vrt is not None:
            self._vrt.close()
        self.ds.close()

    def __enter__(self) -> RasterSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def require_same_band_count(before: RasterSource, after: RasterSource, warnings: list[str] | None = None) -> None:
    """Both dates compare the same number of bands; a band one of them leaves out (its alpha band) is said."""
    if before.count != after.count:
        raise JobError(
            INVALID_INPUT,
            f"The before raster has {before.count} band(s) to compare but the after raster has {after.count}.",
            "Choose the same bands of both rasters (bands parameter).",
        )
    if warnings is None or before.ds.count == after.ds.count:
        return
    for name, src in (("before", before), ("after", after)):
        left_out = [b for b in range(1, src.ds.count + 1) if b not in src.bands]
        if left_out:
            alpha = all(src.ds.colorinterp[b - 1] == ColorInterp.alpha for b in left_out)
            why = (
                "is marked as alpha (transparency), so it only masks nodata" if alpha else "is not among the bands used"
            )
            other = after if src is before else before
            warnings.append(
                f"The {name} raster has {src.ds.count} bands and the other {other.ds.count}: "
                f"band {', '.join(map(str, left_out))} {why} and is not compared."
            )


def overlap_grid(ref: Grid, other: Grid, names: tuple[str, str] = ("first", "second")) -> Grid:
    """The part of the reference grid that the other raster also covers.

    Both georeferenced: the footprint of `other` is transformed into the reference CRS and
    intersected with the reference extent. Both in pixel space: they must have the same size.
    """
    if ref.georeferenced != other.georeferenced:
        missing = names[0] if not ref.georeferenced else names[1]
        raise JobError(
            INVALID_INPUT,
            f"The {missing} raster has no coordinate reference system but the other one has.",
            "Assign a CRS to it (Raster > Projections > Assign Projection) or use two rasters without one.",
        )
    if not ref.georeferenced:
        if (ref.width, ref.height) != (other.width, other.height):
            raise JobError(
                INVALID_INPUT,
                f"Neither raster is georeferenced and their sizes differ ({ref.width}x{ref.height} vs "
                f"{other.width}x{other.height}), so they cannot be matched pixel by pixel.",
                "Georeference both rasters, or use two rasters of the same size.",
            )
        return ref
    left, bottom, right, top = transform_bounds(other.crs, ref.crs, *other.bounds, densify_pts=21)
    rl, rb, rr, rt = ref.bounds
    il, ib, ir, it = max(left, rl), max(bottom, rb), min(right, rr), min(top, rt)
    if il >= ir or ib >= it:
        raise JobError(
            INVALID_INPUT,
            f"The {names[0]} and {names[1]} rasters do not overlap.",
            "Check that both layers show the same place on the map (and that their CRSs are right).",
        )
    win = from_bounds(il, ib, ir, it, ref.transform).round_offsets().round_lengths()
    win = win.intersection(Window(0, 0, ref.width, ref.height))
    if win.width < 1 or win.height < 1:
        raise JobError(INVALID_INPUT, f"The {names[0]} and {names[1]} rasters overlap by less than one pixel.")
    return ref.window_grid(win)
