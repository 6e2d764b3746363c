"""Annotation layers in a real QGIS: a new GeoPackage with the task's fields, in the project CRS, editable."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import levir
from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsCoordinateReferenceSystem,
    QgsGeometry,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
    QgsVectorLayerUtils,
    QgsWkbTypes,
)

from rs_peft_qgis.annotation import (
    ANNOTATION_FIELDS,
    LABEL_DEFAULT,
    LABEL_FIELD,
    default_annotation_dir,
    new_annotation_layer,
    save_edits,
    selection_aoi,
)

UTM33 = QgsCoordinateReferenceSystem("EPSG:32633")


def _file(layer: QgsVectorLayer) -> Path:
    return Path(layer.source().split("|")[0])


def _square(x: float, y: float, size: float = 50.0) -> QgsGeometry:
    return QgsGeometry.fromRect(QgsRectangle(x, y, x + size, y + size))


def _cleanup(project, *layers) -> None:
    for layer in layers:
        if layer.isEditable():
            layer.rollBack()
    project.removeAllMapLayers()


def test_change_layer_has_fields_crs_default_and_is_editing(qgis_new_project, tmp_path) -> None:
    # Rasters in EPSG:4326, project in UTM 33N: the labels follow the project, not the rasters.
    before, _, _ = levir("test_2_0000_0512")
    raster = QgsRasterLayer(str(before), "before", "gdal")
    assert raster.crs().authid() == "EPSG:4326"
    qgis_new_project.addMapLayer(raster)
    qgis_new_project.setCrs(UTM33)

    layer = new_annotation_layer("change", qgis_new_project.crs(), tmp_path, project=qgis_new_project)
    try:
        path = _file(layer)
        assert path.suffix == ".gpkg" and path.parent == tmp_path and path.is_file()
        assert layer.isEditable()
        assert layer.wkbType() == QgsWkbTypes.MultiPolygon
        assert layer.crs().authid() == "EPSG:32633"
        assert layer.fields().names()[1:] == ["change", "note"]  # after the GeoPackage fid
        # At the top of the layer tree, above the raster.
        assert qgis_new_project.layerTreeRoot().children()[0].layerId() == layer.id()
        assert isinstance(layer.renderer(), QgsCategorizedSymbolRenderer)

        # A drawn polygon counts as "change" unless edited.
        feat = QgsVectorLayerUtils.createFeature(layer, _square(500000, 4000000))
        assert feat["change"] == 1
        assert layer.addFeature(feat)
        save_edits(layer)
        assert layer.isEditable()  # still editing after saving

        reopened = QgsVectorLayer(str(path), "check", "ogr")
        assert reopened.crs().authid() == "EPSG:32633"
        assert reopened.wkbType() == QgsWkbTypes.MultiPolygon
        (saved,) = list(reopened.getFeatures())
        assert saved["change"] == 1 and saved.geometry().area() == pytest.approx(2500)
        del reopened
    finally:
        _cleanup(qgis_new_project, layer)


@pytest.mark.parametrize("task", ["objects", "landcover"])
def test_other_tasks_get_their_class_fields(qgis_new_project, tmp_path, task) -> None:
    layer = new_annotation_layer(task, UTM33, tmp_path, name="my labels", project=qgis_new_project)
    try:
        assert layer.name() == "my labels"
        assert _file(layer).name.startswith("my_labels_")
        assert layer.fields().names()[1:] == [n for n, _ in ANNOTATION_FIELDS[task]] + ["note"]
        idx = layer.fields().indexOf(LABEL_FIELD[task])
        kinds = {f.name(): f.isNumeric() for f in layer.fields()}
        # Classes are names ("tank", "water"); a polygon drawn as it is, an "object" or "class 1".
        default = {"objects": "'object'", "landcover": "'class 1'"}[task]
        assert layer.defaultValueDefinition(idx).expression() == default and kinds["class"] is False
        assert kinds["note"] is False
    finally:
        _cleanup(qgis_new_project, layer)


def test_second_layer_never_overwrites_the_first(qgis_new_project, tmp_path) -> None:
    first = new_annotation_layer("change", UTM33, tmp_path, project=qgis_new_project)
    first.addFeature(QgsVectorLayerUtils.createFeature(first, _square(0, 0)))
    save_edits(first)
    second = new_annotation_layer("change", UTM33, tmp_path, project=qgis_new_project)
    try:
        assert _file(first) != _file(second)
        assert len(list(tmp_path.glob("*.gpkg"))) == 2
        assert QgsVectorLayer(str(_file(first)), "check", "ogr").featureCount() == 1
        assert second.featureCount() == 0
    finally:
        _cleanup(qgis_new_project, first, second)


def test_bad_task_or_folder_gives_a_plain_error(qgis_new_project, tmp_path) -> None:
    with pytest.raises(ValueError, match="no annotation layer for the task 'roads'"):
        new_annotation_layer("roads", UTM33, tmp_path, project=qgis_new_project)
    blocker = tmp_path / "a_file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot be created"):
        new_annotation_layer("change", UTM33, blocker / "labels", project=qgis_new_project)
    with pytest.raises(ValueError, match="valid coordinate reference system"):
        new_annotation_layer("change", QgsCoordinateReferenceSystem(), tmp_path, project=qgis_new_project)
    assert qgis_new_project.count() == 0


def test_default_folder_follows_the_project(qgis_new_project, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    unsaved = default_annotation_dir(qgis_new_project)
    assert unsaved == tmp_path / "home" / "rs_peft_annotations" and unsaved.is_dir()

    project_file = tmp_path / "work" / "survey.qgz"
    project_file.parent.mkdir()
    assert qgis_new_project.write(str(project_file))
    saved = default_annotation_dir(qgis_new_project)
    assert saved == project_file.parent / "rs_peft_annotations" and saved.is_dir()


def test_selected_polygons_become_the_area_of_interest(qgis_new_project, tmp_path) -> None:
    layer = new_annotation_layer("change", UTM33, tmp_path, project=qgis_new_project)
    try:
        for x in (0, 100, 200):
            assert layer.addFeature(QgsVectorLayerUtils.createFeature(layer, _square(x, 0)))
        wanted = [f.id() for f in layer.getFeatures() if f.geometry().boundingBox().xMinimum() >= 100]
        layer.selectByIds(wanted)
        aoi = QgsVectorLayer(selection_aoi(layer, tmp_path / "work"), "aoi", "ogr")
        assert aoi.isValid() and aoi.featureCount() == 2
        assert aoi.crs().authid() == "EPSG:32633"
        assert aoi.extent().xMinimum() == pytest.approx(100)
        del aoi
        layer.removeSelection()
        with pytest.raises(ValueError, match=r"No polygon of .* is selected"):
            selection_aoi(layer, tmp_path / "work")
    finally:
        _cleanup(qgis_new_project, layer)


def test_every_task_labels_a_field_of_its_layer() -> None:
    # The dock builds fine-tune parameters from this table: the label field must be a field of the layer, an
    # integer one for change (1 / 0), text for objects and land cover, whose classes are names.
    assert set(ANNOTATION_FIELDS) == set(LABEL_FIELD) == set(LABEL_DEFAULT)
    for task, field in LABEL_FIELD.items():
        assert (field, "int" if task == "change" else "string") in ANNOTATION_FIELDS[task]
