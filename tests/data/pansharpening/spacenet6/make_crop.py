"""Regenerate the SpaceNet-6 PAN + MS test crop from ../shared/data/pansharpening/spacenet6_solaris (see README.md).

Run from the repository root: .venv/bin/python tests/data/pansharpening/spacenet6/make_crop.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import rasterio
from rasterio.windows import Window

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[4] / "shared" / "data" / "pansharpening" / "spacenet6_solaris"
PAIR = 1  # pan1.tif + ms1.tif: Rotterdam, houses, a park and a road junction
MS_WINDOW = Window(150, 150, 128, 128)  # MS pixels; the PAN window is the same area at twice the resolution
RATIO = 2


def crop(source: Path, window: Window, target: Path) -> None:
    """Copy a window keeping CRS, transform, dtype and nodata (compressed losslessly)."""
    with rasterio.open(source) as src:
        profile = src.profile | {
            "width": int(window.width),
            "height": int(window.height),
            "transform": src.window_transform(window),
            "compress": "deflate",
            "zlevel": 9,
            "predictor": 3 if src.dtypes[0].startswith("float") else 2,
            "tiled": False,
            "blockysize": 16,
        }
        profile.pop("blockxsize", None)
        with rasterio.open(target, "w", **profile) as dst:
            dst.write(src.read(window=window))
            dst.descriptions = src.descriptions


def main() -> None:
    pan_window = Window(
        MS_WINDOW.col_off * RATIO, MS_WINDOW.row_off * RATIO, MS_WINDOW.width * RATIO, MS_WINDOW.height * RATIO
    )
    crop(SOURCE / f"ms{PAIR}.tif", MS_WINDOW, HERE / "ms.tif")
    crop(SOURCE / f"pan{PAIR}.tif", pan_window, HERE / "pan.tif")
    shutil.copyfile(SOURCE / "LICENSE-SOURCE.txt", HERE / "LICENSE-SOURCE.txt")
    for name in ("pan.tif", "ms.tif"):
        with rasterio.open(HERE / name) as ds:
            print(name, ds.count, ds.width, ds.height, ds.dtypes[0], ds.crs, ds.res, (HERE / name).stat().st_size)


if __name__ == "__main__":
    main()
