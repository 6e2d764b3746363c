"""SpectralX's data plumbing: which bands and wavelengths a raster brings, their resampling onto a model's
wavelengths, and the per-scene normalisation.

HyperT's first convolutions are sized to the band count (as released), so an adapter keeps the wavelengths it
was trained on; a raster of another sensor is resampled onto them by linear interpolation in wavelength
(backend/io/wavelengths.py) and then goes through the same HyperT, whose spectral code carries the wavelengths.
Each scene is standardised on its own statistics (the paper normalises every image on its own), so another
season or sensor arrives on the same footing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.windows import Window

from backend.io.raster import Grid, RasterSource
from backend.io.rasterize import restrict_to_aoi
from backend.io.wavelengths import resampling_matrix, resolve_wavelengths
from backend.protocol import INVALID_INPUT, JobError
from backend.training.areas import check_size

STATS_SIDE = 1024  # statistics come from a read decimated to at most this many pixels a side
MIN_BANDS = 3


@dataclass
class BandSetup:
    """The raster's chosen bands and their wavelengths (nm), and where those came from."""

    bands: list[int]
    wavelengths: list[float]
    source: str


def band_setup(image: str, bands: list[int] | None, wavelengths: str | None, sensor: str | None) -> BandSetup:
    with RasterSource(image, bands, what="image") as src:
        chosen = list(src.bands)
    if len(chosen) < MIN_BANDS:
        raise JobError(
            INVALID_INPUT,
            f"Land-cover mapping from spectra needs at least {MIN_BANDS} bands; {len(chosen)} were chosen.",
            "Choose a multispectral or hyperspectral raster (or more of its bands).",
        )
    values, source = resolve_wavelengths(image, chosen, wavelengths, sensor)
    return BandSetup(chosen, values, source)


def to_model(
    raster_wavelengths: list[float], model_wavelengths: list[float], warn: Callable[[str], None]
) -> np.ndarray:
    """The (model bands, raster bands) matrix taking the raster's bands to the model's wavelengths; identity when
    they agree. Warns when the sensors differ."""
    matrix, wide = resampling_matrix(raster_wavelengths, model_wavelengths)
    if not np.allclose(raster_wavelengths, model_wavelengths, atol=1.0) or len(raster_wavelengths) != len(
        model_wavelengths
    ):
        warn(
            f"The raster's {len(raster_wavelengths)} bands were resampled onto the adapter's "
            f"{len(model_wavelengths)} wavelengths by linear interpolation in wavelength."
        )
    if wide:
        warn(f"Bands at {'; '.join(wide)} were interpolated across a wide spectral gap: expect lower accuracy.")
    return matrix


def apply_matrix(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(raster bands, h, w) -> (model bands, h, w)."""
    if matrix.shape[0] == matrix.shape[1] and np.array_equal(matrix, np.eye(matrix.shape[0], dtype=matrix.dtype)):
        return x
    return np.einsum("mr,rhw->mhw", matrix, x, optimize=True).astype(np.float32)


def scene_normalization(image: str, bands: list[int], matrix: np.ndarray) -> dict[str, list[float]]:
    """Per model band mean and std of the whole raster's valid pixels (read decimated)."""
    with rasterio.open(image) as ds:
        f = max(1, math.ceil(max(ds.width, ds.height) / STATS_SIDE))
        shape = (len(bands), math.ceil(ds.height / f), math.ceil(ds.width / f))
        data = ds.read(bands, out_shape=shape, masked=True)
    values = data.filled(np.nan).astype(np.float64).reshape(len(bands), -1)
    ok = np.all(np.isfinite(values), axis=0)
    if ok.sum() < 16:
        raise JobError(INVALID_INPUT, "The image has (almost) no valid pixels: it is all nodata.")
    pixels = matrix.astype(np.float64) @ values[:, ok]
    return {"mean": pixels.mean(1).tolist(), "std": np.maximum(pixels.std(1), 1e-6).tolist()}


def fill_invalid(x: np.ndarray, valid: np.ndarray, mean: list[float]) -> np.ndarray:
    """Invalid pixels (nodata) take the band means, i.e. zero once normalised."""
    return np.where(valid[None], x, np.asarray(mean, np.float32)[:, None, None]).astype(np.float32)


def read_unlabelled(
    image: str, bands: list[int], aoi: str | None, warnings: list[str]
) -> tuple[np.ndarray, np.ndarray, Grid]:
    """The image inside the AOI (or whole, when small enough): (C, H, W) raw values, valid (H, W), its grid."""
    with RasterSource(image, bands, what="image") as src:
        grid = src.native
    inside = None
    if aoi:
        grid, burner = restrict_to_aoi(grid, aoi, warnings)
        inside = burner.burn(grid) > 0
    else:
        check_size(grid)
    with RasterSource(image, bands, grid=grid, what="image") as src:
        x, valid = src.read(Window(0, 0, grid.width, grid.height))
    if inside is not None:
        valid &= inside
    return x, valid, grid
