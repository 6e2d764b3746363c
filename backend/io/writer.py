"""Tiled, compressed GeoTIFF output written strip by strip on a grid."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

from backend.io.raster import Grid

BLOCK = 256
# Overviews let QGIS draw big results quickly; tiny rasters do not need them.
OVERVIEW_MIN_SIZE = 2048


class GeoTiffWriter:
    """Writes a (bands, height, width) raster window by window; invalid pixels become nodata."""

    def __init__(
        self,
        path: str | Path,
        grid: Grid,
        count: int,
        dtype: str,
        nodata: float | int | None,
        descriptions: tuple[str, ...] | None = None,
        overview_resampling: Resampling = Resampling.average,
        block: int = BLOCK,
        compress: str = "deflate",
        overviews: bool = True,
    ) -> None:
        self.grid, self.nodata, self.dtype = grid, nodata, np.dtype(dtype)
        self.overview_resampling, self.overviews = overview_resampling, overviews
        is_float = np.issubdtype(self.dtype, np.floating)
        profile = {
            "driver": "GTiff",
            "width": grid.width,
            "height": grid.height,
            "count": count,
            "dtype": self.dtype.name,
            "nodata": nodata,
            "compress": compress,
            "NUM_THREADS": "ALL_CPUS",  # parallel compression
            "predictor": 3 if is_float else 2,
            "BIGTIFF": "IF_SAFER",
        }
        # GeoTIFF tiles must be multiples of 16; writing whole tiles keeps GDAL's cache small.
        if block % 16:
            block = BLOCK
        if grid.width >= block and grid.height >= block:
            profile.update(tiled=True, blockxsize=block, blockysize=block)
        if grid.georeferenced:
            profile.update(crs=grid.crs, transform=grid.transform)
        with warnings.catch_warnings(category=NotGeoreferencedWarning, action="ignore"):  # pixel-space is allowed
            self.ds = rasterio.open(Path(path), "w", **profile)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                self.ds.set_band_description(i, d)

    def write(self, window: Window, values: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Write values (bands, h, w) into window; pixels where valid is False get nodata."""
        if values.ndim == 2:
            values = values[None]
        out = values.astype(self.dtype, copy=False)
        if valid is not None and self.nodata is not None:
            out = np.where(valid[None], out, np.asarray(self.nodata, dtype=self.dtype))
        self.ds.write(out, window=window)

    def close(self) -> None:
        if self.ds.closed:
            return
        if self.overviews and max(self.grid.width, self.grid.height) >= OVERVIEW_MIN_SIZE:
            factors = [f for f in (2, 4, 8, 16, 32) if max(self.grid.width, self.grid.height) // f >= BLOCK]
            self.ds.build_overviews(factors, self.overview_resampling)
        self.ds.close()

    def __enter__(self) -> GeoTiffWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is not None:
            self.ds.close()  # failed: no overviews, the job discards the file anyway
        else:
            self.close()
