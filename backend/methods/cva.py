"""Change-vector analysis (the classical change-detection baseline): the magnitude of the standardised
difference vector, smoothed, and Otsu's threshold on its histogram."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

GAUSS_TRUNCATE = 3.0


def smoothing_radius(sigma: float) -> int:
    """Pixels the Gaussian of `sigma` reaches (0 without smoothing)."""
    return int(GAUSS_TRUNCATE * sigma + 0.5) if sigma > 0 else 0


def magnitude(
    batch: np.ndarray, valid: np.ndarray, mean: np.ndarray, std: np.ndarray, bands: int, sigma: float
) -> np.ndarray:
    """CVA magnitude of tiles (B, 2C, h, w) holding both dates (before bands first), standardised per band with
    `mean`/`std` (2C,), zero where not valid, smoothed by a Gaussian of `sigma` pixels: (B, 1, h, w) float32."""
    z = (batch - mean[None, :, None, None]) / std[None, :, None, None]
    d = np.where(valid[:, None], z[:, bands:] - z[:, :bands], 0.0)
    mag = np.sqrt(np.sum(d * d, axis=1))
    if sigma > 0:
        mag = np.stack([ndimage.gaussian_filter(m, sigma, truncate=GAUSS_TRUNCATE) for m in mag])
    return mag[:, None].astype(np.float32)


def otsu_threshold(hist: np.ndarray, edges: np.ndarray) -> float:
    """Otsu's threshold: the bin edge that maximises the between-class variance."""
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])
