"""A form's values as a job's parameters: layers become files (exported over the area of interest when they
are not local files, web layers at the map's resolution), the area of interest a polygon file, and output
names never replace an earlier run's files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMapLayer,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsMapCanvas

from rs_peft_qgis.annotation import selection_aoi
from rs_peft_qgis.catalog import JobInfo
from rs_peft_qgis.forms.job_form import JobForm
from rs_peft_qgis.forms.values import FormError, default_out_dir, describe_missing
from rs_peft_qgis.forms.widgets import has_pixel_grid
from rs_peft_qgis.layers import LayerError, aoi_from_extent, job_input

WORK_DIR = "rs_peft_work"  # exports and area-of-interest files, inside the output folder
Extent = tuple[QgsRectangle, QgsCoordinateReferenceSystem]


def extent_in(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem, layer: QgsMapLayer) -> QgsRectangle:
    """`rect` (in `crs`) as a bounding box in the layer's CRS."""
    if not crs.isValid() or not layer.crs().isValid() or crs == layer.crs():
        return QgsRectangle(rect)
    return QgsCoordinateTransform(crs, layer.crs(), QgsProject.instance()).transformBoundingBox(rect)


def free_name(out_dir: Path, name: str) -> str:
    """`name`, or name_2, name_3… so that a new run never replaces the files of an earlier one."""

    def taken(prefix: str) -> bool:
        return out_dir.is_dir() and any(p.name.startswith(f"{prefix}_") for p in out_dir.iterdir())

    if not taken(name):
        return name
    i = 2
    while taken(f"{name}_{i}"):
        i += 1
    return f"{name}_{i}"


def prepare_job(
    job: JobInfo,
    form: JobForm,
    canvas: QgsMapCanvas,
    log: Callable[[str], None],
    aoi_extent: Extent | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Form values -> the job's parameters (files for layers); what the end of the job needs to know.

    `aoi_extent` replaces the form's area of interest (a fine-tune on the extent of an annotation layer).
    Raises FormError / LayerError with a message for the analyst, OSError for an unusable output folder.
    """
    missing = form.missing()
    if missing:
        raise FormError(describe_missing(missing))
    folder = next((p for p in job.params if p.kind == "folder"), None)
    out_dir = Path((form.value(folder.name) if folder else None) or default_out_dir()).expanduser()
    work_dir = out_dir / WORK_DIR
    aoi_path, aoi_box = _aoi(form, work_dir, canvas, aoi_extent)
    params: dict[str, Any] = {}
    layers: dict[str, QgsMapLayer] = {}
    for p in job.params:
        value = form.value(p.name)
        if p.name == "aoi":
            value = aoi_path
        elif p.kind == "folder":
            out_dir.mkdir(parents=True, exist_ok=True)
            value = str(out_dir)
        elif p.is_layer and value is not None:
            layers[p.name] = value
            value = _layer_file(value, work_dir, aoi_box, canvas, log)
        elif p.name == "name" and value and folder is not None:
            unique = free_name(out_dir, value)
            if unique != value:
                log(f"Files named '{value}_…' exist in {out_dir}: this run writes '{unique}_…'.")
            value = unique
        if value is not None:
            params[p.name] = value
    return params, {"layers": layers, "out_dir": out_dir}


def _aoi(
    form: JobForm, work_dir: Path, canvas: QgsMapCanvas, override: Extent | None
) -> tuple[str | None, Extent | None]:
    """The area-of-interest file for the job and its bounding box (with CRS), or (None, None)."""
    if override is not None:
        rect, crs = override
        return aoi_from_extent(rect, crs, work_dir), (rect, crs)
    if form.job.param("aoi") is None:
        return None, None
    choice = form.value("aoi")
    if choice is None:
        return None, None
    if choice == "canvas":
        settings = canvas.mapSettings()
        rect, crs = settings.visibleExtent(), settings.destinationCrs()
        if rect.isEmpty() or not rect.isFinite():
            raise FormError("The map shows nothing yet: zoom to the area first, or choose another area.")
        return aoi_from_extent(rect, crs, work_dir), (rect, crs)
    if isinstance(choice, QgsVectorLayer):
        return selection_aoi(choice, work_dir), (choice.boundingBoxOfSelected(), choice.crs())
    raise FormError("Choose a polygon layer whose selected features bound the area of interest.")


def _canvas_resolution(canvas: QgsMapCanvas, layer: QgsMapLayer) -> tuple[float | None, QgsRectangle | None]:
    """The map's pixel size and extent in the layer's CRS (web layers are exported at what the map shows)."""
    settings = canvas.mapSettings()
    rect, width = settings.visibleExtent(), settings.outputSize().width()
    if rect.isEmpty() or width <= 0:
        return None, None
    local = extent_in(rect, settings.destinationCrs(), layer)
    return local.width() / width, local


def _layer_file(
    layer: QgsMapLayer, work_dir: Path, aoi_box: Extent | None, canvas: QgsMapCanvas, log: Callable[[str], None]
) -> str:
    """The file a job reads for `layer` (exported over the area of interest when it is not a local file)."""
    if not layer.isValid():
        raise LayerError(f"The layer '{layer.name()}' cannot be read.")
    if isinstance(layer, QgsVectorLayer) and layer.isEditable() and layer.isModified():
        if not layer.commitChanges(False):
            errors = "; ".join(layer.commitErrors()) or "unknown error"
            raise LayerError(f"The edits of '{layer.name()}' could not be saved: {errors}")
        log(f"Saved the edits of '{layer.name()}' so that the job reads them.")
    extent = extent_in(aoi_box[0], aoi_box[1], layer) if aoi_box else None
    resolution = None
    if isinstance(layer, QgsRasterLayer) and not has_pixel_grid(layer):
        resolution, canvas_extent = _canvas_resolution(canvas, layer)
        if resolution is None:
            raise FormError(
                f"'{layer.name()}' is a web layer: zoom the map to the area first, it is exported at the "
                "map's resolution."
            )
        extent = extent or canvas_extent
    path = job_input(layer, work_dir, extent, resolution=resolution)
    if not path.startswith(str(work_dir)):
        return path
    log(f"Exported '{layer.name()}' to {path}.")
    return path
