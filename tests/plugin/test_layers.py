"""Layers <-> job files: which layers a job reads directly, and exports of the others (real QGIS)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import levir
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsFeature,
    QgsGeometry,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)

from rs_peft_qgis import layers

BEFORE, AFTER, LABEL = levir("test_2_0000_0512")


def test_a_local_geotiff_is_read_in_place() -> None:
    raster = QgsRasterLayer(str(BEFORE), "before", "gdal")
    assert raster.isValid()
    assert layers.file_source(raster) == str(BEFORE)


def test_memory_polygons_are_exported_to_a_geopackage(tmp_path: Path) -> None:
    memory_layer = QgsVectorLayer("Polygon?crs=EPSG:4326&field=change:integer", "drawn", "memory")
    f = QgsFeature(memory_layer.fields())
    f.setGeometry(QgsGeometry.fromRect(QgsRectangle(0, 0, 1, 1)))
    f.setAttributes([1])
    memory_layer.dataProvider().addFeatures([f])
    assert layers.file_source(memory_layer) is None
    path = layers.job_input(memory_layer, tmp_path)
    back = QgsVectorLayer(path, "back", "ogr")
    assert back.isValid() and back.featureCount() == 1
    assert back.crs().authid() == "EPSG:4326" and "change" in back.fields().names()
    del back


def test_a_filtered_layer_is_exported_with_only_its_features(tmp_path: Path) -> None:
    gpkg = tmp_path / "two.gpkg"
    two = QgsVectorLayer("Polygon?crs=EPSG:4326&field=change:integer", "two", "memory")
    feats = []
    for i in range(2):
        f = QgsFeature(two.fields())
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(i, 0, i + 1, 1)))
        f.setAttributes([i])
        feats.append(f)
    two.dataProvider().addFeatures(feats)
    layers.export_vector(two, gpkg)
    filtered_layer = QgsVectorLayer(str(gpkg), "filtered", "ogr")
    assert layers.file_source(filtered_layer) == str(gpkg)
    filtered_layer.setSubsetString('"change" = 1')
    assert layers.file_source(filtered_layer) is None
    out = QgsVectorLayer(layers.job_input(filtered_layer, tmp_path / "work"), "out", "ogr")
    assert out.featureCount() == 1
    del out, filtered_layer


def test_selected_features_become_the_area_of_interest(tmp_path: Path) -> None:
    aoi_layer = QgsVectorLayer("Polygon?crs=EPSG:4326", "aoi", "memory")
    feats = []
    for i in range(3):
        f = QgsFeature(aoi_layer.fields())
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(i, 0, i + 0.5, 1)))
        feats.append(f)
    aoi_layer.dataProvider().addFeatures(feats)
    with pytest.raises(layers.LayerError, match="No feature of 'aoi' is selected"):
        layers.aoi_from_selection(aoi_layer, tmp_path)
    aoi_layer.selectByIds([max(aoi_layer.allFeatureIds())])  # the rightmost square
    out = QgsVectorLayer(layers.aoi_from_selection(aoi_layer, tmp_path), "out", "ogr")
    assert out.featureCount() == 1
    assert out.extent().xMinimum() == pytest.approx(2.0)
    del out


def test_canvas_extent_becomes_a_polygon_in_its_crs(tmp_path: Path) -> None:
    crs = QgsCoordinateReferenceSystem("EPSG:32633")
    out = QgsVectorLayer(layers.aoi_from_extent(QgsRectangle(500000, 0, 501000, 2000), crs, tmp_path), "e", "ogr")
    assert out.crs().authid() == "EPSG:32633"
    assert out.extent().width() == pytest.approx(1000) and out.extent().height() == pytest.approx(2000)
    del out


def test_a_raster_exports_over_an_extent_at_its_own_resolution(tmp_path: Path) -> None:
    raster = QgsRasterLayer(str(BEFORE), "before", "gdal")
    full = raster.extent()
    half = QgsRectangle(full.xMinimum(), full.yMinimum(), full.center().x(), full.yMaximum())
    out = QgsRasterLayer(layers.export_raster(raster, tmp_path / "half.tif", half), "half", "gdal")
    assert out.isValid() and out.bandCount() == 3
    assert (out.width(), out.height()) == (raster.width() // 2, raster.height())
    assert out.crs() == raster.crs()
    del out, raster


def test_a_web_tile_layer_is_rendered_to_a_georeferenced_image(tmp_path: Path, xyz_url: str) -> None:
    """An XYZ layer (served from local files: no network here) has no pixels of its own: it is rendered."""
    xyz = QgsRasterLayer(f"type=xyz&url={xyz_url}&zmin=0&zmax=0", "xyz", "wms")
    assert xyz.isValid(), xyz.error().summary()
    assert layers.file_source(xyz) is None
    with pytest.raises(layers.LayerError, match="no pixel size of its own"):
        layers.export_raster(xyz, tmp_path / "no.tif", QgsRectangle(0, 0, 1e6, 1e6))
    extent = QgsRectangle(-1e6, -1e6, 1e6, 1e6)  # EPSG:3857 metres around (0, 0)
    path = layers.job_input(xyz, tmp_path / "work", extent, resolution=20_000)
    out = QgsRasterLayer(path, "out", "gdal")
    assert out.isValid() and (out.width(), out.height()) == (100, 100)
    assert out.crs().authid() == "EPSG:3857"
    stats = out.dataProvider().bandStatistics(1)
    assert stats.mean == pytest.approx(200, abs=2)  # the tile's red, as QGIS draws it
    del out, xyz


def test_outputs_are_added_styled_in_a_group(tmp_path: Path, qgis_new_project) -> None:
    outputs = [
        {"path": str(LABEL), "kind": "raster", "layer_name": "mask", "style": "change_mask.qml", "key": "mask"},
    ]
    added = layers.add_outputs(outputs, "Detect — test")
    group = QgsProject.instance().layerTreeRoot().findGroup("Detect — test")
    assert group is not None and [t.layer() for t in group.findLayers()] == added
    assert added[0].renderer().type() != "multibandcolor"
    with pytest.raises(layers.LayerError, match="could not be opened"):
        layers.add_outputs([{**outputs[0], "path": str(tmp_path / "gone.tif")}], "x")
    QgsProject.instance().clear()


def test_unsaved_features_of_a_geopackage_layer_export(tmp_path: Path) -> None:
    """New, not yet saved polygons of a GeoPackage layer in edit mode (their fid is 'Autogenerate')."""
    gpkg = tmp_path / "drawn.gpkg"
    seed = QgsVectorLayer("Polygon?crs=EPSG:4326&field=change:integer", "seed", "memory")
    layers.export_vector(seed, gpkg)
    drawn_layer = QgsVectorLayer(str(gpkg), "drawn", "ogr")
    assert "fid" in drawn_layer.fields().names()
    drawn_layer.startEditing()
    f = QgsFeature(drawn_layer.fields())
    f.setGeometry(QgsGeometry.fromRect(QgsRectangle(0, 0, 1, 1)))
    f.setAttribute("change", 1)
    assert drawn_layer.addFeature(f)
    drawn_layer.selectAll()
    out = QgsVectorLayer(layers.export_vector(drawn_layer, tmp_path / "out.gpkg", selected_only=True), "o", "ogr")
    assert out.featureCount() == 1 and next(out.getFeatures())["change"] == 1
    drawn_layer.rollBack()
    del out, drawn_layer
