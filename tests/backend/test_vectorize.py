"""Vectorize <-> rasterize on real SpaceNet-4 building footprints."""

from __future__ import annotations

import fiona
import numpy as np
import pytest
import rasterio
import shapely.geometry
from conftest import DATA
from scipy import ndimage

from backend.io.raster import Grid
from backend.io.rasterize import IGNORE, rasterize_labels, read_polygons
from backend.io.vectorize import vectorize
from backend.protocol import JobError

SN4 = DATA / "spacenet4"


@pytest.fixture(scope="module")
def footprints() -> tuple[np.ndarray, Grid]:
    with rasterio.open(SN4 / "fp_mask.tif") as ds:
        return (ds.read(1) > 0).astype(np.uint8), Grid.of(ds)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


def test_rasterized_footprints_cover_their_geometric_area(footprints) -> None:
    _, grid = footprints
    labels = read_polygons(SN4 / "geotiff_labels.geojson", grid.crs)
    burned, sub = rasterize_labels(labels, grid)
    assert sub == grid
    area_px = sum(shapely.geometry.shape(g).area for g in labels.geoms) / 0.25  # 0.5 m pixels
    assert (burned > 0).sum() == pytest.approx(area_px, rel=0.02)


def test_footprints_round_trip_through_polygons(footprints, tmp_path) -> None:
    _, grid = footprints
    burned, _ = rasterize_labels(read_polygons(SN4 / "geotiff_labels.geojson", grid.crs), grid)
    profile = dict(
        driver="GTiff",
        width=grid.width,
        height=grid.height,
        count=1,
        dtype="uint8",
        crs=grid.crs,
        transform=grid.transform,
    )
    with rasterio.open(tmp_path / "burned.tif", "w", **profile) as ds:
        ds.write(burned, 1)
    components = ndimage.label(burned > 0)[1]  # 4-connected, as polygons are traced
    assert vectorize(tmp_path / "burned.tif", tmp_path / "fp.gpkg", layer="fp", block=128) == components
    back, _ = rasterize_labels(read_polygons(tmp_path / "fp.gpkg", grid.crs), grid)
    assert iou(back > 0, burned > 0) >= 0.95


@pytest.mark.parametrize("block", [64, 256, 1024])
def test_vectorize_rasterize_round_trip(footprints, tmp_path, block: int) -> None:
    mask, grid = footprints
    out = tmp_path / "fp.gpkg"
    n = vectorize(SN4 / "fp_mask.tif", out, layer="buildings", block=block, class_names={255: "building"})
    assert n > 20
    with fiona.open(out) as src:
        assert src.crs.to_epsg() == 32616
        feats = list(src)
    areas = [f.properties["area_m2"] for f in feats]
    # 0.5 m pixels: each polygon's area is its pixel count x 0.25 m².
    assert sum(areas) == pytest.approx((mask > 0).sum() * 0.25, rel=1e-6)
    assert {f.properties["class_name"] for f in feats} == {"building"}
    back, _ = rasterize_labels(read_polygons(out, grid.crs), grid)
    assert iou(back > 0, mask > 0) >= 0.95
    assert iou(back > 0, mask > 0) == pytest.approx(1.0)  # exact pixel edges: lossless


def test_polygons_crossing_block_edges_are_merged(footprints, tmp_path) -> None:
    whole = vectorize(SN4 / "fp_mask.tif", tmp_path / "a.gpkg", layer="b", block=4096)
    blocks = vectorize(SN4 / "fp_mask.tif", tmp_path / "b.gpkg", layer="b", block=50)
    assert whole == blocks
    with fiona.open(tmp_path / "a.gpkg") as a, fiona.open(tmp_path / "b.gpkg") as b:
        areas_a = sorted(round(f.properties["area_m2"], 3) for f in a)
        areas_b = sorted(round(f.properties["area_m2"], 3) for f in b)
    assert areas_a == areas_b


def test_confidence_is_the_mean_over_each_polygon(tmp_path) -> None:
    cls = np.zeros((100, 100), np.uint8)
    cls[10:20, 10:30] = 1
    cls[50:90, 60:70] = 2
    conf = np.zeros((100, 100), np.float32)
    conf[10:20, 10:30] = np.linspace(0, 1, 20)[None]
    conf[50:90, 60:70] = 0.25
    profile = dict(
        driver="GTiff",
        width=100,
        height=100,
        count=1,
        crs="EPSG:32633",
        transform=rasterio.transform.from_origin(500000, 6000000, 2, 2),
    )
    with rasterio.open(tmp_path / "c.tif", "w", dtype="uint8", **profile) as ds:
        ds.write(cls, 1)
    with rasterio.open(tmp_path / "p.tif", "w", dtype="float32", **profile) as ds:
        ds.write(conf, 1)
    vectorize(tmp_path / "c.tif", tmp_path / "o.gpkg", "x", conf_path=tmp_path / "p.tif", block=32)
    with fiona.open(tmp_path / "o.gpkg") as src:
        got = {f.properties["class"]: (f.properties["area_m2"], f.properties["confidence"]) for f in src}
    assert got[1] == pytest.approx((200 * 4.0, 0.5))
    assert got[2] == pytest.approx((400 * 4.0, 0.25))


def test_rasterize_inside_an_aoi_marks_the_rest_ignore(footprints, tmp_path) -> None:
    _, grid = footprints
    labels = read_polygons(SN4 / "geotiff_labels.geojson", grid.crs)
    left, bottom, right, top = grid.bounds
    mid_x, mid_y = (left + right) / 2, (bottom + top) / 2
    aoi_geom = {
        "type": "Polygon",
        "coordinates": [[(left, mid_y), (mid_x, mid_y), (mid_x, top), (left, top), (left, mid_y)]],
    }
    from backend.io.rasterize import Polygons

    burned, sub = rasterize_labels(labels, grid, aoi=Polygons([aoi_geom], [1]))
    full, _ = rasterize_labels(labels, grid)
    assert (sub.width, sub.height) == (450, 450)
    assert not (burned == IGNORE).any()  # the AOI is exactly its bounding box here
    assert np.array_equal(burned, full[:450, :450])
    tri = {"type": "Polygon", "coordinates": [[(left, mid_y), (mid_x, top), (left, top), (left, mid_y)]]}
    burned, _ = rasterize_labels(labels, grid, aoi=Polygons([tri], [1]))
    assert (burned == IGNORE).sum() == pytest.approx(450 * 450 / 2, rel=0.02)


def test_labels_outside_the_aoi_and_empty_layers_are_clear_errors(footprints, tmp_path) -> None:
    _, grid = footprints
    labels = read_polygons(SN4 / "geotiff_labels.geojson", grid.crs)
    from backend.io.rasterize import Polygons

    left, bottom, _, _ = grid.bounds
    far = {
        "type": "Polygon",
        "coordinates": [
            [
                (left - 900, bottom - 900),
                (left - 800, bottom - 900),
                (left - 800, bottom - 800),
                (left - 900, bottom - 900),
            ]
        ],
    }
    with pytest.raises(JobError, match="inside the area of interest"):
        rasterize_labels(labels, grid, aoi=Polygons([far], [1]))
    schema = {"geometry": "Polygon", "properties": {"class": "int"}}
    with fiona.open(tmp_path / "empty.gpkg", "w", driver="GPKG", schema=schema, crs="EPSG:32616"):
        pass
    with pytest.raises(JobError, match="no polygons"):
        read_polygons(tmp_path / "empty.gpkg", grid.crs)
    with pytest.raises(JobError, match="no field named 'cls'"):
        read_polygons(SN4 / "geotiff_labels.geojson", grid.crs, class_field="cls")
