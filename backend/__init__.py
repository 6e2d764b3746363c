"""rs-peft-qgis backend: the worker process, jobs, models and the raster engine (never imports qgis)."""

import ctypes
import ctypes.util
import os
import sys
import warnings

__version__ = "0.1.0"
# Comma-separated modules that register more methods (a lab's own, or a test's): backend/methods/spec.py.
EXTRA_METHODS_ENV = "RS_PEFT_QGIS_METHODS"

# GDAL's block cache defaults to 5% of RAM; bounding it keeps peak memory flat however big the
# scene is (outputs are written in whole GeoTIFF tiles, so a small cache costs no re-reads).
os.environ.setdefault("GDAL_CACHEMAX", "32")
# Rasters without georeferencing (PNG, JPEG) are allowed: the jobs say so in plain words (a job warning), so
# rasterio's own NotGeoreferencedWarning would only print a raw library line to the terminal.
warnings.filterwarnings("ignore", message="Dataset has no geotransform")


def _pin_mmap_threshold() -> None:
    """Keep large arrays in mmap'd memory that is returned to the OS when freed.

    glibc raises its mmap threshold after big frees, so tile-sized NumPy buffers move onto the
    heap, which fragments: measured peak RSS then grew with scene width (+70% from 2k² to 16k²).
    A fixed threshold (which also turns the dynamic adjustment off) keeps it flat.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc (e.g. musl): nothing to tune


_pin_mmap_threshold()
