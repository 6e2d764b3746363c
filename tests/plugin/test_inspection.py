"""Change inspection on real change polygons made by the real worker (change.cva on a LEVIR-CD pair):
order, verdicts kept in the file, the review panel on a real map canvas, and exported labels that the
real fine-tune accepts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import BACKEND_PYTHON, FAST_FINETUNE, ROOT, levir
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsGeometry,
    QgsProject,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtTest import QTest

from rs_peft_qgis.inspection.inspector import ChangeInspector
from rs_peft_qgis.inspection.verdicts import NOT_REVIEWED, VERDICT_FIELD, export_verdicts, ordered_changes, set_verdict
from rs_peft_qgis.worker_client import WorkerClient

PAIR = "test_2_0000_0512"


@pytest.fixture(scope="module")
def worker():
    client = WorkerClient(BACKEND_PYTHON, ROOT)
    client.start()
    yield client
    client.shutdown()


@pytest.fixture(scope="module")
def cva_polygons(worker, tmp_path_factory) -> Path:
    """The change polygons (area_m2, confidence) of the classical CVA job on a real image pair."""
    before, after, _ = levir(PAIR)
    out = tmp_path_factory.mktemp("cva")
    handle = worker.run_job("change.cva", {"before": str(before), "after": str(after), "out_dir": str(out)}, 300)
    assert handle.succeeded, handle.outcome
    (polygons,) = [o["path"] for o in handle.outcome["outputs"] if o["key"] == "polygons"]
    return Path(polygons)


@pytest.fixture
def changes_layer(cva_polygons, tmp_path, qgis_new_project):
    """A private copy of the change polygons (verdicts are written into the file)."""
    path = tmp_path / "changes.gpkg"
    shutil.copy(cva_polygons, path)
    layer = QgsVectorLayer(str(path), "changes", "ogr")
    assert layer.isValid() and layer.featureCount() > 20
    yield layer  # pytest-qgis deletes it after the test (the fixture's name holds "layer")
    QgsProject.instance().removeAllMapLayers()


def _reopen(layer: QgsVectorLayer) -> dict[int, object]:
    """fid -> verdict as stored in the file, read by a fresh layer."""
    fresh = QgsVectorLayer(layer.source(), "fresh", "ogr")
    values = {f.id(): f[VERDICT_FIELD] for f in fresh.getFeatures()}
    del fresh
    return values


def test_changes_are_ordered_by_area_then_confidence(changes_layer) -> None:
    fids = ordered_changes(changes_layer)
    feats = {f.id(): f for f in changes_layer.getFeatures()}
    assert sorted(fids) == sorted(feats)
    areas = [feats[i]["area_m2"] for i in fids]
    assert areas == sorted(areas, reverse=True)
    assert areas[0] > 10 * areas[-1]


def test_equal_areas_put_the_most_confident_first(qgis_new_project) -> None:
    layer = QgsVectorLayer("Polygon?crs=EPSG:32633&field=area_m2:double&field=confidence:double", "changes", "memory")
    rows = [(100.0, 0.2), (250.0, 0.1), (100.0, 0.9), (100.0, None), (250.0, 0.7)]
    feats = []
    for area, conf in rows:
        f = QgsFeature(layer.fields())
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(0, 0, 10, 10)))
        f.setAttributes([area, conf])
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    got = [(layer.getFeature(i)["area_m2"], layer.getFeature(i)["confidence"]) for i in ordered_changes(layer)]
    assert got[:4] == [(250.0, 0.7), (250.0, 0.1), (100.0, 0.9), (100.0, 0.2)]
    assert got[4][0] == 100.0  # no confidence: last among equals


def test_any_polygon_layer_falls_back_to_the_geometry_area(qgis_new_project) -> None:
    layer = QgsVectorLayer("Polygon?crs=EPSG:32633&field=class:integer", "objects", "memory")
    feats = []
    for size in (10, 40, 20):
        f = QgsFeature(layer.fields())
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(500_000, 4_000_000, 500_000 + size, 4_000_000 + size)))
        f.setAttributes([1])
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    fids = ordered_changes(layer)
    sizes = [layer.getFeature(i).geometry().area() for i in fids]
    assert sizes == [1600, 400, 100]
    # Verdicts work on a layer without any result fields too.
    set_verdict(layer, fids[0], "accepted")
    assert layer.getFeature(fids[0])[VERDICT_FIELD] == "accepted"


def test_object_verdicts_export_their_class_names_or_background(qgis_new_project, tmp_path) -> None:
    """Polygons of objects.segment carry `class_name`: accepted ones keep it in the labels' `class` field, rejected
    ones become "background", which objects.finetune reads as class 0 (a known non-object)."""
    layer = QgsVectorLayer("Polygon?crs=EPSG:32633&field=class:integer&field=class_name:string", "objects", "memory")
    feats = []
    for i, name in enumerate(("tank", "ship", "tank")):
        f = QgsFeature(layer.fields())
        f.setGeometry(QgsGeometry.fromRect(QgsRectangle(500_000 + 100 * i, 4_000_000, 500_050 + 100 * i, 4_000_050)))
        f.setAttributes([1 + (name == "ship"), name])
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    a, b, c = ordered_changes(layer)
    set_verdict(layer, a, "accepted")
    set_verdict(layer, b, "accepted")
    set_verdict(layer, c, "rejected")
    assert export_verdicts(layer, tmp_path / "objects.gpkg") == (2, 1)
    labels = QgsVectorLayer(str(tmp_path / "objects.gpkg"), "labels", "ogr")
    got = sorted((f["class"], f["change"]) for f in labels.getFeatures())
    names = sorted(layer.getFeature(fid)["class_name"] for fid in (a, b))
    assert got == sorted([("background", 0), *((n, 1) for n in names)])
    # Land cover: a rejected polygon's right class is unknown, so only the accepted ones become labels.
    assert export_verdicts(layer, tmp_path / "landcover.gpkg", keep_rejected=False) == (2, 1)
    labels = QgsVectorLayer(str(tmp_path / "landcover.gpkg"), "labels", "ogr")
    assert sorted(f["class"] for f in labels.getFeatures()) == names


def test_verdicts_are_written_to_the_file(changes_layer) -> None:
    a, b, c = ordered_changes(changes_layer)[:3]
    assert changes_layer.fields().indexOf(VERDICT_FIELD) < 0
    set_verdict(changes_layer, a, "accepted")
    set_verdict(changes_layer, b, "rejected")
    set_verdict(changes_layer, c, "accepted")
    set_verdict(changes_layer, c, None)  # back to "not reviewed"
    stored = _reopen(changes_layer)
    assert stored[a] == "accepted" and stored[b] == "rejected"
    assert stored[c] is None or stored[c].isNull()
    assert sum(v in ("accepted", "rejected") for v in stored.values()) == 2
    with pytest.raises(ValueError, match="not 'maybe'"):
        set_verdict(changes_layer, a, "maybe")

    # In edit mode the verdict goes to the edit buffer: in the file only once the edits are saved.
    changes_layer.startEditing()
    set_verdict(changes_layer, c, "rejected")
    assert changes_layer.getFeature(c)[VERDICT_FIELD] == "rejected"
    assert _reopen(changes_layer)[c] != "rejected"
    assert changes_layer.commitChanges()
    assert _reopen(changes_layer)[c] == "rejected"


def test_panel_zooms_to_each_change_and_steps_through_verdicts(changes_layer, qgis_iface) -> None:
    canvas = qgis_iface.mapCanvas()
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))  # the layer is EPSG:4326
    canvas.setExtent(QgsRectangle(0, 0, 1000, 1000))
    panel = ChangeInspector(qgis_iface)
    panel.set_layer(changes_layer)
    order = ordered_changes(changes_layer)
    total = len(order)
    assert panel.table.rowCount() == total
    assert panel.counter.text() == f"0 of {total} reviewed"
    assert not panel.accept_button.isEnabled()  # nothing selected yet

    panel.next_button.click()  # starts at the biggest change
    assert panel.current_row == 0 and changes_layer.selectedFeatureIds() == [order[0]]
    to_map = QgsCoordinateTransform(changes_layer.crs(), canvas.mapSettings().destinationCrs(), QgsProject.instance())
    box = to_map.transformBoundingBox(changes_layer.getFeature(order[0]).geometry().boundingBox())
    extent = canvas.extent()
    assert extent.contains(box)
    assert extent.width() < 20 * max(box.width(), box.height())  # zoomed in on it, not the whole layer

    panel.accept_button.click()
    assert panel.current_row == 1  # moved on to the next change
    panel.reject_button.click()
    assert panel.current_row == 2
    assert panel.counter.text() == f"2 of {total} reviewed"
    assert panel.table.item(0, 3).text() == "Accepted" and panel.table.item(1, 3).text() == "Rejected"
    assert panel.table.item(0, 0).background().color() != panel.table.item(1, 0).background().color()
    assert panel.table.item(2, 0).background().style() == Qt.NoBrush  # unreviewed rows keep the normal look

    panel.prev_button.click()
    assert panel.current_row == 1
    panel.accept_button.click()  # change of mind; then on to the first unreviewed one
    assert panel.current_row == 2
    panel.select_row(total - 1)
    box = to_map.transformBoundingBox(changes_layer.getFeature(order[-1]).geometry().boundingBox())
    assert canvas.extent().contains(box)

    # The keyboard: R rejects the selected change while the list has the focus.
    panel.show()
    panel.activateWindow()
    assert QTest.qWaitForWindowActive(panel)
    panel.table.setFocus()
    QTest.keyClick(panel.table, Qt.Key_R)
    stored = _reopen(changes_layer)
    assert stored[order[0]] == "accepted" and stored[order[1]] == "accepted"
    assert stored[order[-1]] == "rejected"
    assert panel.counter.text() == f"3 of {total} reviewed"
    panel.hide()

    # Selecting a change on the map makes it the current row, without moving the map.
    extent = canvas.extent()
    changes_layer.selectByIds([order[5]])
    assert panel.current_row == 5 and canvas.extent() == extent

    # A fresh panel on the same layer shows the verdicts already given.
    again = ChangeInspector(qgis_iface)
    again.set_layer(changes_layer)
    assert again.counter.text() == f"3 of {total} reviewed"
    again.next_button.click()
    assert again.current_row == 2  # the first change not reviewed yet
    again.set_layer(None)
    panel.set_layer(None)
    assert panel.table.rowCount() == 0


def test_exported_verdicts_are_labels_the_fine_tune_accepts(changes_layer, qgis_iface, worker, tmp_path) -> None:
    order = ordered_changes(changes_layer)
    for fid in order[:4]:
        set_verdict(changes_layer, fid, "accepted")
    for fid in order[4:7]:
        set_verdict(changes_layer, fid, "rejected")

    qgis_iface.messageBar().clear_messages()
    panel = ChangeInspector(qgis_iface)
    panel.set_layer(changes_layer)
    assert panel.export_button.isEnabled()
    labels_layer = panel.export_to(tmp_path / "round1_labels")  # .gpkg is added
    path = tmp_path / "round1_labels.gpkg"
    assert labels_layer is not None and path.is_file()
    assert labels_layer.id() in QgsProject.instance().mapLayers()
    (message,) = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Success)
    assert "4 accepted and 3 rejected" in message

    labels = QgsVectorLayer(str(path), "labels", "ogr")
    assert labels.crs() == changes_layer.crs()
    assert sorted(f["change"] for f in labels.getFeatures()) == [0, 0, 0, 1, 1, 1, 1]
    accepted_area = sum(f.geometry().area() for f in labels.getFeatures() if f["change"] == 1)
    expected_area = sum(changes_layer.getFeature(i).geometry().area() for i in order[:4])
    assert accepted_area == pytest.approx(expected_area)
    del labels
    assert export_verdicts(changes_layer, tmp_path / "again.gpkg") == (4, 3)

    # The real fine-tune reads them as labels (field "change") on the pair the changes came from.
    before, after, _ = levir(PAIR)
    handle = worker.run_job(
        "change.finetune",
        {
            "before": str(before),
            "after": str(after),
            "labels": str(path),
            "label_field": "change",
            "adapter_name": "inspection-round-1",
            "overwrite": True,
            **FAST_FINETUNE,
        },
        timeout=300,
    )
    assert handle.succeeded, handle.outcome
    panel.set_layer(None)


def test_export_with_nothing_reviewed_says_so(changes_layer, qgis_iface, tmp_path) -> None:
    with pytest.raises(ValueError, match="Nothing has been reviewed yet"):
        export_verdicts(changes_layer, tmp_path / "none.gpkg")
    # The verdict field exists but every verdict was taken back: still nothing to export.
    fid = ordered_changes(changes_layer)[0]
    set_verdict(changes_layer, fid, "accepted")
    set_verdict(changes_layer, fid, None)
    with pytest.raises(ValueError, match="Nothing has been reviewed yet"):
        export_verdicts(changes_layer, tmp_path / "none.gpkg")
    assert not (tmp_path / "none.gpkg").exists()

    qgis_iface.messageBar().clear_messages()
    panel = ChangeInspector(qgis_iface)
    panel.set_layer(changes_layer)
    assert not panel.export_button.isEnabled()
    assert panel.export_to(tmp_path / "none.gpkg") is None
    assert qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning) == [f"Review:{NOT_REVIEWED}"]
    panel.set_layer(None)
