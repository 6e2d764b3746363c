"""The widgets of a job form, one per parameter kind: layer pickers with a raster hint, the area-of-interest
chooser, spin boxes with the catalog's ranges, choice combos."""

from __future__ import annotations

import math
from typing import Any

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsMapLayer,
    QgsRasterLayer,
    QgsUnitTypes,
    QgsVectorLayer,
)
from qgis.gui import QgsDoubleSpinBox, QgsMapLayerComboBox, QgsSpinBox
from qgis.PyQt.QtWidgets import QComboBox, QLabel, QVBoxLayout, QWidget

from rs_peft_qgis.catalog import ParamInfo

# Layer filters per parameter kind.
LAYER_FILTERS = {
    "raster": Qgis.LayerFilters(Qgis.LayerFilter.RasterLayer),
    "vector": Qgis.LayerFilters(Qgis.LayerFilter.VectorLayer),
    "polygons": Qgis.LayerFilters(Qgis.LayerFilter.PolygonLayer),
    "layer": Qgis.LayerFilters(Qgis.LayerFilter.RasterLayer | Qgis.LayerFilter.VectorLayer),
}
AUTO = "auto"
HINT_STYLE = "color: gray;"
WARNING_STYLE = "color: #b35900;"


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


def decimals(*numbers: float | None) -> int:
    """Decimals that show every one of `numbers` exactly (0.05 -> 2, 1e-05 -> 5, 10.0 -> 0), at most 10."""
    places = [len(f"{abs(n):.10f}".rstrip("0").partition(".")[2]) for n in numbers if n is not None]
    return max(places, default=0)


def number_widget(param: ParamInfo) -> QWidget:
    """A spin box with the default and the catalog's range and step (a wide range where the catalog gives
    none); for "no default" an 'auto' special value just below the minimum."""
    auto = param.default is None
    positive = (param.default or 0) >= 0
    if param.kind == "int":
        box: QgsSpinBox | QgsDoubleSpinBox = QgsSpinBox()
        lo, hi, step = (
            int(param.minimum) if param.minimum is not None else (0 if positive else -(10**9)),
            int(param.maximum) if param.maximum is not None else 10**9,
            int(param.step or 1),
        )
    else:
        box = QgsDoubleSpinBox()
        lo = param.minimum if param.minimum is not None else (0.0 if positive else -1e12)
        hi = param.maximum if param.maximum is not None else 1e12
        step = param.step or 0.1
        # The step's decimals (at least one: a float), and enough to show the minimum and default as they are.
        box.setDecimals(max(1, decimals(step, lo, param.default)))
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


NOT_SET = "(not set)"


def choice_combo(param: ParamInfo, preferred: Any, parent: QWidget | None = None) -> QComboBox:
    """The parameter's choices; editable when the catalog says they are suggestions ("cuda:1" stays possible).
    Starts on `preferred` (a default from the plugin's settings), else on the catalog's default."""
    box = shrinkable(QComboBox(parent))
    if not param.editable and not param.required and param.default is None:
        box.addItem(NOT_SET, None)  # an optional choice (e.g. a sensor where the raster says its wavelengths)
    for choice in param.choices or ():
        box.addItem(str(choice), choice)
    box.setEditable(param.editable)
    if param.editable:
        start = preferred if preferred not in (None, "") else param.default
        box.setCurrentText("" if start is None else str(start))
        return box
    index = next((box.findData(v) for v in (preferred, param.default) if v is not None and box.findData(v) >= 0), -1)
    if index >= 0:
        box.setCurrentIndex(index)
    return box
