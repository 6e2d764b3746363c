"""Regenerate tests/data from ../shared/data (run once by a developer; the outputs are committed).

LEVIR-CD PNGs carry no georeference; LEVIR_CD_name_coords.json gives each 1024² image's
lon/lat box as [west, north, east, south]. The 256² crops are named <image>_<row>_<col>.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_bounds

HERE = Path(__file__).parent
SHARED = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data")
CD = SHARED / "change_detection"
FULL = ["test_1"]
CROPS = ["test_2_0000_0000", "test_2_0000_0512", "test_7_0256_0512", "test_55_0256_0000", "test_77_0512_0256"]


def write(path: Path, data: np.ndarray, transform, crs: str = "EPSG:4326") -> None:
    profile = dict(
        driver="GTiff",
        width=data.shape[2],
        height=data.shape[1],
        count=data.shape[0],
        dtype="uint8",
        crs=crs,
        transform=transform,
        compress="deflate",
        predictor=2,
    )
    if data.shape[0] == 3:
        profile["photometric"] = "RGB"
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)


def main() -> None:
    coords = json.loads((CD / "levir_cd_bitcd" / "LEVIR_CD_name_coords.json").read_text())
    out = HERE / "levir_cd"
    out.mkdir(exist_ok=True)
    jobs = [(n, CD / "levir_cd_1024_ttp", n, 0, 0, 1024) for n in FULL]
    for c in CROPS:
        parent, row, col = c.rsplit("_", 2)
        jobs.append((c, CD / "levir_cd_bitcd", parent, int(row), int(col), 256))
    for name, folder, parent, row, col, size in jobs:
        west, north, east, south = coords[f"{parent}.png"]
        full_tf = from_bounds(west, south, east, north, 1024, 1024)
        tf = full_tf * rasterio.Affine.translation(col, row)
        for part in ("A", "B", "label"):
            with rasterio.open(folder / part / f"{name}.png") as src:
                data = src.read()
            assert data.shape[1:] == (size, size), (name, data.shape)
            write(out / f"{name}_{part}.tif", data, tf)
    shutil.copyfile(CD / "levir_cd_1024_ttp" / "LICENSE-SOURCE.txt", out / "LICENSE-SOURCE-levir_cd_1024_ttp.txt")
    shutil.copyfile(CD / "levir_cd_bitcd" / "LICENSE-SOURCE.txt", out / "LICENSE-SOURCE-levir_cd_bitcd.txt")
    # SpaceNet-4: the footprint mask was stored without a grid; it gets the image's, though it does not outline the
    # image's buildings (geotiff_labels.geojson does): it is test data for vectorizing masks only.
    src = SHARED / "building_seg" / "spacenet4_solaris"
    sn = HERE / "spacenet4"
    sn.mkdir(exist_ok=True)
    with rasterio.open(src / "sample_geotiff.tif") as img, rasterio.open(src / "sample_fp_mask.tif") as mask:
        write(sn / "fp_mask.tif", mask.read(), img.transform, img.crs)
        # The panchromatic image itself (uint16), for object segmentation against the footprints.
        profile = img.profile | {"compress": "deflate", "predictor": 2, "tiled": False}
        with rasterio.open(sn / "pan.tif", "w", **profile) as out:
            out.write(img.read())
    for f in ("geotiff_labels.geojson", "LICENSE-SOURCE.txt"):
        shutil.copyfile(src / f, sn / f)
    ukis()
    muufl()


# ukis-csmask: reference masks {0 cloud shadow, 1 water, 3 clear land, 4 cloud} -> land-cover classes 1 … 4.
UKIS_CLASSES = {3: 1, 1: 2, 4: 3, 0: 4}
UKIS_NAMES = ("clear", "water", "cloud", "shadow")
# The npz files carry no georeference: the tiles get a made-up 30 m UTM grid, so the GIS tests have one.
UKIS_GRIDS = {"sentinel2": ("EPSG:32633", 500_000.0, 5_300_000.0), "landsat7": ("EPSG:32632", 600_000.0, 5_200_000.0)}


def ukis() -> None:
    """256² crops of the ukis-csmask Sentinel-2 and Landsat-7 samples (6 bands: blue, green, red, NIR, SWIR 1,
    SWIR 2, float32 reflectance) and their class rasters; the Sentinel-2 tile carries its band wavelengths in
    GDAL's IMAGERY metadata, the Landsat-7 tile none (tests name its sensor)."""
    from backend.io.wavelengths import SENSORS

    src, out = SHARED / "ms_segmentation" / "ukis_csmask_cloud", HERE / "ukis"
    out.mkdir(exist_ok=True)
    for sensor, (crs, west, north) in UKIS_GRIDS.items():
        data = np.load(src / f"{sensor}.npz")
        img = data["img"][:256, :256].transpose(2, 0, 1).astype(np.float32)
        msk = data["msk"][:256, :256, 0]
        classes = np.zeros_like(msk)
        for value, k in UKIS_CLASSES.items():
            classes[msk == value] = k
        tf = rasterio.Affine(30.0, 0, west, 0, -30.0, north)
        base = dict(driver="GTiff", width=256, height=256, crs=crs, transform=tf, compress="deflate")
        with rasterio.open(out / f"{sensor}.tif", "w", count=6, dtype="float32", predictor=3, **base) as ds:
            ds.write(img)
            if sensor == "sentinel2":
                for b, wl in enumerate(SENSORS["sentinel2_6"][1], 1):
                    ds.update_tags(b, ns="IMAGERY", CENTRAL_WAVELENGTH_UM=f"{wl / 1000:.4f}")
        with rasterio.open(out / f"{sensor}_classes.tif", "w", count=1, dtype="uint8", predictor=2, **base) as ds:
            ds.write(classes[None])
    shutil.copyfile(src / "LICENSE-SOURCE.txt", out / "LICENSE-SOURCE.txt")
    ukis_labels(out)


def ukis_labels(out: Path, min_pixels: int = 20) -> None:
    """What an analyst would draw on the Sentinel-2 tile's left half: its reference classes as named polygons
    (regions of at least `min_pixels`), for the desktop walkthrough."""
    import fiona
    from rasterio.features import shapes, sieve

    with rasterio.open(out / "sentinel2_classes.tif") as ds:
        classes, transform, crs = ds.read(1), ds.transform, ds.crs.to_string()
    left = sieve(classes[:, :128], min_pixels)
    schema = {"geometry": "Polygon", "properties": {"class": "str"}}
    with fiona.open(out / "sentinel2_labels.gpkg", "w", driver="GPKG", crs=crs, schema=schema) as dst:
        for geom, value in shapes(left, mask=left > 0, transform=transform):
            dst.write({"geometry": geom, "properties": {"class": UKIS_NAMES[int(value) - 1]}})


# MUUFL Gulfport CASI subsets: no georeference either; a made-up 1 m grid in UTM 16N (Gulfport, Mississippi).
MUUFL_GRIDS = {"class_demo": (300_000.0, 3_360_000.0), "scene": (300_100.0, 3_360_000.0)}


def muufl() -> None:
    """Two MUUFL Gulfport subsets (72 bands, 368-1043 nm, float32 reflectance) with their band wavelengths in
    GDAL's IMAGERY metadata: `class_demo.tif` (20 x 31) whose 5 classes' training spectra are exact pixels of
    it (found by matching), written as `class_demo_classes.tif` (0 = unlabelled, 1 … 5) and as named 1-pixel
    polygons `class_demo_labels.gpkg`; and `scene.tif` (88 x 51), unlabelled, to adapt to, its
    flight-line edge masked (GDAL mask band)."""
    import fiona
    from scipy.io import loadmat

    src, out = SHARED / "hyperspectral" / "gatorsense_muufl_subsets", HERE / "muufl"
    out.mkdir(exist_ok=True)
    demo = loadmat(src / "an_hsi_img_for_class_demo.mat")
    scene = loadmat(src / "an_hsi_image_sub_for_demo.mat")
    wavelengths = demo["wavlength"].ravel()  # (sic) the file's name for it
    img = demo["hsi_sub"]
    pixels = img.reshape(-1, img.shape[2])
    classes = np.zeros(img.shape[:2], np.uint8)
    names = []
    for k, entry in enumerate(demo["train_data"].ravel(), 1):
        names.append(str(entry["name"][0]))
        for spectrum in entry["Spectra"].T:
            at = np.flatnonzero(np.all(pixels == spectrum, axis=1))
            assert len(at) >= 1, names[-1]
            classes.flat[at] = k
    for name, data in (("class_demo", img), ("scene", scene["hsi_img_sub"])):
        west, north = MUUFL_GRIDS[name]
        tf = rasterio.Affine(1.0, 0, west, 0, -1.0, north)
        h, w, c = data.shape
        base = dict(driver="GTiff", width=w, height=h, crs="EPSG:32616", transform=tf, compress="deflate")
        with rasterio.open(out / f"{name}.tif", "w", count=c, dtype="float32", predictor=3, **base) as ds:
            ds.write(data.transpose(2, 0, 1).astype(np.float32))
            for b, wl in enumerate(wavelengths, 1):
                ds.update_tags(b, ns="IMAGERY", CENTRAL_WAVELENGTH_UM=f"{wl / 1000:.5f}")
            if name == "scene":  # mask_sub marks where the flight line has data (noise beyond its edge)
                ds.write_mask(scene["mask_sub"].astype(np.uint8) * 255)
        if name == "class_demo":
            with rasterio.open(out / "class_demo_classes.tif", "w", count=1, dtype="uint8", **base) as ds:
                ds.write(classes[None])
            schema = {"geometry": "Polygon", "properties": {"class": "str"}}
            with fiona.open(out / "class_demo_labels.gpkg", "w", driver="GPKG", crs="EPSG:32616", schema=schema) as dst:
                for r, col in np.argwhere(classes > 0):
                    x0, y0 = tf * (col, r)
                    ring = [(x0, y0), (x0 + 1, y0), (x0 + 1, y0 - 1), (x0, y0 - 1), (x0, y0)]
                    dst.write(
                        {
                            "geometry": {"type": "Polygon", "coordinates": [ring]},
                            "properties": {"class": names[classes[r, col] - 1]},
                        }
                    )
    shutil.copyfile(src / "LICENSE-SOURCE.txt", out / "LICENSE-SOURCE.txt")


if __name__ == "__main__":
    main()
