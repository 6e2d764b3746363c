"""rs-peft-qgis backend: the worker process, jobs, models and the raster engine (never imports qgis)."""

import os

__version__ = "0.1.0"

# GDAL's block cache defaults to 5% of RAM; bounding it keeps peak memory flat however big the
# scene is (outputs are written in whole GeoTIFF tiles, so a small cache costs no re-reads).
os.environ.setdefault("GDAL_CACHEMAX", "32")
