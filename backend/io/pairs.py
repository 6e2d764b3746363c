"""A PAN + MS pair as the pansharpening jobs read it: checks, the scale ratio, windows on either grid, and the
MS's dtype and nodata for the output."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import transform as transform_points
from rasterio.windows import Window
from scipy import ndimage

from backend.context import JobContext
from backend.io.raster import Grid, RasterSource, overlap_grid
from backend.io.writer import GeoTiffWriter
from backend.protocol import INVALID_INPUT, JobError, JobResult, Output

RATIO_TOLERANCE = 0.02  # relative: a detected ratio must be this close to a whole number
MIN_MS_PIXELS = 8  # per side of the twice-degraded MS (window / ratio^2): less leaves nothing to interpolate
MAX_INVALID = 0.5  # above this fraction of nodata in a window read whole, scores would mean little


@dataclass
class Pair:
    """A checked PAN + MS pair: native grids, the scale ratio and what the output inherits from the MS."""

    pan: str
    ms: str
    ms_bands: list[int]
    pan_native: Grid
    ms_native: Grid
    ratio: int
    ratio_note: str  # how the ratio was found, for the log
    ms_dtype: np.dtype
    ms_nodata: float | None
    descriptions: tuple[str, ...] | None
    georeferenced: bool

    @property
    def bands(self) -> int:
        return len(self.ms_bands)

    def ms_reader(self, grid: Grid, resampling: Resampling = Resampling.cubic) -> Any:
        """Reads the MS bands on `grid` (a PAN-pixel grid, or an MS-scale grid in the same units)."""
        if self.georeferenced:
            return RasterSource(self.ms, self.ms_bands, grid=grid, resampling=resampling, what="MS")
        return RasterSource(self.ms, self.ms_bands, grid=grid, resampling=resampling, what="MS", pixel_scale=self.ratio)

    def overlap(self) -> Grid:
        """The part of the PAN grid the MS also covers."""
        if self.georeferenced:
            return overlap_grid(self.pan_native, self.ms_native, ("PAN", "MS"))
        # Pixel space: both images start at the top-left corner, the MS covering `ratio` PAN pixels per pixel.
        w = min(self.pan_native.width, self.ms_native.width * self.ratio)
        h = min(self.pan_native.height, self.ms_native.height * self.ratio)
        return self.pan_native.window_grid(Window(0, 0, w, h))

    def ms_origin_phase(self, grid: Grid) -> tuple[int, int]:
        """(row, col) of an MS pixel corner on `grid`, modulo the ratio: where MS pixels start on the PAN grid.

        Decimations in the filters sample MS pixel centres this way; unknown (different CRSs): (0, 0).
        """
        ms_t = self.ms_native.transform if self.georeferenced else Affine.scale(self.ratio)
        if self.georeferenced and self.ms_native.crs != self.pan_native.crs:
            return 0, 0
        col, row = ~grid.transform * (ms_t.c, ms_t.f)
        return round(row) % self.ratio, round(col) % self.ratio


def open_pair(
    pan: str, ms: str, ms_bands: list[int] | None, ratio: int | None, warn: Callable[[str], None] | None = None
) -> Pair:
    """Check a PAN + MS pair and find the scale ratio; plain-language errors for the usual mistakes."""
    with RasterSource(pan, what="PAN") as p, RasterSource(ms, ms_bands, what="MS") as m:
        if p.count != 1:
            raise JobError(
                INVALID_INPUT,
                f"The PAN raster has {p.count} bands; pansharpening needs a single-band panchromatic image.",
                "Choose the panchromatic raster as PAN (or extract its one band first).",
            )
        if p.native.georeferenced != m.native.georeferenced:
            missing = "PAN" if not p.native.georeferenced else "MS"
            raise JobError(
                INVALID_INPUT,
                f"The {missing} raster has no coordinate reference system but the other one has.",
                "Assign a CRS to it (Raster > Projections > Assign Projection) or use two rasters without one.",
            )
        georef = p.native.georeferenced
        if georef:  # rasters far apart would otherwise be refused for a ratio measured at two places
            overlap_grid(p.native, m.native, ("PAN", "MS"))
        found, note, warning = _ratio(p.native, m.native, ratio, georef)
        if warning and warn is not None:
            warn(warning)
        descriptions = tuple(m.ds.descriptions[b - 1] or "" for b in m.bands)
        return Pair(
            pan,
            ms,
            list(m.bands),
            p.native,
            m.native,
            found,
            note,
            m.dtype,
            m.nodata,
            descriptions if any(descriptions) else None,
            georef,
        )


def _pixel_area(grid: Grid, crs: CRS | None) -> float:
    """Area of the grid's centre pixel in the units of `crs` (the grid's own CRS when equal or None)."""
    t = grid.transform
    if crs is None or grid.crs == crs:
        return abs(t.a * t.e - t.b * t.d)
    c, r = grid.width / 2, grid.height / 2
    xs, ys = zip(*(t * (c + dc, r + dr) for dc, dr in ((0, 0), (1, 0), (0, 1))), strict=True)
    tx, ty = transform_points(grid.crs, crs, list(xs), list(ys))
    return abs((tx[1] - tx[0]) * (ty[2] - ty[0]) - (ty[1] - ty[0]) * (tx[2] - tx[0]))


def _ratio(pan: Grid, ms: Grid, given: int | None, georef: bool) -> tuple[int, str, str]:
    """The MS/PAN scale ratio (the user's, or detected from the pixel sizes), how it was found, a warning."""
    if georef:
        estimate = math.sqrt(_pixel_area(ms, pan.crs) / _pixel_area(pan, None))
    else:
        # Pixel space: both images are taken to cover the same area.
        estimate = math.sqrt(pan.width * pan.height / (ms.width * ms.height))
    nearest = round(estimate)
    whole = nearest >= 1 and abs(estimate - nearest) <= RATIO_TOLERANCE * estimate
    if given is not None:
        if given < 2:
            raise JobError(
                INVALID_INPUT,
                f"The ratio must be a whole number of 2 or more (MS pixel size / PAN pixel size), got {given}.",
            )
        if whole and nearest in (given, 1):
            return given, "as set", ""  # agrees with the grids, or the MS was already resampled to the PAN grid
        return (
            given,
            "as set",
            f"The pixel sizes suggest a ratio of {estimate:.2f}; the ratio you set ({given}) is used.",
        )
    if estimate < 1 / (1 + RATIO_TOLERANCE):
        raise JobError(
            INVALID_INPUT,
            f"The MS pixels are {1 / estimate:.2g} times smaller than the PAN pixels; pansharpening needs an MS "
            "that is coarser than the PAN.",
            "Check that the PAN and MS inputs are not swapped.",
        )
    if not whole:
        raise JobError(
            INVALID_INPUT,
            f"The MS pixel is {estimate:.1f} times the PAN pixel; pansharpening needs an integer ratio (2, 4 …).",
            "Use the original PAN and MS products, or set the ratio yourself if the MS was resampled.",
        )
    if nearest == 1:
        raise JobError(
            INVALID_INPUT,
            "The MS has the same pixel size as the PAN, so the scale ratio cannot be detected.",
            "If the MS was already resampled to the PAN grid, set the ratio to the original one (e.g. 4).",
        )
    return nearest, f"detected from the pixel sizes: {estimate:.3f}", ""


def grid_offset(outer: Grid, inner: Grid) -> tuple[int, int]:
    """(row, col) of inner's top-left pixel in outer (inner is a whole-pixel part of outer)."""
    col, row = ~outer.transform * (inner.transform.c, inner.transform.f)
    return round(row), round(col)


def read_padded(src: Any, grid: Grid, row: int, col: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Read a window of `grid` that may reach past its edges; outside, the edge pixels are repeated.

    Repeating the data edge (the toolbox's 'nearest' filter mode) depends only on the grid, not on the
    window, so filtered tiles agree wherever they overlap.
    """
    r0, c0 = max(row, 0), max(col, 0)
    r1, c1 = min(row + h, grid.height), min(col + w, grid.width)
    data, valid = src.read(Window(c0, r0, c1 - c0, r1 - r0))
    pad = ((r0 - row, row + h - r1), (c0 - col, col + w - c1))
    if any(any(p) for p in pad):
        data = np.pad(data, ((0, 0), *pad), mode="edge")
        valid = np.pad(valid, pad, mode="edge")
    return data, valid


def fill_nearest(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Nodata pixels take the value of the nearest valid pixel, so filters see no artificial edge there."""
    if valid.all() or not valid.any():
        return data
    idx = ndimage.distance_transform_edt(~valid, return_distances=False, return_indices=True)
    return data[..., idx[0], idx[1]]


def centre_window(grid: Grid, pair: Pair, max_size: int) -> Window:
    """The centre window of the grid: at most max_size per side, whole MS pixels, a multiple of ratio^2."""
    r = pair.ratio
    step = r * r  # the reference MS (window / r) must itself be divisible by r for Wald's degradation
    need = MIN_MS_PIXELS * step
    if max_size < need:
        raise JobError(INVALID_INPUT, f"max_size must be at least {need} PAN pixels at ratio {r}.")
    phase = pair.ms_origin_phase(grid)
    sizes = []
    for length, ph in ((grid.height, phase[0]), (grid.width, phase[1])):
        usable = length - ph  # start on an MS pixel corner
        size = min(max_size, usable) // step * step
        if size < need:
            raise JobError(
                INVALID_INPUT,
                f"The area to evaluate is only {grid.width} x {grid.height} PAN pixels; at ratio {r} the "
                f"evaluation needs at least {need} x {need}.",
                "Use a larger area of interest (or larger rasters).",
            )
        start = ph + (usable - size) // 2 // r * r
        sizes.append((start, size))
    (row, h), (col, w) = sizes
    return Window(col, row, w, h)


def ms_scale_grid(pan_grid: Grid, ratio: int) -> Grid:
    """The grid of MS pixels covering `pan_grid` (ratio x ratio PAN pixels each)."""
    return Grid(
        pan_grid.crs, pan_grid.transform * Affine.scale(ratio), pan_grid.width // ratio, pan_grid.height // ratio
    )


def fill_means(data: np.ndarray, valid: np.ndarray, what: str, warn: Callable[[str], None]) -> np.ndarray:
    """Nodata pixels filled with the band means (the indices need whole arrays), with a warning."""
    bad = float(1.0 - valid.mean())
    if bad == 0:
        return data.astype(np.float64)
    if bad > MAX_INVALID:
        raise JobError(
            INVALID_INPUT,
            f"{100 * bad:.0f} % of the {what} in the window read (to evaluate or train on) is nodata: too little data.",
            "Choose an area of interest where the PAN and MS hold data.",
        )
    warn(f"{100 * bad:.1f} % of the {what} in the window read is nodata; it is filled with band means.")
    out = data.astype(np.float64)
    for b in range(out.shape[0]):
        out[b][~valid] = out[b][valid].mean()
    return out


def read_window(pair: Pair, pan_grid: Grid, warn: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
    """PAN on its own grid and MS on its native pixels (resampled only when its grid does not nest)."""
    full = Window(0, 0, pan_grid.width, pan_grid.height)
    with RasterSource(pair.pan, grid=pan_grid, what="PAN") as src:
        pan, pvalid = src.read(full)
    ms_grid = ms_scale_grid(pan_grid, pair.ratio)
    with pair.ms_reader(ms_grid, Resampling.cubic) as src:
        ms, mvalid = src.read(Window(0, 0, ms_grid.width, ms_grid.height))
    return fill_means(pan, pvalid, "PAN", warn)[0], fill_means(ms, mvalid, "MS", warn)


def to_dtype(
    values: np.ndarray, valid: np.ndarray, dtype: np.dtype, nodata: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Fused floats in the MS dtype (integers rounded and clipped to the dtype's range), and the valid mask.

    A valid pixel that would equal the nodata value is moved off it, as GDAL's pansharpening does (one below
    it for integers, or one above at the dtype's minimum; 1e-5 above for floats).
    """
    finite = np.isfinite(values)
    valid = valid & np.all(finite, axis=0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.rint(np.where(finite, values, 0)), info.min, info.max).astype(dtype)
        if nodata is None or not info.min <= nodata <= info.max:
            return out, valid
        nd = dtype.type(nodata)
        moved = nd + 1 if nd == info.min else nd - 1
    else:
        out = values.astype(dtype)
        if nodata is None or math.isnan(nodata):
            return out, valid
        nd = dtype.type(nodata)
        moved = dtype.type(nodata + 1e-5)
    out[(out == nd) & valid[None]] = moved
    return out, valid


def output_nodata(pair: Pair) -> float | int:
    """The MS's nodata value; without one, 0 for integer data and NaN for floating-point data."""
    if pair.ms_nodata is not None:
        return pair.ms_nodata
    return 0 if np.issubdtype(pair.ms_dtype, np.integer) else float("nan")


class FusedImage:
    """A pansharpened result being written (a context manager): one GeoTIFF on the PAN grid in the MS's dtype,
    value scale, nodata and band names, written window by window; `finish` refuses a result without a single
    valid pixel."""

    def __init__(self, ctx: JobContext, final: Path, grid: Grid, pair: Pair, block: int, title: str) -> None:
        self.final, self.grid, self.pair, self.title = final, grid, pair, title
        self.nodata = output_nodata(pair)
        self.writer = GeoTiffWriter(
            ctx.output_path(final), grid, pair.bands, pair.ms_dtype.name, self.nodata, pair.descriptions, block=block
        )
        self.written = 0

    def __enter__(self) -> FusedImage:
        self.writer.__enter__()
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.writer.__exit__(exc_type)

    def write(self, win: Window, values: np.ndarray, valid: np.ndarray) -> None:
        """Fused floats (C, h, w) in the MS's value scale; invalid pixels become nodata."""
        out, ok = to_dtype(values, valid, self.pair.ms_dtype, self.nodata)
        self.writer.write(win, out, ok)
        self.written += int(np.count_nonzero(ok))

    def finish(self) -> JobResult:
        if self.written == 0:
            raise JobError(
                INVALID_INPUT,
                "The PAN and MS rasters have no pixel where both hold data (inside the area of interest, if any).",
                "Check their nodata values and that they cover the same area.",
            )
        g = self.grid
        return JobResult(
            outputs=[Output(str(self.final), "raster", self.title, "", "pansharpened")],
            metrics={
                "ratio": self.pair.ratio,
                "bands": self.pair.bands,
                "width": g.width,
                "height": g.height,
                "valid_fraction": self.written / (g.width * g.height),
            },
        )
