"""The pansharpening form hook: a line under the ratio (or the MS) saying which scale ratio the chosen PAN
and MS layers give, as the backend will find it, and what the analyst should know about the pair."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsMapLayer,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
)
from qgis.PyQt.QtWidgets import QLabel

from rs_peft_qgis.forms.widgets import HINT_STYLE, WARNING_STYLE, has_pixel_grid, pixel_size_text

HINT_NAME = "ratioHint"


@dataclass(frozen=True)
class RatioCheck:
    """What a PAN and an MS layer say about their scale ratio: the whole ratio found (or None), in words."""

    ratio: int | None
    text: str
    warning: bool
    estimate: float | None = None  # sqrt(MS pixel area / PAN pixel area), before rounding


def _ms_pixel_area(ms: QgsRasterLayer, crs: QgsCoordinateReferenceSystem) -> float:
    """Area of the MS centre pixel in the units of `crs`: a corner and its two edges, transformed."""
    centre, dx, dy = ms.extent().center(), ms.rasterUnitsPerPixelX(), ms.rasterUnitsPerPixelY()
    points = [QgsPointXY(centre.x() + ox, centre.y() + oy) for ox, oy in ((0, 0), (dx, 0), (0, -dy))]
    if ms.crs() != crs:
        transform = QgsCoordinateTransform(ms.crs(), crs, QgsProject.instance())
        points = [transform.transform(pt) for pt in points]
    (x0, y0), (x1, y1), (x2, y2) = ((pt.x(), pt.y()) for pt in points)
    return abs((x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0))


def check_ratio(
    pan: QgsMapLayer | None, ms: QgsMapLayer | None, tolerance: float, given: int | None = None
) -> RatioCheck:
    """The PAN/MS scale ratio as the backend will find it, and what the analyst should know about the pair.

    Mirrors the backend's rule: estimate = sqrt(MS pixel area / PAN pixel area) in the PAN's CRS (in pixel
    space, for rasters without CRS: the PAN/MS size ratio), accepted when within `tolerance` (relative, the
    task's `ratio_tolerance` hint in the catalog) of a whole number >= 2.
    """
    if not (has_pixel_grid(pan) and has_pixel_grid(ms)):
        return RatioCheck(None, "", False)  # nothing chosen yet, or a web layer (exported at the map's resolution)
    notes = []
    if pan.bandCount() > 1:
        notes.append(f"The PAN layer has {pan.bandCount()} bands: choose the single-band panchromatic raster.")
    if pan.crs().isValid() != ms.crs().isValid():
        missing = "PAN" if not pan.crs().isValid() else "MS"
        notes.append(f"The {missing} layer has no CRS but the other one has: assign one to it first.")
        return RatioCheck(None, "\n".join(notes), True)
    if pan.crs().isValid():
        pan_area = pan.rasterUnitsPerPixelX() * pan.rasterUnitsPerPixelY()
        try:
            ms_area = _ms_pixel_area(ms, pan.crs())
        except QgsCsException:
            ms_area = math.nan
        if not (pan_area > 0 and math.isfinite(ms_area) and ms_area > 0):
            notes.append("The MS pixel size cannot be compared with the PAN's: do the two layers cover one area?")
            return RatioCheck(None, "\n".join(notes), True)
        estimate = math.sqrt(ms_area / pan_area)
        latitude = pan.extent().center().y()
        pan_size = pixel_size_text(math.sqrt(pan_area), pan.crs(), latitude)
        sizes = f"PAN {pan_size}, MS {pixel_size_text(math.sqrt(ms_area), pan.crs(), latitude)}"
    else:  # pixel space: both rasters are taken to cover the same area, as the backend does
        estimate = math.sqrt(pan.width() * pan.height() / (ms.width() * ms.height()))
        sizes = f"no CRS: PAN {pan.width()}×{pan.height()} px, MS {ms.width()}×{ms.height()} px"
    nearest = round(estimate)
    whole = nearest >= 1 and abs(estimate - nearest) <= tolerance * estimate
    # "2.0 × … not a whole ratio" would read as a contradiction: one more decimal where one rounds to whole.
    times = f"{estimate:.1f}" if round(estimate, 1) != nearest else f"{estimate:.2f}"
    found = nearest if whole and nearest >= 2 else None
    if found is not None:
        text = f"Detected ratio: {found} ({sizes})"
        notes.append(text if given in (None, found) else f"{text}; the ratio you set ({given}) is used.")
    elif given is not None:
        notes.append(f"MS pixel is {times} × the PAN pixel ({sizes}); the ratio you set ({given}) is used.")
    elif estimate < 1 / (1 + tolerance):
        notes.append(f"The MS pixel is smaller than the PAN pixel ({sizes}): are PAN and MS swapped?")
    elif whole:
        notes.append(
            f"MS and PAN have the same pixel size ({sizes}): the ratio cannot be detected — set the original one "
            "(e.g. 4)."
        )
    else:
        notes.append(f"MS pixel is {times} × the PAN pixel ({sizes}): not a whole ratio — set it.")
    warning = len(notes) > 1 or (found is None and given is None)
    return RatioCheck(found, "\n".join(notes), warning, estimate)


# --- the hook ---------------------------------------------------------------------------------------------


def add_ratio_hint(form: Any) -> None:
    """Hook of the pansharpening forms (a `JobForm`): with a PAN and an MS layer picker, a line under the ratio
    (or the MS) saying which ratio the pair gives; it follows both pickers and the ratio set."""
    pan, ms = form.job.param("pan"), form.job.param("ms")
    if pan is None or ms is None or not (pan.is_layer and ms.is_layer):
        return
    hint = QLabel(form)
    hint.setObjectName(HINT_NAME)
    hint.setWordWrap(True)
    form.add_row_below("ratio" if "ratio" in form.widgets else "ms", hint)

    def changed(name: str) -> None:
        if name in ("pan", "ms", "ratio"):
            update_ratio_hint(form)

    form.valueChanged.connect(changed)
    update_ratio_hint(form)


def ratio_hint(form: Any) -> QLabel | None:
    """The form's ratio hint (None on a form without a PAN/MS pair)."""
    return form.findChild(QLabel, HINT_NAME)


def ratio_check(form: Any) -> RatioCheck:
    """The scale ratio the form's PAN and MS layers give (and the ratio set, if any), in words."""
    given = form.value("ratio") if "ratio" in form.widgets else None
    tolerance = form.hints["ratio_tolerance"]  # the backend's rule, from the catalog
    return check_ratio(form.value("pan"), form.value("ms"), tolerance, int(given) if given is not None else None)


def update_ratio_hint(form: Any) -> None:
    hint = ratio_hint(form)
    if hint is None:
        return
    check = ratio_check(form)
    hint.setText(check.text)
    hint.setStyleSheet(WARNING_STYLE if check.warning else HINT_STYLE)
    hint.setVisible(bool(check.text))
