"""Verdicts on result polygons (changes, objects, land cover), kept in a `verdict` attribute of the layer's own
file, and their export as labels for the next fine-tune (`change` = 1 accepted, 0 rejected; `class`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qgis.core import (
    Qgis,
    QgsDistanceArea,
    QgsFeature,
    QgsFeatureRequest,
    QgsField,
    QgsProject,
    QgsVectorDataProvider,
    QgsVectorLayer,
)

from rs_peft_qgis.annotation import apply_label_style
from rs_peft_qgis.layers import export_vector

VERDICT_FIELD = "verdict"
ACCEPTED = "accepted"
REJECTED = "rejected"
LABEL_FIELD = "change"  # the exported labels: 1 = accepted change, 0 = rejected (no change)
# … and for objects: the accepted polygon's class name, or "background" (objects.finetune reads it as class 0).
CLASS_FIELD = "class"
CLASS_NAME_FIELD = "class_name"  # of the polygons a map job writes
BACKGROUND = "background"
NOT_REVIEWED = "Nothing has been reviewed yet. Accept or reject some polygons first, then export them as labels."
NONE_ACCEPTED = "No polygon has been accepted yet; only accepted land-cover polygons become labels."


@dataclass(frozen=True)
class Review:
    """What the analyst judges in a task's polygons, in the words the Inspect tab uses."""

    items: str  # plural, as in "12 changes"
    accept_tip: str
    reject_tip: str
    export_tip: str
    keep_rejected: bool = True  # exported as negatives; land cover leaves them out (their right class is unknown)


REVIEWS = {
    "change": Review(
        "changes",
        "This is a real change (A)",
        "This is not a change (R)",
        "Save the accepted (change = 1) and rejected (change = 0) polygons as labels for the next fine-tune",
    ),
    "objects": Review(
        "objects",
        "This is an object of its class (A)",
        "This is not an object (R)",
        "Save the accepted polygons (class = their class) and the rejected ones (class = background) as labels "
        "for the next fine-tune",
    ),
    "landcover": Review(
        "land-cover polygons",
        "Its class is right (A)",
        "Its class is wrong (R)",
        "Save the accepted polygons with their class as labels for the next fine-tune (rejected ones are left "
        "out: their right class is unknown)",
        keep_rejected=False,
    ),
}


def review_of(task: str | None) -> Review:
    return REVIEWS.get(task or "change", REVIEWS["change"])


def _string_field(name: str) -> QgsField:
    if Qgis.QGIS_VERSION_INT >= 33800:  # QMetaType field types from 3.38 on (QVariant ones are gone in Qt6)
        from qgis.PyQt.QtCore import QMetaType

        return QgsField(name, QMetaType.Type.QString, "string", 16)
    from qgis.PyQt.QtCore import QVariant

    return QgsField(name, QVariant.String, "string", 16)


def _number(value: object) -> float | None:
    """A float from an attribute value; None for NULL or text."""
    if value is None or (hasattr(value, "isNull") and value.isNull()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _measurer(layer: QgsVectorLayer) -> QgsDistanceArea:
    """Areas in square metres whatever the layer's CRS (ellipsoidal for geographic coordinates)."""
    da = QgsDistanceArea()
    da.setSourceCrs(layer.crs(), QgsProject.instance().transformContext())
    da.setEllipsoid(QgsProject.instance().ellipsoid() or "EPSG:7030")
    return da


def _area_m2(da: QgsDistanceArea, geometry) -> float:
    if geometry is None or geometry.isEmpty():
        return 0.0
    area = da.measureArea(geometry)
    return float(da.convertAreaMeasurement(area, Qgis.AreaUnit.SquareMeters))


def change_rows(layer: QgsVectorLayer) -> list[tuple[int, float, float | None, str | None]]:
    """(fid, area m², confidence or None, verdict or None) of every feature, biggest area first, then the
    most confident; the area comes from `area_m2` when the layer has it, else from the geometry."""
    fields = layer.fields()
    has_area = fields.indexOf("area_m2") >= 0
    has_conf = fields.indexOf("confidence") >= 0
    has_verdict = fields.indexOf(VERDICT_FIELD) >= 0
    request = QgsFeatureRequest()
    wanted = [n for n, ok in (("area_m2", has_area), ("confidence", has_conf), (VERDICT_FIELD, has_verdict)) if ok]
    request.setSubsetOfAttributes(wanted, fields)
    da = _measurer(layer)
    rows = []
    for feat in layer.getFeatures(request):
        area = _number(feat["area_m2"]) if has_area else None
        if area is None:
            area = _area_m2(da, feat.geometry())
        conf = _number(feat["confidence"]) if has_conf else None
        verdict = feat[VERDICT_FIELD] if has_verdict else None
        rows.append((feat.id(), area, conf, verdict if verdict in (ACCEPTED, REJECTED) else None))
    rows.sort(key=lambda r: (-r[1], -(r[2] if r[2] is not None else -1.0), r[0]))
    return rows


def ordered_changes(layer: QgsVectorLayer) -> list[int]:
    """Feature ids sorted by area (m²) descending, then confidence descending."""
    return [row[0] for row in change_rows(layer)]


def _ensure_verdict_field(layer: QgsVectorLayer) -> int:
    idx = layer.fields().indexOf(VERDICT_FIELD)
    if idx >= 0:
        return idx
    provider = layer.dataProvider()
    buffer = layer.editBuffer() if layer.isEditable() else None
    if buffer is not None and buffer.addedAttributes():
        # Fields added in the edit buffer sit after the file's fields: add ours there too, so their indexes hold.
        if not layer.addAttribute(_string_field(VERDICT_FIELD)):
            raise ValueError(f"A '{VERDICT_FIELD}' field cannot be added to the layer '{layer.name()}'.")
    else:
        if provider is None or not provider.capabilities() & QgsVectorDataProvider.AddAttributes:
            raise ValueError(
                f"The layer '{layer.name()}' is read-only, so verdicts cannot be kept in it. "
                "Save it as a GeoPackage (Export > Save Features As…) and review that copy."
            )
        if not provider.addAttributes([_string_field(VERDICT_FIELD)]):
            raise ValueError(f"A '{VERDICT_FIELD}' field cannot be added to the layer '{layer.name()}'.")
        layer.updateFields()
    idx = layer.fields().indexOf(VERDICT_FIELD)
    if idx < 0:
        raise ValueError(f"A '{VERDICT_FIELD}' field cannot be added to the layer '{layer.name()}'.")
    return idx


def set_verdict(layer: QgsVectorLayer, fid: int, verdict: str | None) -> None:
    """Keep 'accepted' / 'rejected' (None: not reviewed) in the feature's `verdict` attribute: written to
    the file at once, or into the edit buffer when the layer is being edited."""
    if verdict not in (ACCEPTED, REJECTED, None):
        raise ValueError(f"A verdict is '{ACCEPTED}', '{REJECTED}' or empty, not {verdict!r}.")
    idx = _ensure_verdict_field(layer)
    if layer.isEditable():
        if not layer.changeAttributeValue(fid, idx, verdict):
            raise ValueError(f"The verdict of feature {fid} of '{layer.name()}' could not be changed.")
    else:
        provider = layer.dataProvider()
        if not provider.capabilities() & QgsVectorDataProvider.ChangeAttributeValues:
            raise ValueError(f"The layer '{layer.name()}' is read-only, so verdicts cannot be kept in it.")
        if not provider.changeAttributeValues({fid: {idx: verdict}}):
            raise ValueError(f"The verdict of feature {fid} of '{layer.name()}' could not be saved.")
    layer.triggerRepaint()


def export_verdicts(layer: QgsVectorLayer, path: Path, crs=None, keep_rejected: bool = True) -> tuple[int, int]:
    """Write the reviewed polygons to a GeoPackage with `change` = 1 (accepted) / 0 (rejected), labels for
    change.finetune with label_field="change", and `class` = the polygon's class name (accepted) or "background"
    (rejected), labels for objects.finetune with label_field="class"; without `keep_rejected` (land cover) only
    the accepted ones. Returns (accepted, rejected)."""
    if layer.fields().indexOf(VERDICT_FIELD) < 0:
        raise ValueError(NOT_REVIEWED)
    crs_text = layer.crs().authid()
    out = QgsVectorLayer(
        f"MultiPolygon?field={LABEL_FIELD}:integer&field={CLASS_FIELD}:string(64)&field={VERDICT_FIELD}:string(16)",
        "reviewed labels",
        "memory",
    )
    has_names = layer.fields().indexOf(CLASS_NAME_FIELD) >= 0
    out.setCrs(layer.crs())
    counts = {ACCEPTED: 0, REJECTED: 0}
    feats = []
    wanted = [VERDICT_FIELD, *([CLASS_NAME_FIELD] if has_names else [])]
    request = QgsFeatureRequest().setSubsetOfAttributes(wanted, layer.fields())
    for feat in layer.getFeatures(request):
        verdict = feat[VERDICT_FIELD]
        if verdict not in counts or not feat.hasGeometry():
            continue
        counts[verdict] += 1
        if verdict == REJECTED and not keep_rejected:
            continue
        geom = feat.geometry()
        geom.convertToMultiType()
        f = QgsFeature(out.fields())
        f.setGeometry(geom)
        name = (feat[CLASS_NAME_FIELD] if has_names else None) or "object"
        f.setAttributes([1 if verdict == ACCEPTED else 0, name if verdict == ACCEPTED else BACKGROUND, verdict])
        feats.append(f)
    if not feats:
        raise ValueError(NOT_REVIEWED if not counts[REJECTED] else NONE_ACCEPTED)
    if not out.dataProvider().addFeatures(feats)[0]:
        raise ValueError(f"The reviewed polygons of '{layer.name()}' ({crs_text}) could not be copied.")
    path = Path(path)
    if path.suffix.lower() != ".gpkg":
        path = path.with_suffix(".gpkg")
    path.parent.mkdir(parents=True, exist_ok=True)
    export_vector(out, path, crs=crs)
    return counts[ACCEPTED], counts[REJECTED]


def readable_area(m2: float) -> str:
    """123 m², 45.6 m² or 1.23 ha: what an analyst reads at a glance."""
    if m2 >= 10_000:
        return f"{m2 / 10_000:,.2f} ha"
    if m2 >= 100:
        return f"{m2:,.0f} m²"
    return f"{m2:.1f} m²"


def export_labels(layer: QgsVectorLayer, path: Path, task: str | None = None) -> tuple[QgsVectorLayer, str]:
    """Export the verdicts of `layer` (polygons of `task`) to `path` (.gpkg), add the labels layer, styled, to
    the project; the layer and a message for the analyst. ValueError (in plain words) when nothing can be
    exported."""
    path = Path(path)
    if path.suffix.lower() != ".gpkg":
        path = path.with_suffix(".gpkg")
    review = review_of(task)
    accepted, rejected = export_verdicts(layer, path, keep_rejected=review.keep_rejected)
    labels = QgsVectorLayer(str(path), f"{layer.name()} – reviewed labels", "ogr")
    if not labels.isValid():
        raise ValueError(f"The labels were written to {path} but cannot be opened.")
    # Accepted and rejected as change / no change; land cover's labels are all accepted.
    apply_label_style(labels, "change" if review.keep_rejected else (task or "change"))
    QgsProject.instance().addMapLayer(labels)
    if not review.keep_rejected:
        message = (
            f"Exported {accepted} accepted polygons to {path.name} ({rejected} rejected ones left out: their right "
            f"class is unknown). Use it as labels for the next fine-tune (field '{CLASS_FIELD}')."
        )
    else:
        message = (
            f"Exported {accepted} accepted and {rejected} rejected polygons to {path.name}. Use it as labels for the "
            f"next fine-tune (field '{LABEL_FIELD}' for change, '{CLASS_FIELD}' for objects)."
        )
    return labels, message
