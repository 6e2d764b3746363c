"""GSA (Gram-Schmidt adaptive) over a whole scene: its regression weights and means from one streaming pass,
then pixel-by-pixel fusion, so tiles need no halo and show no seams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from rasterio.windows import Window
from scipy import ndimage

from backend.context import JobContext
from backend.io.pairs import Pair, grid_offset, read_padded
from backend.io.raster import Grid
from backend.io.rasterize import PolygonBurner
from backend.io.tiling import block_windows
from backend.methods.pansharpening_classic import GENERIC_GAIN, default_kernel_size, mtf_filter
from backend.protocol import INVALID_INPUT, JobError

STATS_BLOCK = 512  # PAN pixels; fixed so that the statistics do not depend on the tile size
MAX_STATS_BLOCKS = 64  # evenly spread blocks sampled on big scenes (up to ~17 MP read for statistics)


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
