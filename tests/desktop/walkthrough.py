"""Run by `qgis --code` in a real QGIS window under Xvfb (make test-desktop / make screenshots).

The analyst's round trip through the packaged plugin, driven through the panel's own widgets:
detect (CVA) -> inspect and judge the largest changes -> compare before/after with the swipe ->
annotate -> fine-tune on a selected training area -> detect again with the new adapter; then objects:
outline buildings on a SpaceNet-4 scene -> fine-tune WEFT -> segment the scene -> review the objects; then land
cover: adapt SpectralX to a Landsat-7 scene -> fine-tune on class polygons of a Sentinel-2 scene -> map Landsat-7.
A screenshot of the whole window is saved after each step (WALK_OUT/NN_name.png) and the checks
go to WALK_OUT/walkthrough.json, which the Makefile asserts on.

By default (make test-desktop) the fine-tune uses the tiny TinyViT encoder with random frozen weights and an
empty model cache: fast and self-contained, it shows the workflow, not real accuracy. With WALK_APPLY_ADAPTER
set (make screenshots) the fine-tune runs briefly on the real MobileSAM encoder that set-up installs, and
step 6 detects with that adapter instead: the one `make demo` trained on five other labelled LEVIR-CD pairs,
so that screenshot shows what FILF really finds on the held-out pair; the objects step then fine-tunes WEFT on
the real encoder for 40 steps, so its screenshot shows buildings that WEFT really found.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from qgis.core import (
    QgsFeature,
    QgsFillSymbol,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QApplication, QDockWidget
from qgis.utils import iface, plugins

OUT = Path(os.environ["WALK_OUT"])
DATA = Path(os.environ["WALK_DATA"])  # tests/data/levir_cd
OUT.mkdir(parents=True, exist_ok=True)
APPLY_ADAPTER = os.environ.get("WALK_APPLY_ADAPTER", "walkthrough")
REAL = APPLY_ADAPTER != "walkthrough"
FAST = {  # the tiny encoder, a few steps: the workflow in about a minute on 2 CPU cores
    "backbone": "tiny_vit_tiny",
    "allow_random_backbone": True,
    "epochs": 3,
    "steps_per_epoch": 4,
    "batch_size": 2,
    "patch_size": 128,
}
OBJECTS = {k: v for k, v in FAST.items() if k != "backbone"} | {"backbone": "vit_tiny", "patch_size": 128}
if REAL:  # WEFT on the real encoder, trained long enough to find buildings: about six CPU minutes
    OBJECTS = {
        "backbone": "mobile_sam",
        "allow_random_backbone": False,
        "epochs": 4,
        "steps_per_epoch": 10,
        "batch_size": 4,
        "patch_size": 256,
    }
if REAL:  # the real encoder (refused if its weights are missing), still a short run: about two CPU minutes
    FAST = {
        "backbone": "mobile_sam",
        "allow_random_backbone": False,
        "epochs": 3,
        "steps_per_epoch": 4,
        "batch_size": 2,
        "patch_size": 256,
    }
# SpectralX on the Scale-MAE miniature (random frozen weights: the ViT-L's checkpoint is not installed by set-up).
LANDCOVER = {"backbone": "scalemae_tiny", "allow_random_backbone": True, "epochs": 2, "steps_per_epoch": 4}
LANDCOVER |= {"batch_size": 2}
if REAL:  # long enough on 2 CPU cores (about three minutes) for the map to show the clouds and their shadows
    LANDCOVER |= {"epochs": 6, "steps_per_epoch": 10, "batch_size": 4}
result: dict = {"steps": [], "errors": []}


def shot(name: str) -> None:
    QApplication.processEvents()
    iface.mapCanvas().refreshAllLayers()
    path = OUT / f"{name}.png"
    iface.mainWindow().grab().save(str(path))
    result["steps"].append(name)


def wait_job(dock) -> Iterator[Callable[[], bool]]:
    yield lambda: dock.runner.current_task is None


def run_job(dock) -> Iterator[Callable[[], bool]]:
    """Run the Run tab's job as it is filled in and wait until it has finished."""
    assert dock.runner.run() is not None, dock.run_tab.message.text()
    yield from wait_job(dock)
    assert dock.runner.last_outcome.get("status") == "finished", dock.runner.last_outcome


def wait_render() -> Iterator[Callable[[], bool]]:
    canvas = iface.mapCanvas()
    canvas.refresh()
    yield lambda: not canvas.isDrawing()


def layer_facts(layers: list) -> list[dict]:
    return [
        {"name": x.name(), "crs": x.crs().authid(), "extent": [round(v, 7) for v in x.extent().toRectF().getCoords()]}
        for x in layers
    ]


def steps() -> Iterator[Callable[[], bool]]:
    plugin = plugins["rs_peft_qgis"]
    dock = plugin.dock
    result["loaded"] = True
    result["menu"] = [a.text() for a in iface.rasterMenu().actions()]
    project = QgsProject.instance()
    iface.mainWindow().setGeometry(0, 0, 1600, 1000)  # no window manager under Xvfb: maximize is a no-op
    before = QgsRasterLayer(str(DATA / "test_1_A.tif"), "before (LEVIR-CD test_1)", "gdal")
    after = QgsRasterLayer(str(DATA / "test_1_B.tif"), "after (LEVIR-CD test_1)", "gdal")
    reference = QgsRasterLayer(str(DATA / "test_1_label.tif"), "reference changes", "gdal")
    project.addMapLayers([reference, before, after])
    project.layerTreeRoot().findLayer(reference.id()).setItemVisibilityChecked(False)
    iface.mapCanvas().setExtent(before.extent())
    dock.show()
    dock.raise_()
    docks = iface.mainWindow().findChildren(QDockWidget)
    result["dock_visible"] = any(d.objectName() == "RsPeftDock" and d.isVisible() for d in docks)

    # 1. Detect with change-vector analysis (no training).
    dock.run_tab.set_job("change.cva")
    dock.run_tab.form.set_value("before", before)
    dock.run_tab.form.set_value("after", after)
    dock.run_tab.form.set_value("min_area_m2", 20.0)
    dock.run_tab.form.set_value("out_dir", str(OUT / "results"))
    yield from run_job(dock)
    result["detect"] = layer_facts(dock.runner.last_layers)
    result["before"] = layer_facts([before])[0]
    dock.tabs.setCurrentIndex(0)
    yield from wait_render()
    shot("01_detect")

    # 2. Inspect: step through the largest changes; the reference mask plays the analyst's eye.
    inspector = dock.inspect_tab.inspector
    polygons = inspector.layer
    result["changes_listed"] = inspector.table.rowCount()
    dock.tabs.setCurrentIndex(1)
    inspector.select_row(0)
    for _ in range(8):
        fid = inspector._rows[inspector.current_row][0]
        centre = polygons.getFeature(fid).geometry().pointOnSurface().asPoint()
        value, ok = reference.dataProvider().sample(QgsPointXY(centre), 1)
        inspector.judge("accepted" if ok and value > 0 else "rejected")
    result["reviewed"] = inspector.reviewed_count()
    yield from wait_render()
    shot("02_inspect")

    # 3. Before/after: the swipe shows "after" left of the handle, "before" right of it.
    iface.mapCanvas().setExtent(before.extent())
    dock.inspect_tab.compare.set_layers(before, after)
    dock.inspect_tab.compare.swipe_button.setChecked(True)
    yield from wait_render()
    tool = dock.inspect_tab.compare.tool
    yield lambda: not tool.rendering
    tool.set_position(iface.mapCanvas().width() // 2)
    shot("03_swipe")
    dock.inspect_tab.compare.stop_swipe()

    # 4. Export the verdicts as labels, then annotate: a new layer, two drawn polygons.
    labels = inspector.export_to(OUT / "results" / "reviewed_labels.gpkg")
    result["exported_labels"] = labels.featureCount() if labels else 0
    dock.tabs.setCurrentIndex(2)
    annotation = dock.annotate_tab.new_annotation_layer()
    result["annotation"] = {
        "fields": annotation.fields().names(),
        "crs": annotation.crs().authid(),
        "editing": annotation.isEditable(),
    }
    for feat in list(labels.getFeatures())[:6]:  # what the analyst would trace over the imagery
        f = QgsFeature(annotation.fields())
        f.setGeometry(QgsGeometry(feat.geometry()))
        f.setAttribute("change", feat["change"])
        annotation.addFeature(f)
    iface.mapCanvas().refresh()
    yield from wait_render()
    shot("04_annotate")

    # 5. Fine-tune on a selected training area (the whole scene here) with the drawn labels.
    area = QgsVectorLayer("Polygon?crs=EPSG:4326", "training area", "memory")
    f = QgsFeature(area.fields())
    e = before.extent()
    f.setGeometry(QgsGeometry.fromRect(QgsRectangle(e)))
    area.dataProvider().addFeatures([f])
    area.renderer().setSymbol(
        QgsFillSymbol.createSimple({"color": "0,0,0,0", "outline_color": "255,170,0", "outline_width": "1"})
    )
    project.addMapLayer(area)
    area.selectAll()
    dock.annotate_tab.labels_combo.setLayer(annotation)
    dock.annotate_tab.area_combo.setLayer(area)
    ft = dock.run_tab.form_for("change.finetune")
    for key, value in FAST.items():
        ft.set_value(key, value)
    ft.set_value("adapter_name", "walkthrough")
    ft.set_value("overwrite", True)
    task = dock.annotate_tab.finetune_on_selection()
    assert task is not None, dock.annotate_tab.status.text() + " " + dock.run_tab.message.text()
    area.removeSelection()  # the job already has the area; QGIS's selection fill would hide the map
    yield from wait_job(dock)
    assert dock.runner.last_outcome.get("status") == "finished", dock.runner.last_outcome
    result["epochs"] = dock.run_tab.epoch_table.rowCount()
    result["adapter"] = dock.runner.last_outcome["metrics"].get("adapter")
    shot("05_finetune")

    # 6. Detect again with the new adapter ("Apply now" preselects it), or with the demo's (see the docstring).
    library = dock.library
    yield lambda: library.adapters is not None and any(a.get("name") == APPLY_ADAPTER for a in library.adapters)
    dock.runner.apply_now("change.detect", APPLY_ADAPTER)
    dock.run_tab.form.set_value("before", before)
    dock.run_tab.form.set_value("after", after)
    dock.run_tab.form.set_value("out_dir", str(OUT / "results"))
    yield from run_job(dock)
    result["detect_again"] = layer_facts(dock.runner.last_layers)
    result["detect_again_adapter"] = APPLY_ADAPTER
    dock.tabs.setCurrentIndex(0)
    iface.mapCanvas().setExtent(before.extent())
    yield from wait_render()
    shot("06_detect_again")

    # 7. Objects: outline buildings on a SpaceNet-4 scene, fine-tune WEFT on them, segment the scene.
    scene = QgsRasterLayer(str(DATA.parent / "spacenet4" / "pan.tif"), "SpaceNet-4 Atlanta (PAN)", "gdal")
    project.addMapLayer(scene)
    project.setCrs(scene.crs())
    iface.mapCanvas().setDestinationCrs(scene.crs())
    iface.mapCanvas().setExtent(scene.extent())
    dock.run_tab.set_job("objects.finetune")
    objects_ft = dock.run_tab.form
    objects_ft.set_value("image", scene)
    for key, value in OBJECTS.items():
        objects_ft.set_value(key, value)
    objects_ft.set_value("adapter_name", "walkthrough-buildings")
    objects_ft.set_value("overwrite", True)
    outlines = dock.annotate_tab.new_annotation_layer()
    footprints = QgsVectorLayer(str(DATA.parent / "spacenet4" / "geotiff_labels.geojson"), "footprints", "ogr")
    for feat in list(footprints.getFeatures())[:25]:  # what the analyst would outline over the image
        f = QgsFeature(outlines.fields())
        f.setGeometry(QgsGeometry(feat.geometry()))
        f.setAttribute("class", "building")
        outlines.addFeature(f)
    dock.annotate_tab.labels_combo.setLayer(outlines)
    dock.annotate_tab.area_combo.setLayer(outlines)  # nothing selected: the outlines' extent is the area
    task = dock.annotate_tab.finetune_on_selection()
    assert task is not None, dock.annotate_tab.status.text() + " " + dock.run_tab.message.text()
    yield from wait_job(dock)
    assert dock.runner.last_outcome.get("status") == "finished", dock.runner.last_outcome
    yield lambda: any(a.get("name") == "walkthrough-buildings" for a in (library.adapters or []))
    dock.runner.apply_now("objects.segment", "walkthrough-buildings")
    dock.run_tab.form.set_value("out_dir", str(OUT / "results"))
    yield from run_job(dock)
    result["objects"] = layer_facts(dock.runner.last_layers)
    result["objects_image"] = layer_facts([scene])[0]
    dock.tabs.setCurrentIndex(1)
    iface.mapCanvas().setExtent(scene.extent())
    yield from wait_render()
    shot("07_objects")

    # 8. Land cover: adapt SpectralX to a Landsat-7 scene (stage 1, no labels), fine-tune it on class polygons
    # drawn on a Sentinel-2 scene, and map the Landsat-7 scene with it.
    ukis = DATA.parent / "ukis"
    s2 = QgsRasterLayer(str(ukis / "sentinel2.tif"), "Sentinel-2 (6 bands)", "gdal")
    l7 = QgsRasterLayer(str(ukis / "landsat7.tif"), "Landsat-7 (6 bands)", "gdal")
    for layer in (s2, l7):
        project.addMapLayer(layer)
    project.setCrs(l7.crs())
    iface.mapCanvas().setDestinationCrs(l7.crs())
    dock.tabs.setCurrentIndex(0)
    dock.run_tab.set_job("landcover.adapt")
    adapt = dock.run_tab.form
    adapt.set_value("image", l7)
    adapt.set_value("sensor", "landsat7")  # the file does not say its wavelengths: the hint asks for the sensor
    for key, value in LANDCOVER.items():
        adapt.set_value(key, value)
    adapt.set_value("adapter_name", "walkthrough-landsat7")
    adapt.set_value("overwrite", True)
    yield from run_job(dock)
    finetune = dock.run_tab.form_for("landcover.finetune")
    yield lambda: finetune.value("init_adapter") == "walkthrough-landsat7"  # set by "Fine-tune now"
    dock.run_tab.set_job("landcover.finetune")
    finetune.set_value("image", s2)
    for key, value in LANDCOVER.items():
        finetune.set_value(key, value)
    finetune.set_value("adapter_name", "walkthrough-landcover")
    finetune.set_value("overwrite", True)
    project.setCrs(s2.crs())  # the annotation layer is made in the project's CRS: the Sentinel-2 scene's
    classes = dock.annotate_tab.new_annotation_layer()
    drawn = QgsVectorLayer(str(ukis / "sentinel2_labels.gpkg"), "reference classes", "ogr")
    for feat in drawn.getFeatures():  # what the analyst would draw on the Sentinel-2 scene's left half
        f = QgsFeature(classes.fields())
        f.setGeometry(QgsGeometry(feat.geometry()))
        f.setAttribute("class", feat["class"])
        classes.addFeature(f)
    dock.annotate_tab.labels_combo.setLayer(classes)
    dock.annotate_tab.area_combo.setLayer(classes)  # nothing selected: the polygons' extent is the area
    task = dock.annotate_tab.finetune_on_selection()
    assert task is not None, dock.annotate_tab.status.text() + " " + dock.run_tab.message.text()
    yield from wait_job(dock)
    assert dock.runner.last_outcome.get("status") == "finished", dock.runner.last_outcome
    result["landcover_start"] = dock.runner.last_outcome["metrics"].get("adapter")
    yield lambda: any(a.get("name") == "walkthrough-landcover" for a in (library.adapters or []))
    dock.runner.apply_now("landcover.map", "walkthrough-landcover")
    dock.run_tab.form.set_value("image", l7)
    dock.run_tab.form.set_value("sensor", "landsat7")
    dock.run_tab.form.set_value("out_dir", str(OUT / "results"))
    yield from run_job(dock)
    result["landcover"] = layer_facts(dock.runner.last_layers)
    result["landcover_image"] = layer_facts([l7])[0]
    result["landcover_renderer"] = next(
        (layer.renderer().type() for layer in dock.runner.last_layers if layer.name().endswith("land cover")), None
    )
    classes.rollBack()
    project.removeMapLayer(classes.id())
    project.removeMapLayer(s2.id())
    project.setCrs(l7.crs())
    iface.mapCanvas().setDestinationCrs(l7.crs())
    iface.mapCanvas().setExtent(l7.extent())
    dock.tabs.setCurrentIndex(0)  # the Run tab: the map job's form and log
    yield from wait_render()
    shot("08_landcover")


def finish() -> None:
    (OUT / "walkthrough.json").write_text(json.dumps(result, indent=1))
    QgsProject.instance().clear()
    iface.actionExit().trigger()


def drive(gen: Iterator[Callable[[], bool]], condition: Callable[[], bool] | None = None) -> None:
    """Advance the steps whenever the pending condition holds, polling the event loop every 200 ms."""
    try:
        if condition is None or condition():
            condition = next(gen)
    except StopIteration:
        result["completed"] = True
        finish()
        return
    except Exception:  # a failing step ends the run with its traceback in the JSON
        result["errors"].append(traceback.format_exc())
        shot("error")
        finish()
        return
    QTimer.singleShot(200, lambda: drive(gen, condition))


QTimer.singleShot(3000, lambda: drive(steps()))
