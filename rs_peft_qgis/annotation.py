"""Annotation layers for fine-tuning: a new GeoPackage polygon layer with the class field(s) a task's
fine-tune reads, in the project CRS, styled and ready to draw on."""

from __future__ import annotations

import os
import time
from pathlib import Path

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsCoordinateReferenceSystem,
    QgsDefaultValue,
    QgsEditorWidgetSetup,
    QgsFillSymbol,
    QgsProject,
    QgsRendererCategory,
    QgsSingleSymbolRenderer,
    QgsVectorFileWriter,
    QgsVectorLayer,
    QgsWkbTypes,
)

from rs_peft_qgis.layers import LayerError, aoi_from_selection, polygon_file, safe_name

# Task id -> the fields an annotation layer of that task holds (name, "int" | "string").
ANNOTATION_FIELDS: dict[str, list[tuple[str, str]]] = {
    "change": [("change", "int")],  # 1 = change, 0 = no change: change.finetune's label_field
    "objects": [("class", "string")],  # a name ("tank", "ship"): objects.finetune turns names into classes
    "landcover": [("class", "string")],  # a name ("water", "forest"): landcover.finetune's classes, as named
}
# Semantic change (change.finetune's mode "scd"): the classes before and after the change, as fields of the
# annotation layer -> the fine-tune parameters that read them.
SEMANTIC_FIELDS: dict[str, list[tuple[str, str]]] = {"change": [("from_class", "int"), ("to_class", "int")]}
SEMANTIC_PARAMS: dict[str, str] = {"from_field": "from_class", "to_field": "to_class"}
# Task id -> the field a fine-tune of that task reads its labels from, and its value for a polygon drawn without
# editing its form (an expression): a positive label.
LABEL_FIELD: dict[str, str] = {"change": "change", "objects": "class", "landcover": "class"}
LABEL_DEFAULT: dict[str, str] = {"change": "1", "objects": "'object'", "landcover": "'class 1'"}
NOTE_FIELD = "note"
ANNOTATION_DIR_NAME = "rs_peft_annotations"
_TITLES = {"change": "Change", "objects": "Object", "landcover": "Land-cover"}
_URI_TYPES = {"int": "integer", "string": "string(254)"}

# Outline colours: drawn polygons stay visible over any imagery without hiding it.
YELLOW = "255,230,0"
CYAN = "0,200,255"


def _fill(rgb: str) -> QgsFillSymbol:
    return QgsFillSymbol.createSimple(
        {
            "color": f"{rgb},50",
            "outline_color": f"{rgb},255",
            "outline_width": "0.6",
            "outline_width_unit": "MM",
        }
    )


def apply_label_style(layer: QgsVectorLayer, task: str = "change") -> None:
    """Semi-transparent fill with a yellow outline; for change labels, 'no change' (0) polygons in cyan."""
    field = LABEL_FIELD.get(task)
    if task == "change" and field and layer.fields().indexOf(field) >= 0:
        categories = [
            QgsRendererCategory(1, _fill(YELLOW), "Change"),
            QgsRendererCategory(0, _fill(CYAN), "No change"),
        ]
        layer.setRenderer(QgsCategorizedSymbolRenderer(field, categories))
    else:
        layer.setRenderer(QgsSingleSymbolRenderer(_fill(YELLOW)))
    layer.triggerRepaint()


def default_annotation_dir(project: QgsProject) -> Path:
    """<project folder>/rs_peft_annotations for a saved project, else ~/rs_peft_annotations (created)."""
    base = Path(project.homePath()) if project.fileName() and project.homePath() else Path.home()
    folder = base / ANNOTATION_DIR_NAME
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _writable_dir(directory: Path) -> Path:
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"The folder {directory} cannot be created ({exc.strerror or exc}).") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"The folder {directory} cannot be written to; choose another folder.")
    return directory


def _unique_path(directory: Path, stem: str) -> Path:
    """A file name that does not exist yet: the stem, the date and time, and a counter if needed."""
    base = f"{stem}_{time.strftime('%Y%m%d_%H%M%S')}"
    path, n = directory / f"{base}.gpkg", 2
    while path.exists():
        path, n = directory / f"{base}_{n}.gpkg", n + 1
    return path


def new_annotation_layer(
    task: str,
    crs: QgsCoordinateReferenceSystem,
    directory: Path,
    name: str | None = None,
    project: QgsProject | None = None,
    semantic: bool = False,
) -> QgsVectorLayer:
    """Create a new GeoPackage polygon layer for `task`'s labels in `crs`, add it at the top of the
    project, and start editing it. Never overwrites a file. `semantic` adds the task's from/to class fields."""
    if task not in ANNOTATION_FIELDS:
        known = ", ".join(sorted(ANNOTATION_FIELDS))
        raise ValueError(f"There is no annotation layer for the task '{task}' (known tasks: {known}).")
    if crs is None or not crs.isValid():
        raise ValueError("The annotation layer needs a valid coordinate reference system; set the project's CRS.")
    project = project or QgsProject.instance()
    directory = _writable_dir(directory)
    title = name or f"{_TITLES[task]} labels {time.strftime('%Y-%m-%d %H:%M')}"
    path = _unique_path(directory, safe_name(name) if name else f"{task}_labels")

    extra = SEMANTIC_FIELDS.get(task, []) if semantic else []
    fields = [*ANNOTATION_FIELDS[task], *extra, (NOTE_FIELD, "string")]
    uri = "MultiPolygon?" + "&".join(f"field={n}:{_URI_TYPES[t]}" for n, t in fields)
    template = QgsVectorLayer(uri, title, "memory")
    template.setCrs(crs)
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = "labels"
    error, message, *_ = QgsVectorFileWriter.writeAsVectorFormatV3(
        template, str(path), project.transformContext(), options
    )
    if error != QgsVectorFileWriter.NoError or not path.is_file():
        raise ValueError(f"The annotation file {path} could not be created: {message}")

    layer = QgsVectorLayer(f"{path}|layername=labels", title, "ogr")
    if not layer.isValid():
        raise ValueError(f"The annotation file {path} was created but cannot be opened.")
    label_idx = layer.fields().indexOf(LABEL_FIELD[task])
    layer.setDefaultValueDefinition(label_idx, QgsDefaultValue(LABEL_DEFAULT[task]))
    if task == "change":
        layer.setEditorWidgetSetup(
            label_idx, QgsEditorWidgetSetup("ValueMap", {"map": [{"Change": "1"}, {"No change": "0"}]})
        )
    apply_label_style(layer, task)
    project.addMapLayer(layer, False)
    project.layerTreeRoot().insertLayer(0, layer)
    layer.startEditing()
    return layer


def save_edits(layer: QgsVectorLayer) -> None:
    """Write pending edits to the file (a job reads the file, not QGIS's edit buffer); keeps editing on."""
    if not layer.isEditable() or not layer.isModified():
        return
    if not layer.commitChanges(False):
        errors = "; ".join(layer.commitErrors()) or "unknown error"
        raise ValueError(f"The edits of '{layer.name()}' could not be saved: {errors}")


def selection_aoi(layer: QgsVectorLayer, work_dir: Path) -> str:
    """The selected polygons of any polygon layer as an area-of-interest file for a fine-tune.

    Only the outlines are written: a GeoPackage layer being edited holds new features whose fid is the
    placeholder "Autogenerate", which a plain export of its attributes refuses.
    """
    if layer.geometryType() != QgsWkbTypes.PolygonGeometry:
        return aoi_from_selection(layer, Path(work_dir))  # raises the plain "not a polygon layer" error
    geoms = [f.geometry() for f in layer.getSelectedFeatures() if f.hasGeometry() and not f.geometry().isEmpty()]
    if not geoms:
        raise LayerError(f"No polygon of '{layer.name()}' is selected; select the area to train on first.")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return polygon_file(geoms, layer.crs(), _unique_path(work_dir, "aoi_selection"), "area of interest")
