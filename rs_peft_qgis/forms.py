"""A job's parameter form, built from its catalog entry (one widget per parameter kind).

The form knows widgets and values only; turning layers into files for the worker is the dock's job.
Values come back as the analyst chose them: layers as QgsMapLayer, "auto" numbers as None.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCsException,
    QgsMapLayer,
    QgsPointXY,
    QgsProject,
    QgsRasterLayer,
    QgsUnitTypes,
    QgsVectorLayer,
)
from qgis.gui import (
    QgsCollapsibleGroupBox,
    QgsDoubleSpinBox,
    QgsFieldComboBox,
    QgsFileWidget,
    QgsMapLayerComboBox,
    QgsSpinBox,
)
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from rs_peft_qgis.catalog import JobInfo, ParamInfo
from rs_peft_qgis.settings import DEVICES, Settings

# Which adapter method each task applies (the adapter picker lists only these).
TASK_METHOD = {"change": "filf", "pansharpen": "panadapter", "objects": "weft", "landcover": "spectralx"}

# Layer filters per parameter kind.
LAYER_FILTERS = {
    "raster": Qgis.LayerFilters(Qgis.LayerFilter.RasterLayer),
    "vector": Qgis.LayerFilters(Qgis.LayerFilter.VectorLayer),
    "polygons": Qgis.LayerFilters(Qgis.LayerFilter.PolygonLayer),
    "layer": Qgis.LayerFilters(Qgis.LayerFilter.RasterLayer | Qgis.LayerFilter.VectorLayer),
}

# Sensible ranges (minimum, maximum, step) of the numbers jobs take; others get a wide generic range.
INT_RANGES = {
    "tile_size": (32, 16384, 32),
    "overlap": (0, 4096, 16),
    "batch_size": (1, 4096, 1),
    "patch_size": (64, 4096, 32),
    "epochs": (1, 100_000, 1),
    "steps_per_epoch": (1, 1_000_000, 1),
    "rank": (1, 1024, 1),
    "patience": (0, 10_000, 1),
    "num_classes": (2, 1000, 1),
    "ratio": (2, 64, 1),  # MS pixel / PAN pixel: 1 would mean nothing to sharpen
}
FLOAT_RANGES = {  # minimum, maximum, step, decimals
    "lr": (0.0, 1.0, 1e-5, 6),
    "val_fraction": (0.01, 0.99, 0.05, 2),
    "threshold": (0.0, 1e9, 0.05, 4),
    "smooth": (0.0, 1000.0, 0.5, 2),
    "min_area_m2": (0.0, 1e12, 10.0, 1),
    "simplify": (0.0, 1000.0, 0.5, 2),
}
AUTO = "auto"
# A detected PAN/MS scale ratio must be this close (relative) to a whole number: the backend's rule
# (backend/jobs/pansharpen_classic.py, RATIO_TOLERANCE), repeated here because the plugin cannot import it.
RATIO_TOLERANCE = 0.02
HINT_STYLE = "color: gray;"
WARNING_STYLE = "color: #b35900;"


class FormError(ValueError):
    """A form value the job cannot take; the message is for the analyst."""


def default_out_dir() -> str:
    """Settings' output folder, else next to the saved project, else the temp folder."""
    configured = Settings.load().out_dir
    if configured:
        return configured
    home = QgsProject.instance().homePath()
    base = Path(home) if home else Path(tempfile.gettempdir())
    return str(base / "rs_peft_outputs")


def parse_ints(text: str, what: str) -> list[int] | None:
    """'1, 2,3' -> [1, 2, 3]; '' or 'all' -> None; anything else is a FormError in plain words."""
    text = text.strip()
    if not text or text.lower() == "all":
        return None
    parts = [p for p in re.split(r"[,;\s]+", text) if p]
    if not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise FormError(f"{what}: write whole numbers separated by commas, e.g. 1,2,3.")
    return [int(p) for p in parts]


def raster_hint(layer: QgsMapLayer | None) -> str:
    """'3 bands · 0.5 m · EPSG:32633' for a raster layer (what an analyst checks before a job)."""
    if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
        return ""
    crs = layer.crs()
    where = crs.authid() or crs.description() or "no CRS"
    provider = layer.dataProvider()
    if provider is None or not (provider.capabilities() & provider.Size) or provider.xSize() <= 0:
        return f"web layer · exported at the map's resolution · {where}"
    size = pixel_size_text(layer.rasterUnitsPerPixelX(), crs, layer.extent().center().y(), "{:.3g}")
    bands = layer.bandCount()
    return f"{bands} band{'s' if bands != 1 else ''} · {size} · {where}"


def pixel_size_text(size: float, crs: QgsCoordinateReferenceSystem, latitude: float, number: str = "{:.2f}") -> str:
    """'0.50 m'; in a geographic CRS '4.5e-06° (≈0.5 m)' (degrees mean little to an analyst)."""
    if crs.mapUnits() == Qgis.DistanceUnit.Degrees:
        metres = size * 111_320 * math.cos(math.radians(latitude))
        return f"{size:.3g}° (≈{metres:.2g} m)"
    return f"{number.format(size)} {QgsUnitTypes.toAbbreviatedString(crs.mapUnits())}".strip()


def has_pixel_grid(layer: QgsMapLayer | None) -> bool:
    """A valid raster with a pixel grid of its own (web layers are rendered at the map's resolution instead)."""
    if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
        return False
    provider = layer.dataProvider()
    return bool(provider is not None and provider.capabilities() & provider.Size and provider.xSize() > 0)


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


def check_ratio(pan: QgsMapLayer | None, ms: QgsMapLayer | None, given: int | None = None) -> RatioCheck:
    """The PAN/MS scale ratio as the backend will find it, and what the analyst should know about the pair.

    Mirrors the backend's rule: estimate = sqrt(MS pixel area / PAN pixel area) in the PAN's CRS (in pixel
    space, for rasters without CRS: the PAN/MS size ratio), accepted when within 2 % of a whole number >= 2.
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
    whole = nearest >= 1 and abs(estimate - nearest) <= RATIO_TOLERANCE * estimate
    # "2.0 × … not a whole ratio" would read as a contradiction: one more decimal where one rounds to whole.
    times = f"{estimate:.1f}" if round(estimate, 1) != nearest else f"{estimate:.2f}"
    found = nearest if whole and nearest >= 2 else None
    if found is not None:
        text = f"Detected ratio: {found} ({sizes})"
        notes.append(text if given in (None, found) else f"{text}; the ratio you set ({given}) is used.")
    elif given is not None:
        notes.append(f"MS pixel is {times} × the PAN pixel ({sizes}); the ratio you set ({given}) is used.")
    elif estimate < 1 / (1 + RATIO_TOLERANCE):
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


def shrinkable(combo: QComboBox) -> QComboBox:
    """A combo box that lets a narrow dock shrink it (long layer names are elided, not scrolled)."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(8)
    return combo


class LayerPicker(QWidget):
    """A layer combo filtered by kind; rasters get a band-count / resolution / CRS hint under it."""

    def __init__(self, param: ParamInfo, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.combo = QgsMapLayerComboBox(self)
        shrinkable(self.combo)
        self.combo.setFilters(LAYER_FILTERS.get(param.kind, LAYER_FILTERS["layer"]))
        if not param.required or param.kind != "raster":
            # Only required rasters start on a layer: a label or reference layer must be chosen on purpose.
            self.combo.setAllowEmptyLayer(True, "(none)" if not param.required else "(choose a layer)")
            self.combo.setLayer(None)
        self.hint = QLabel(self)
        self.hint.setObjectName(f"hint_{param.name}")
        self.hint.setStyleSheet(HINT_STYLE)
        self.hint.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(1)
        layout.addWidget(self.combo)
        layout.addWidget(self.hint)
        self.combo.layerChanged.connect(self._update_hint)
        self._update_hint(self.combo.currentLayer())

    def _update_hint(self, layer: QgsMapLayer | None) -> None:
        text = raster_hint(layer)
        self.hint.setText(text)
        self.hint.setVisible(bool(text))

    def layer(self) -> QgsMapLayer | None:
        return self.combo.currentLayer()

    def set_layer(self, layer: QgsMapLayer | None) -> None:
        self.combo.setLayer(layer)


class AoiChooser(QWidget):
    """Area of interest: the whole layer, the map canvas extent, or the selected features of a polygon layer."""

    WHOLE, CANVAS, SELECTION = "whole", "canvas", "selection"

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.mode = QComboBox(self)
        shrinkable(self.mode)
        self.mode.addItem("Whole layer", self.WHOLE)
        self.mode.addItem("Map canvas extent", self.CANVAS)
        self.mode.addItem("Selected features of…", self.SELECTION)
        self.layer_combo = QgsMapLayerComboBox(self)
        shrinkable(self.layer_combo)
        self.layer_combo.setFilters(LAYER_FILTERS["polygons"])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(1)
        layout.addWidget(self.mode)
        layout.addWidget(self.layer_combo)
        self.mode.currentIndexChanged.connect(self._sync)
        self._sync()

    def _sync(self) -> None:
        self.layer_combo.setEnabled(self.mode.currentData() == self.SELECTION)

    def value(self) -> str | QgsVectorLayer | None:
        """None (whole layer), "canvas", or the polygon layer whose selected features bound the job."""
        mode = self.mode.currentData()
        if mode == self.CANVAS:
            return self.CANVAS
        if mode == self.SELECTION:
            return self.layer_combo.currentLayer()
        return None

    def set_value(self, value: str | QgsVectorLayer | None) -> None:
        if isinstance(value, QgsMapLayer):
            self.layer_combo.setLayer(value)
            mode = self.SELECTION
        elif value in (self.CANVAS, self.SELECTION):
            mode = value
        else:
            mode = self.WHOLE
        self.mode.setCurrentIndex(self.mode.findData(mode))


def adapter_tooltip(meta: dict[str, Any]) -> str:
    """The adapter's metadata as an analyst reads it (what it was trained on, how well it did)."""
    area = meta.get("training_area") or {}
    metrics = meta.get("metrics") or {}
    scores = ", ".join(
        f"{k.removeprefix('val_').upper() if len(k) <= 7 else k.removeprefix('val_')} {v:.3f}"
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    bounds = area.get("bounds")
    where = f"{area.get('crs') or 'no CRS'}"
    if bounds:
        where += " [" + ", ".join(f"{b:.6g}" for b in bounds) + "]"
    size = meta.get("size_bytes")
    lines = [
        f"<b>{meta.get('name', '')}</b> ({meta.get('method', '?')})",
        f"Backbone: {meta.get('backbone', '?')}",
        f"Bands: {', '.join(str(b) for b in meta.get('bands') or []) or '?'}",
        f"Classes: {', '.join(str(c) for c in meta.get('classes') or []) or '?'}",
        f"Training area: {where}",
        f"Validation: {scores or 'not recorded'}",
        f"Created: {meta.get('created_at') or '?'}",
    ]
    if size:
        lines.append(f"Size: {size / 1e6:.1f} MB")
    return "<br>".join(lines)


class AdapterPicker(QWidget):
    """The adapters of one method in the library; metadata as tooltip; a refresh button."""

    refreshRequested = pyqtSignal()
    EMPTY = "No adapter in the library yet — fine-tune one first"

    def __init__(self, method: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.method = method
        self.combo = QComboBox(self)
        shrinkable(self.combo)
        self.refresh = QToolButton(self)
        self.refresh.setText("⟳")
        self.refresh.setToolTip("Read the adapter library again")
        self.refresh.clicked.connect(self.refreshRequested)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.refresh)
        self._wanted: str | None = None  # a name asked for before the library list arrived
        self.set_adapters([], loading=True)

    def set_adapters(self, adapters: list[dict[str, Any]], loading: bool = False) -> None:
        keep = self._wanted or self.value()
        self.combo.clear()
        mine = [a for a in adapters if not self.method or a.get("method") == self.method]
        for meta in mine:
            self.combo.addItem(meta["name"], meta["name"])
            self.combo.setItemData(self.combo.count() - 1, adapter_tooltip(meta), Qt.ItemDataRole.ToolTipRole)
        if not mine:
            self.combo.addItem("Reading the adapter library…" if loading else self.EMPTY, None)
        if keep and self.combo.findData(keep) >= 0:
            self.combo.setCurrentIndex(self.combo.findData(keep))
            self._wanted = None
        self.combo.setToolTip(self.combo.itemData(self.combo.currentIndex(), Qt.ItemDataRole.ToolTipRole) or "")

    def names(self) -> list[str]:
        return [self.combo.itemData(i) for i in range(self.combo.count()) if self.combo.itemData(i)]

    def value(self) -> str | None:
        return self.combo.currentData()

    def set_value(self, name: str | None) -> None:
        index = self.combo.findData(name) if name else -1
        if index >= 0:
            self.combo.setCurrentIndex(index)
            self._wanted = None
        else:
            self._wanted = name  # selected as soon as the library list has it


def _number_widget(param: ParamInfo) -> QWidget:
    """A spin box with the default, a sensible range and, for "no default", an 'auto' special value."""
    auto = param.default is None
    if param.kind == "int":
        lo, hi, step = INT_RANGES.get(param.name, (0 if (param.default or 0) >= 0 else -(10**9), 10**9, 1))
        box: QgsSpinBox | QgsDoubleSpinBox = QgsSpinBox()
        box.setSingleStep(step)
    else:
        lo, hi, step, decimals = FLOAT_RANGES.get(
            param.name, (0.0 if (param.default or 0) >= 0 else -1e12, 1e12, 0.1, 4)
        )
        box = QgsDoubleSpinBox()
        box.setDecimals(decimals)
        box.setSingleStep(step)
    if auto:
        box.setRange(lo - step, hi)
        box.setSpecialValueText(AUTO)
        box.setClearValueMode(type(box).ClearValueMode.MinimumValue)
        box.setValue(lo - step)
    else:
        box.setRange(min(lo, param.default), max(hi, param.default))
        box.setClearValue(param.default)
        box.setValue(param.default)
    box.setShowClearButton(True)
    return box


class JobForm(QWidget):
    """The parameter form of one job: required parameters first, then the other inputs and the few prominent
    settings (method, sensor, ratio); the rest under "Advanced"."""

    def __init__(self, job: JobInfo, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.job = job
        self.widgets: dict[str, QWidget] = {}
        self.labels: dict[str, QLabel] = {}
        self.setObjectName(f"form_{job.name}")
        main = QFormLayout()
        main.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        main.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        self.advanced = QgsCollapsibleGroupBox("Advanced", self)
        self.advanced.setObjectName("advanced")
        self.advanced.setSaveCollapsedState(False)
        advanced = QFormLayout(self.advanced)
        advanced.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        advanced.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        ordered = sorted(job.params, key=lambda p: not p.required)  # stable: catalog order within each group
        for param in ordered:
            widget = self._make_widget(param)
            widget.setObjectName(f"param_{param.name}")
            widget.setToolTip(param.help)
            self.widgets[param.name] = widget
            label = QLabel(param.label, self)
            label.setToolTip(param.help)
            self.labels[param.name] = label
            (main if self.on_main_form(param) else advanced).addRow(label, widget)
        self.ratio_hint = self._add_ratio_hint(main, advanced)
        self._bind_fields()
        self._spread_rasters()
        self.update_ratio_hint()
        # A combo that had no layer takes the first one added: keep before/after on different layers.
        QgsProject.instance().layersAdded.connect(self._layers_added)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(main)
        if advanced.rowCount():
            layout.addWidget(self.advanced)
            self.advanced.setCollapsed(True)
        else:
            self.advanced.hide()
        layout.addStretch(1)

    # --- building -------------------------------------------------------------------------------
    @staticmethod
    def on_main_form(p: ParamInfo) -> bool:
        """Inputs, what must be filled in and the few prominent settings (sensor…); the rest is "Advanced"."""
        return p.required or p.is_layer or p.kind == "field" or p.name == "aoi" or p.prominent

    def _add_ratio_hint(self, main: QFormLayout, advanced: QFormLayout) -> QLabel | None:
        """With a PAN and an MS picker: a line under the ratio (or the MS) saying which ratio the pair gives."""
        pan, ms = self.widgets.get("pan"), self.widgets.get("ms")
        if not (isinstance(pan, LayerPicker) and isinstance(ms, LayerPicker)):
            return None
        hint = QLabel(self)
        hint.setObjectName("ratioHint")
        hint.setWordWrap(True)
        anchor = self.widgets.get("ratio", ms)
        layout = advanced if self.advanced.isAncestorOf(anchor) else main
        row, _role = layout.getWidgetPosition(anchor)
        layout.insertRow(row + 1, hint)
        pan.combo.layerChanged.connect(self.update_ratio_hint)
        ms.combo.layerChanged.connect(self.update_ratio_hint)
        ratio = self.widgets.get("ratio")
        if isinstance(ratio, (QgsSpinBox, QgsDoubleSpinBox)):
            ratio.valueChanged.connect(self.update_ratio_hint)
        return hint

    def ratio_check(self) -> RatioCheck:
        """The scale ratio the chosen PAN and MS layers give (and the ratio set, if any), in words."""
        given = self.value("ratio") if "ratio" in self.widgets else None
        return check_ratio(self.value("pan"), self.value("ms"), int(given) if given is not None else None)

    def update_ratio_hint(self, *_: Any) -> None:
        if self.ratio_hint is None:
            return
        check = self.ratio_check()
        self.ratio_hint.setText(check.text)
        self.ratio_hint.setStyleSheet(WARNING_STYLE if check.warning else HINT_STYLE)
        self.ratio_hint.setVisible(bool(check.text))

    def _make_widget(self, p: ParamInfo) -> QWidget:
        if p.name == "aoi":
            return AoiChooser(self)
        if p.is_layer:
            return LayerPicker(p, self)
        if p.kind == "field":
            box = QgsFieldComboBox(self)
            shrinkable(box)
            box.setAllowEmptyFieldName(not p.required)
            return box
        if p.kind == "adapter":
            return AdapterPicker(TASK_METHOD.get(self.job.task, ""), self)
        if p.kind == "folder":
            widget = QgsFileWidget(self)
            widget.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
            widget.setFilePath(p.default or default_out_dir())
            return widget
        if p.kind in ("bands", "ints"):
            edit = QLineEdit(self)
            edit.setPlaceholderText("all" if p.kind == "bands" else "e.g. 1,2,3")
            if p.default:
                edit.setText(",".join(str(v) for v in p.default))
            return edit
        if p.name == "device":
            box = QComboBox(self)
            shrinkable(box)
            box.setEditable(True)  # "cuda:1" and other device strings stay possible
            box.addItems(list(DEVICES))
            box.setCurrentText(Settings.load().device or str(p.default or "auto"))
            return box
        if p.choices:
            box = QComboBox(self)
            shrinkable(box)
            for choice in p.choices:
                box.addItem(str(choice), choice)
            if p.default is not None and box.findData(p.default) >= 0:
                box.setCurrentIndex(box.findData(p.default))
            return box
        if p.kind in ("int", "float"):
            return _number_widget(p)
        if p.kind == "bool":
            box = QCheckBox(self)
            box.setChecked(bool(p.default))
            return box
        edit = QLineEdit(self)
        if p.name == "name":
            edit.setText(self.job.name.split(".", 1)[-1])  # outputs named after the job's verb
        elif p.name == "adapter_name":
            edit.setText(f"{self.job.task}-{time.strftime('%Y%m%d-%H%M')}")
        elif p.default is not None:
            edit.setText(str(p.default))
        else:
            edit.setPlaceholderText("default")
        return edit

    def _spread_rasters(self, only_clashing: bool = False) -> None:
        """Required rasters start on different layers (before = the first raster, after = the second…)."""
        pickers = [w for p, w in self.widgets.items() if isinstance(w, LayerPicker) and self.param(p).required]
        pickers = [w for w in pickers if not w.combo.allowEmptyLayer()]
        chosen = [w.layer().id() if w.layer() is not None else None for w in pickers]
        if only_clashing and len(set(chosen)) == len(chosen):
            return
        for i, picker in enumerate(pickers):
            count = picker.combo.count()
            if count:
                picker.set_layer(picker.combo.layer(min(i, count - 1)))

    def _layers_added(self, _layers: list[QgsMapLayer]) -> None:
        self._spread_rasters(only_clashing=True)

    def _bind_fields(self) -> None:
        """Field pickers follow the layer picker named by their `parent`."""
        for param in self.job.params:
            if param.kind != "field":
                continue
            field = self.widgets[param.name]
            owner = self.widgets.get(param.parent)
            if not isinstance(owner, LayerPicker):
                continue

            def follow(layer: QgsMapLayer | None, field: QgsFieldComboBox = field) -> None:
                vector = layer if isinstance(layer, QgsVectorLayer) else None
                field.setLayer(vector)
                field.setEnabled(vector is not None)

            owner.combo.layerChanged.connect(follow)
            follow(owner.layer())

    # --- values ---------------------------------------------------------------------------------
    @property
    def adapter_picker(self) -> AdapterPicker | None:
        return next((w for w in self.widgets.values() if isinstance(w, AdapterPicker)), None)

    def param(self, name: str) -> ParamInfo:
        param = self.job.param(name)
        if param is None:
            raise KeyError(f"{self.job.name} has no parameter {name!r}")
        return param

    def value(self, name: str) -> Any:
        """The value as chosen: layers as QgsMapLayer, "auto" numbers and empty text as None."""
        p, w = self.param(name), self.widgets[name]
        if isinstance(w, AoiChooser):
            return w.value()
        if isinstance(w, LayerPicker):
            return w.layer()
        if isinstance(w, QgsFieldComboBox):
            return w.currentField() or None
        if isinstance(w, AdapterPicker):
            return w.value()
        if isinstance(w, QgsFileWidget):
            return w.filePath().strip() or None
        if isinstance(w, (QgsSpinBox, QgsDoubleSpinBox)):
            return None if w.specialValueText() and w.value() == w.minimum() else w.value()
        if isinstance(w, QCheckBox):
            return w.isChecked()
        if isinstance(w, QComboBox):
            if w.isEditable():
                return w.currentText().strip() or None
            return w.currentData()
        if isinstance(w, QLineEdit):
            if p.kind in ("bands", "ints"):
                return parse_ints(w.text(), p.label)
            return w.text().strip() or None
        raise TypeError(f"no value for widget {type(w).__name__}")

    def set_value(self, name: str, value: Any) -> None:
        p, w = self.param(name), self.widgets[name]
        if isinstance(w, AoiChooser):
            w.set_value(value)
        elif isinstance(w, LayerPicker):
            w.set_layer(value)
        elif isinstance(w, QgsFieldComboBox):
            w.setField(value or "")
        elif isinstance(w, AdapterPicker):
            w.set_value(value)
        elif isinstance(w, QgsFileWidget):
            w.setFilePath(str(value or ""))
        elif isinstance(w, (QgsSpinBox, QgsDoubleSpinBox)):
            w.setValue(w.minimum() if value is None and w.specialValueText() else (value if value is not None else 0))
        elif isinstance(w, QCheckBox):
            w.setChecked(bool(value))
        elif isinstance(w, QComboBox):
            if w.isEditable():
                w.setCurrentText(str(value or ""))
            else:
                index = w.findData(value)
                if index < 0:
                    raise ValueError(f"{value!r} is not a choice of {p.label}")
                w.setCurrentIndex(index)
        elif isinstance(w, QLineEdit):
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            w.setText("" if value is None else str(value))

    def missing(self) -> list[ParamInfo]:
        """Required parameters without a value (in form order)."""
        out = []
        for p in self.job.params:
            if not p.required:
                continue
            try:
                empty = self.value(p.name) in (None, "", [])
            except FormError:
                empty = False  # a malformed value is reported by value() itself
            if empty:
                out.append(p)
        return out


def describe_missing(params: list[ParamInfo]) -> str:
    """'Choose a layer for Before and After.' — what the analyst must still fill in."""
    layers = [p.label for p in params if p.is_layer]
    others = [p.label for p in params if not p.is_layer and p.kind != "adapter"]
    parts = []
    if layers:
        parts.append(f"Choose a layer for {_join(layers)}.")
    if any(p.kind == "adapter" for p in params):
        parts.append("Choose an adapter (the library has none for this task yet: fine-tune one first).")
    if others:
        parts.append(f"Fill in {_join(others)}.")
    return " ".join(parts)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
