"""pansharpen.classic: Brovey, GSA or MTF-GLP-HPM over a whole PAN + MS scene, streamed tile by tile.

The output is on the PAN grid (CRS, transform, resolution of the PAN, limited to the PAN/MS overlap and the
area of interest), with the MS's bands, dtype, value scale and nodata. The MS is read onto the PAN grid on
the fly through a warped VRT with cubic resampling (what GDAL's own pansharpening uses), so the two rasters
may differ in CRS or extent. The evaluation job interpolates with the classical 23-tap filter instead; here
the warp also aligns the grids, which that filter cannot.

Tiles never overlap and are never blended: the classical methods are exact per pixel once their few global
statistics are known, so each tile is computed from its own window plus a halo wide enough for the filters
(none for Brovey and GSA, 12 x ratio PAN pixels for the MTF low-pass and re-interpolation of MTF-GLP-HPM), and
the result does not depend on the tile size (no seams). GSA's regression weights and means come from a first
streaming pass over a decimated sample, on fixed blocks independent of the tile size; weights estimated per
tile would change from tile to tile and leave seams.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import transform as transform_points
from rasterio.windows import Window
from scipy import ndimage

from backend.io.raster import Grid, RasterSource, overlap_grid
from backend.io.rasterize import PolygonBurner, restrict_to_aoi
from backend.io.tiling import block_windows
from backend.io.writer import GeoTiffWriter
from backend.jobs.base import JobContext, JobSpec, OutputDecl, Param, prepare_out_dir
from backend.methods.pansharpening_classic import (
    GENERIC_GAIN,
    SENSORS,
    band_gains,
    brovey,
    default_kernel_size,
    mtf_filter,
    mtf_glp_hpm,
)
from backend.protocol import INVALID_INPUT, JobError, JobResult, Output

METHODS = ("brovey", "gsa", "mtf_glp_hpm")
METHOD_TITLES = {"brovey": "Brovey", "gsa": "GSA", "mtf_glp_hpm": "MTF-GLP-HPM"}
SENSOR_CHOICES = (*(k for k in SENSORS if k != "generic"), "generic")
RATIO_TOLERANCE = 0.02  # relative: a detected ratio must be this close to a whole number
HPM_HALO = 12  # x ratio: the reach of MTF filter + decimation + 23-tap re-interpolation (measured ~11)
STATS_BLOCK = 512  # PAN pixels; fixed so that the statistics do not depend on the tile size
MAX_STATS_BLOCKS = 64  # evenly spread blocks sampled on big scenes (up to ~17 MP read for statistics)
# In pixel space (neither raster georeferenced) both grids are put in one made-up CRS for the warper.

DECLARED = (OutputDecl("pansharpened", "raster", "Pansharpened image (PAN grid, MS bands and dtype)"),)

SENSOR = Param(
    "sensor",
    str,
    "Sensor of the MS, for its MTF filters (QB = QuickBird, WV2/WV3 = WorldView-2/3); generic for others.",
    default="generic",
    choices=SENSOR_CHOICES,
)
RATIO = Param(
    "ratio", int, "MS pixel size / PAN pixel size (2, 4 …); auto = detected from the two grids.", default=None
)

PAN = Param("pan", str, "Panchromatic raster (one band); its grid is the output grid.", required=True, kind="raster")

PARAMS = (
    PAN,
    Param(
        "ms",
        str,
        "Multispectral raster (any band count, any CRS; read onto the PAN grid on the fly).",
        required=True,
        kind="raster",
    ),
    Param("out_dir", str, "Folder for the result.", required=True, kind="folder"),
    Param(
        "method",
        str,
        "brovey: GDAL's weighted Brovey (fast, strong colour shifts); gsa: Gram-Schmidt adaptive; "
        "mtf_glp_hpm: MTF-matched high-pass modulation (usually the most faithful colours).",
        default="mtf_glp_hpm",
        choices=METHODS,
    ),
    SENSOR,
    RATIO,
    Param("ms_bands", list, "MS bands to pansharpen, e.g. 1,2,3 (default: all).", kind="bands"),
    Param("aoi", str, "Polygon layer: only the area inside it is pansharpened (default: all).", kind="polygons"),
    Param("name", str, "Prefix of the output file name.", default="pansharpened"),
    Param("tile_size", int, "Tile size in PAN pixels (memory grows with its square).", default=512),
)


# --- the PAN + MS pair -------------------------------------------------------------------------------------


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


def open_pair(ctx: JobContext, pan: str, ms: str, ms_bands: list[int] | None, ratio: int | None) -> Pair:
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
        found, note, warning = _ratio(p.native, m.native, ratio, georef)
        if warning:
            ctx.warn(warning)
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


def sensor_gains(sensor: str, bands: int) -> np.ndarray:
    """The MS bands' MTF gains, or a clear error when the sensor does not fit the band count."""
    try:
        return band_gains(sensor, bands)
    except ValueError as exc:
        raise JobError(
            INVALID_INPUT,
            str(exc),
            "Choose the MS bands that match the sensor (ms_bands), or sensor 'generic'.",
        ) from None


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


# --- statistics and per-tile fusion -----------------------------------------------------------------------


@dataclass
class Stats:
    """What GSA needs of the whole scene (estimated on a decimated sample)."""

    pan_mean: float
    band_mean: np.ndarray  # (bands,) of the MS on the PAN grid
    band_cov: np.ndarray  # (bands, bands)
    alpha: np.ndarray  # intensity weights (bands,): the low-pass PAN regressed on the MS bands
    samples: int


def _lattice(start: int, length: int, phase: int, ratio: int) -> np.ndarray:
    """Indexes (relative to start) of pixels start..start+length-1 that are MS pixel centres on the PAN grid."""
    first = (phase + ratio // 2 - start) % ratio
    return np.arange(first, length, ratio)


def compute_stats(
    ctx: JobContext,
    pair: Pair,
    pan_src: Any,
    ms_src: Any,
    data_grid: Grid,
    out_grid: Grid,
    aoi: PolygonBurner | None,
    phase: tuple[int, int],
    progress: tuple[float, float],
) -> Stats:
    """One streaming pass over fixed blocks, summing over MS pixel centres that are valid in PAN and MS.

    GSA regresses the PAN on the MS bands at the MS scale, so that the intensity matches the PAN's low-pass
    content and not its details: the PAN is low-passed with the generic MTF filter and sampled at the MS
    pixel centres, where the MS (warped onto the PAN grid) holds its own values.
    """
    r = pair.ratio
    nb = pair.bands
    oy, ox = grid_offset(data_grid, out_grid)
    size = default_kernel_size(r)
    halo = size // 2 + r
    wins = list(block_windows(out_grid.width, out_grid.height, STATS_BLOCK))
    if len(wins) > MAX_STATS_BLOCKS:
        wins = [wins[i] for i in np.unique(np.linspace(0, len(wins) - 1, MAX_STATS_BLOCKS).round().astype(int))]
    n = 0
    s_pan = s_lp = 0.0
    s_ms = np.zeros(nb)
    s_msms = np.zeros((nb, nb))
    s_mslp = np.zeros(nb)
    for i, win in enumerate(wins):
        ctx.progress(progress[0] + (progress[1] - progress[0]) * i / len(wins), "statistics")
        y0, x0, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        pan, pvalid = read_padded(pan_src, data_grid, oy + y0 - halo, ox + x0 - halo, h + 2 * halo, w + 2 * halo)
        pan = pan[0].astype(np.float64)
        if not pvalid.any():
            continue
        pan[~pvalid] = pan[pvalid].mean()  # any value: the samples that see it are dropped below
        low = mtf_filter(pan, GENERIC_GAIN, r)
        clean = ndimage.minimum_filter(pvalid, size=size, mode="nearest")  # no nodata under the filter
        ms, mvalid = ms_src.read(Window(ox + x0, oy + y0, w, h))
        ok = clean[halo : halo + h, halo : halo + w] & mvalid
        if aoi is not None:
            ok &= aoi.burn(out_grid.window_grid(win)) > 0
        rows, cols = _lattice(y0, h, phase[0], r), _lattice(x0, w, phase[1], r)
        ok = ok[np.ix_(rows, cols)]
        if not ok.any():
            continue
        p = pan[halo : halo + h, halo : halo + w][np.ix_(rows, cols)][ok]
        lp = low[halo : halo + h, halo : halo + w][np.ix_(rows, cols)][ok]
        m = ms[:, rows][:, :, cols][:, ok].astype(np.float64)
        n += p.size
        s_pan += p.sum()
        s_lp += lp.sum()
        s_ms += m.sum(axis=1)
        s_msms += m @ m.T
        s_mslp += m @ lp
    if n < nb + 2:
        raise JobError(
            INVALID_INPUT,
            "The PAN and MS rasters have (almost) no pixel where both hold data"
            + (" inside the area of interest." if aoi is not None else "."),
            "Check their nodata values and that they cover the same area.",
        )
    band_mean = s_ms / n
    cov = (s_msms - n * np.outer(band_mean, band_mean)) / (n - 1)
    cross = (s_mslp - n * band_mean * (s_lp / n)) / (n - 1)
    # Least squares of the low-pass PAN on the bands plus a constant: the constant absorbs the means, so the
    # weights solve the covariance system (lstsq: bands that copy each other stay solvable).
    alpha = np.linalg.lstsq(cov, cross, rcond=None)[0]
    return Stats(s_pan / n, band_mean, cov, alpha, n)


def fuse_gsa(pan: np.ndarray, ms: np.ndarray, st: Stats) -> np.ndarray:
    """GSA with the scene's weights: ms + g_b (pan - I), I = alpha . (ms - mean), g_b = cov(ms_b, I) / var(I).

    Pixel by pixel, so tiles need no halo (pansharpening_classic.gsa is the same on a whole array).
    """
    var_i = float(st.alpha @ st.band_cov @ st.alpha)
    if var_i <= 1e-18 * (np.trace(st.band_cov) + 1.0):
        return ms  # flat MS: no intensity to substitute
    intensity = np.tensordot(st.alpha, ms - st.band_mean[:, None, None], axes=1)
    gains = st.band_cov @ st.alpha / var_i
    return ms + gains[:, None, None] * ((pan - st.pan_mean) - intensity)[None]


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


def fill_nearest(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Nodata pixels take the value of the nearest valid pixel, so filters see no artificial edge there."""
    if valid.all() or not valid.any():
        return data
    idx = ndimage.distance_transform_edt(~valid, return_distances=False, return_indices=True)
    return data[..., idx[0], idx[1]]


def output_nodata(pair: Pair) -> float | int:
    """The MS's nodata value; without one, 0 for integer data and NaN for floating-point data."""
    if pair.ms_nodata is not None:
        return pair.ms_nodata
    return 0 if np.issubdtype(pair.ms_dtype, np.integer) else float("nan")


# --- the job ------------------------------------------------------------------------------------------------


def run(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    started = time.monotonic()
    ctx.protect_inputs(p["pan"], p["ms"])
    out_dir = prepare_out_dir(p["out_dir"])
    if p["tile_size"] < 32:
        raise JobError(INVALID_INPUT, "The tile size must be at least 32 pixels.")
    pair = open_pair(ctx, p["pan"], p["ms"], p["ms_bands"], p["ratio"])
    r, method = pair.ratio, p["method"]
    gains = sensor_gains(p["sensor"], pair.bands)
    data_grid = pair.overlap()
    grid, aoi = data_grid, None
    if p["aoi"]:
        grid, aoi = restrict_to_aoi(data_grid, p["aoi"], ctx.warnings)
    if not pair.georeferenced:
        ctx.warn(
            "The PAN and MS are not georeferenced: they are matched in pixel space (same top-left corner, one MS "
            "pixel per ratio x ratio PAN pixels) and the result has no CRS."
        )
    oy, ox = grid_offset(data_grid, grid)
    phase = pair.ms_origin_phase(grid)
    ctx.log(
        f"Pansharpening {grid.width} x {grid.height} PAN pixels ({grid.width * grid.height / 1e6:.1f} MP), "
        f"{pair.bands} MS band(s), ratio {r} ({pair.ratio_note}), {METHOD_TITLES[method]}, sensor {p['sensor']}."
    )
    nodata = output_nodata(pair)
    final = out_dir / f"{p['name']}_{method}.tif"
    tile = p["tile_size"]
    block = tile if tile % 16 == 0 else 256
    halo = HPM_HALO * r if method == "mtf_glp_hpm" else 0

    pan_src = RasterSource(pair.pan, grid=data_grid, what="PAN")
    # Cubic warping onto the PAN grid (GDAL pansharpening's default) also aligns the grids on the fly.
    ms_src = pair.ms_reader(data_grid, Resampling.cubic)
    with pan_src, ms_src:
        stats = None
        if method == "gsa":
            stats = compute_stats(ctx, pair, pan_src, ms_src, data_grid, grid, aoi, phase, (0.0, 0.2))
            ctx.log(f"GSA weights from {stats.samples} sample pixels: {np.round(stats.alpha, 4).tolist()}.")
        start = 0.2 if stats is not None else 0.0
        written = 0
        with GeoTiffWriter(
            ctx.output_path(final), grid, pair.bands, pair.ms_dtype.name, nodata, pair.descriptions, block=block
        ) as writer:
            wins = list(block_windows(grid.width, grid.height, tile))
            for i, win in enumerate(wins):
                ctx.progress(start + (1.0 - start) * i / len(wins), "pansharpening", f"tile {i + 1}/{len(wins)}")
                y0, x0, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
                ms, mvalid = ms_src.read(Window(ox + x0, oy + y0, w, h))
                ms = ms.astype(np.float64)
                if method == "mtf_glp_hpm":
                    # Whole MS pixels around the tile, so the decimation samples MS pixel centres in every tile.
                    ya = y0 - halo - (y0 - halo - phase[0]) % r
                    xa = x0 - halo - (x0 - halo - phase[1]) % r
                    yb = y0 + h + halo + (phase[0] - y0 - h - halo) % r
                    xb = x0 + w + halo + (phase[1] - x0 - w - halo) % r
                    pan, pvalid_all = read_padded(pan_src, data_grid, oy + ya, ox + xa, yb - ya, xb - xa)
                    pan = fill_nearest(pan[0].astype(np.float64), pvalid_all)
                    pvalid = pvalid_all[y0 - ya : y0 - ya + h, x0 - xa : x0 - xa + w]
                    fused = mtf_glp_hpm(pan, ms, r, gains, (y0 - ya, x0 - xa))
                else:
                    pan, pvalid = pan_src.read(Window(ox + x0, oy + y0, w, h))
                    pan = pan[0].astype(np.float64)
                    fused = brovey(pan, ms) if method == "brovey" else fuse_gsa(pan, ms, stats)  # type: ignore[arg-type]
                valid = pvalid & mvalid
                if aoi is not None:
                    valid &= aoi.burn(grid.window_grid(win)) > 0
                out, valid = to_dtype(fused, valid, pair.ms_dtype, nodata)
                writer.write(win, out, valid)
                written += int(np.count_nonzero(valid))
        ctx.progress(1.0, "pansharpening", "done")
    if written == 0:
        raise JobError(
            INVALID_INPUT,
            "The PAN and MS rasters have no pixel where both hold data"
            + (" inside the area of interest." if aoi is not None else "."),
            "Check their nodata values and that they cover the same area.",
        )
    seconds = time.monotonic() - started
    pixels = grid.width * grid.height
    metrics: dict[str, Any] = {
        "ratio": r,
        "bands": pair.bands,
        "width": grid.width,
        "height": grid.height,
        "valid_fraction": written / pixels,
        "megapixels_per_second": pixels / 1e6 / max(seconds, 1e-9),
    }
    title = METHOD_TITLES[method]
    return JobResult(
        outputs=[Output(str(final), "raster", f"{p['name']} ({title})", "", "pansharpened")], metrics=metrics
    )


SPEC = JobSpec(
    "pansharpen.classic",
    "Pansharpen a PAN + MS pair with a classical method (no training): the MS's bands at the PAN's resolution.",
    PARAMS,
    run,
    title="Pansharpen (classical: Brovey / GSA / MTF-GLP-HPM)",
    outputs=DECLARED,
)
