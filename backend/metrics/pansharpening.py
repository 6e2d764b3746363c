"""Pansharpening quality indices (methods.md §6), pure numpy/scipy.

Reduced resolution, against a reference G (Wald's protocol): Q2n, SAM, ERGAS, SCC, PSNR.
Full resolution, without a reference: D_lambda (Khan's MTF-based version, as in HQNR), D_s (QNR's), HQNR.
Arrays are float (bands, H, W); a PAN is (H, W). The definitions are those of the DLPan-Toolbox
(`Quality_Indices/*.m`) that methods.md summarises; where this code departs from it, a comment says so.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import ndimage

from backend.methods.pansharpening_classic import (
    GainsLike,
    bicubic_downsample,
    check_ratio,
    mtf_filter,
    upsample,
)

# Normalised Q2n blocks have unit variance per non-flat band, so anything this small is a flat block.
_FLAT = 1e-12


def _cube(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a (bands, height, width) array, got shape {arr.shape}.")
    return arr


def _pair(reference: np.ndarray, fused: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, fus = _cube(reference, "The reference"), _cube(fused, "The fused image")
    if ref.shape != fus.shape:
        raise ValueError(f"The fused image is {fus.shape} but the reference is {ref.shape}; they must match.")
    return ref, fus


def _conj(p: np.ndarray) -> np.ndarray:
    out = -p
    out[..., 0] = p[..., 0]
    return out


def _hypercomplex_mult(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Cayley-Dickson product over the last axis (2^n components), in the convention of the Q2n toolbox.

    With p = (a, b), q = (c, d) split into halves: p q = (a c - conj(d) b, conj(a) conj(d) + c conj(b)).
    For quaternions this differs from Hamilton's product only by conjugating the second half, which leaves
    the moduli Q2n is built from unchanged.
    """
    n = p.shape[-1]
    if n == 1:
        return p * q
    h = n // 2
    a, b, c, d = p[..., :h], p[..., h:], q[..., :h], q[..., h:]
    first = _hypercomplex_mult(a, c) - _hypercomplex_mult(_conj(d), b)
    second = _hypercomplex_mult(_conj(a), _conj(d)) + _hypercomplex_mult(c, _conj(b))
    return np.concatenate([first, second], axis=-1)


@lru_cache(maxsize=8)
def _structure_constants(n: int) -> np.ndarray:
    """T[i, j] = e_i e_j for the basis units, so that p q = sum_ij p_i q_j T[i, j] (the product is bilinear)."""
    eye = np.eye(n)
    table = _hypercomplex_mult(eye[:, None, :], eye[None, :, :])
    table.setflags(write=False)
    return table


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    """(bands, H, W) with H, W multiples of size -> (blocks, size*size, bands)."""
    n, h, w = x.shape
    x = x.reshape(n, h // size, size, w // size, size).transpose(1, 3, 2, 4, 0)
    return x.reshape(-1, size * size, n)


def _check_block(block_size: int) -> int:
    if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 2:
        raise ValueError(f"The block size must be a whole number >= 2, got {block_size!r}.")
    return int(block_size)


def q2n(reference: np.ndarray, fused: np.ndarray, block_size: int = 32) -> float:
    """Q2n (Garzelli & Nencini 2009; Q4 for 4 bands, Q8 for 8): mean over size x size blocks of

    |4 sigma_GF |mu_G| |mu_F|| / ((sigma_G^2 + sigma_F^2)(|mu_G|^2 + |mu_F|^2)),

    with each pixel a hypercomplex number of 2^n >= B components (zero bands appended). Every block and band
    is first normalised with the reference block's mean and std, plus 1. Images whose size is not a
    multiple of the block size are mirror-padded at the bottom and right, as the toolbox does.

    Departures from the toolbox: no cast to uint16 (inputs need not be digital numbers; rounding changes
    the value slightly), and a flat reference block is not divided by machine epsilon (which blows rounding
    noise up) but left unscaled.
    """
    ref, fus = _pair(reference, fused)
    size = _check_block(block_size)
    bands, h, w = ref.shape
    pad = ((0, 0), (0, -h % size), (0, -w % size))
    if any(p[1] for p in pad):
        ref, fus = np.pad(ref, pad, mode="symmetric"), np.pad(fus, pad, mode="symmetric")
    comps = 1 << (bands - 1).bit_length()
    if comps != bands:
        zeros = np.zeros((comps - bands, *ref.shape[1:]))
        ref, fus = np.concatenate([ref, zeros]), np.concatenate([fus, zeros])
    x, y = _blocks(ref, size), _blocks(fus, size)

    mean = x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, ddof=1, keepdims=True)
    std[std <= 1e-12 * np.abs(mean)] = 1.0  # flat (up to rounding) reference band in this block
    x = (x - mean) / std + 1
    y = (y - mean) / std + 1

    npix = size * size
    unbias = npix / (npix - 1)
    mx, my = x.mean(axis=1), y.mean(axis=1)
    mx2, my2 = (mx**2).sum(-1), (my**2).sum(-1)
    var_x = unbias * ((x**2).sum(-1).mean(axis=1) - mx2)
    var_y = unbias * ((y**2).sum(-1).mean(axis=1) - my2)
    # E[x conj(y)] per block from the matrix of cross moments E[x_i y_j]: a batched matmul instead of a
    # hypercomplex product at every pixel.
    signs = _conj(np.ones(comps))
    cross = np.matmul(x.transpose(0, 2, 1), y) / npix * signs
    mean_prod = np.einsum("bij,ijk->bk", cross, _structure_constants(comps))
    cov = unbias * (mean_prod - _hypercomplex_mult(mx, _conj(my)))
    mean_bias = 2 * np.sqrt(mx2 * my2) / (mx2 + my2)
    denom = var_x + var_y
    flat = denom <= _FLAT
    q = np.where(flat, mean_bias, 2 * np.linalg.norm(cov, axis=-1) / np.where(flat, 1.0, denom) * mean_bias)
    return float(q.mean())


def sam(reference: np.ndarray, fused: np.ndarray) -> float:
    """Spectral angle mapper in degrees: mean over pixels with |G||F| != 0 of arccos(<G, F> / (|G| |F|))."""
    ref, fus = _pair(reference, fused)
    dot = (ref * fus).sum(axis=0)
    norms = np.sqrt((ref**2).sum(axis=0) * (fus**2).sum(axis=0))
    valid = norms != 0
    if not valid.any():
        return 0.0
    cos = np.clip(dot[valid] / norms[valid], -1.0, 1.0)
    return float(np.degrees(np.arccos(cos).mean()))


def ergas(reference: np.ndarray, fused: np.ndarray, ratio: float) -> float:
    """ERGAS = (100 / ratio) sqrt((1/B) sum_b MSE_b / mu_b^2), mu_b the mean of reference band b."""
    ref, fus = _pair(reference, fused)
    ratio = check_ratio(ratio)
    mse = ((ref - fus) ** 2).mean(axis=(1, 2))
    mu2 = ref.mean(axis=(1, 2)) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(mse == 0, 0.0, mse / mu2)
    return float(100.0 / ratio * math.sqrt(rel.mean()))


def _sobel_magnitude(cube: np.ndarray) -> np.ndarray:
    out = np.empty((cube.shape[0], cube.shape[1] - 2, cube.shape[2] - 2))
    for b, band in enumerate(cube):
        inner = band[1:-1, 1:-1]  # the toolbox crops one pixel, then filters with zero padding
        gy = ndimage.sobel(inner, axis=0, mode="constant")
        gx = ndimage.sobel(inner, axis=1, mode="constant")
        out[b] = np.hypot(gx, gy)
    return out


def scc(reference: np.ndarray, fused: np.ndarray) -> float:
    """Spatial correlation coefficient: uncentred correlation of the Sobel gradient magnitudes over all bands.

    sCC = sum(|grad F| |grad G|) / (||grad F||_2 ||grad G||_2), after cropping a 1-pixel border.
    """
    ref, fus = _pair(reference, fused)
    if ref.shape[1] < 3 or ref.shape[2] < 3:
        raise ValueError("SCC needs images of at least 3x3 pixels.")
    gf, gg = _sobel_magnitude(fus), _sobel_magnitude(ref)
    nf, ng = np.linalg.norm(gf), np.linalg.norm(gg)
    if nf == 0 or ng == 0:
        return 1.0 if nf == ng else 0.0
    return float((gf * gg).sum() / nf / ng)


def psnr(reference: np.ndarray, fused: np.ndarray, data_range: float) -> float:
    """PSNR = 10 log10(data_range^2 / MSE_b), averaged over bands (inf when the images are equal).

    data_range is the peak value of the scale the images are in, e.g. 1 after dividing by 2047, or 2047.
    """
    ref, fus = _pair(reference, fused)
    if not data_range > 0:
        raise ValueError(f"The PSNR data range must be positive, got {data_range}.")
    mse = ((ref - fus) ** 2).mean(axis=(1, 2))
    with np.errstate(divide="ignore"):
        per_band = 10 * np.log10(data_range**2 / mse)
    return float(per_band.mean())


def reduced_resolution_metrics(
    fused: np.ndarray,
    reference: np.ndarray,
    ratio: int,
    *,
    data_range: float | None = None,
    block_size: int = 32,
    border: int = 0,
) -> dict[str, float]:
    """Q2n, SAM, ERGAS, SCC and PSNR of a fused image against its reference.

    `border` pixels are cut on every side first (PanCollection uses 21 on 256x256 images). PSNR uses
    `data_range`, or the maximum of the reference when it is None.
    """
    ref, fus = _pair(reference, fused)
    if border:
        if 2 * border >= min(ref.shape[1:]):
            raise ValueError(f"A border of {border} pixels leaves nothing of a {ref.shape[1:]} image.")
        ref, fus = ref[:, border:-border, border:-border], fus[:, border:-border, border:-border]
    peak = float(ref.max()) if data_range is None else float(data_range)
    return {
        "q2n": q2n(ref, fus, block_size),
        "sam": sam(ref, fus),
        "ergas": ergas(ref, fus, ratio),
        "scc": scc(ref, fus),
        "psnr": psnr(ref, fus, peak),
    }


def d_lambda_khan(fused: np.ndarray, ms_up: np.ndarray, ratio: int, sensor: GainsLike, block_size: int = 32) -> float:
    """Khan's spectral distortion (HQNR): 1 - Q2n(MS_up, MTF(F)), F low-passed with the sensor's MTF filter

    at the PAN scale (no decimation), MS_up the MS interpolated to the PAN grid.
    """
    fus, up = _pair(fused, ms_up)
    return 1.0 - q2n(up, mtf_filter(fus, sensor, ratio), block_size)


def _uqi_blocks(x: np.ndarray, y: np.ndarray, size: int) -> float:
    """Universal image quality index of two 2-D images, averaged over size x size blocks.

    Edge blocks that do not fill a whole block are used as they are (MATLAB blockproc's behaviour).
    """
    h, w = x.shape
    pad = ((0, -h % size), (0, -w % size))
    xb = _blocks(np.pad(x, pad, constant_values=np.nan)[None], size)[..., 0]
    yb = _blocks(np.pad(y, pad, constant_values=np.nan)[None], size)[..., 0]
    mx, my = np.nanmean(xb, axis=1), np.nanmean(yb, axis=1)
    # Population moments: the n / (n - 1) factors of a sample covariance cancel in the ratio.
    vx = np.nanmean((xb - mx[:, None]) ** 2, axis=1)
    vy = np.nanmean((yb - my[:, None]) ** 2, axis=1)
    cxy = np.nanmean((xb - mx[:, None]) * (yb - my[:, None]), axis=1)
    m2 = mx**2 + my**2
    v2 = vx + vy
    flat = v2 <= 1e-14 * np.maximum(m2, 1.0)
    # Flat blocks: only the means can be compared (Wang & Bovik's convention); both zero counts as equal.
    q = np.where(
        flat,
        np.where(m2 > 0, 2 * mx * my / np.where(m2 > 0, m2, 1.0), 1.0),
        4 * cxy * mx * my / np.where(flat, 1.0, v2) / np.where(m2 > 0, m2, 1.0),
    )
    return float(q.mean())


def d_s(
    fused: np.ndarray,
    ms_up: np.ndarray,
    pan: np.ndarray,
    ratio: int,
    block_size: int = 32,
    q: float = 1.0,
) -> float:
    """QNR's spatial distortion, toolbox 1.0 variant: ((1/B) sum_b |Q(F_b, P) - Q(MS_up_b, P_LP)|^q)^(1/q),

    Q the universal image quality index on size x size blocks, P_LP = upsample(imresize(P, 1/ratio)).
    """
    fus, up = _pair(fused, ms_up)
    pan2 = np.asarray(pan, dtype=np.float64)
    if pan2.ndim == 3 and pan2.shape[0] == 1:
        pan2 = pan2[0]
    if pan2.shape != fus.shape[1:]:
        raise ValueError(f"The PAN is {pan2.shape} but the fused image is {fus.shape[1:]}; they must match.")
    size = _check_block(block_size)
    ratio = check_ratio(ratio)
    if not q > 0:
        raise ValueError(f"The D_s exponent q must be positive, got {q}.")
    pan_lp = upsample(bicubic_downsample(pan2, ratio), ratio)
    diffs = np.array(
        [abs(_uqi_blocks(fus[b], pan2, size) - _uqi_blocks(up[b], pan_lp, size)) for b in range(fus.shape[0])]
    )
    return float((diffs**q).mean() ** (1.0 / q))


def full_resolution_metrics(
    fused: np.ndarray,
    ms: np.ndarray,
    pan: np.ndarray,
    ratio: int,
    sensor: GainsLike,
    *,
    block_size: int = 32,
    q: float = 1.0,
) -> dict[str, float]:
    """D_lambda (Khan), D_s and HQNR = (1 - D_lambda)(1 - D_s) of a fused image from its MS (MS grid) and PAN."""
    ratio = check_ratio(ratio)
    ms_up = upsample(_cube(ms, "The MS image"), ratio)
    fus = _cube(fused, "The fused image")
    if ms_up.shape != fus.shape:
        raise ValueError(
            f"The fused image is {fus.shape}; the MS upsampled by {ratio} is {ms_up.shape}. "
            "The fused image must be on the PAN grid with the MS's bands."
        )
    dl = d_lambda_khan(fus, ms_up, ratio, sensor, block_size)
    ds = d_s(fus, ms_up, pan, ratio, block_size, q)
    return {"d_lambda": dl, "d_s": ds, "hqnr": (1.0 - dl) * (1.0 - ds)}
