"""The land-cover form hook: a line under the image picker saying which wavelength each chosen band measures, as
the backend will find them (typed wavelengths, else the chosen sensor, else the raster's metadata), or that they
are missing. The metadata rules mirror backend/io/wavelengths.py (the QGIS side does not import the backend):
GDAL's IMAGERY `CENTRAL_WAVELENGTH_UM`, ENVI-style `wavelength` + `wavelength_units`, a wavelength in the band
description."""

from __future__ import annotations

import re
from typing import Any

from osgeo import gdal
from qgis.core import QgsRasterLayer
from qgis.PyQt.QtWidgets import QLabel

from rs_peft_qgis.forms.widgets import HINT_STYLE, WARNING_STYLE

HINT_NAME = "wavelengthHint"
_IN_TEXT = re.compile(r"(\d+(?:\.\d+)?)\s*(nm|um|µm|micrometers?|microns?)\b", re.IGNORECASE)


def _nm(value: float, units: str | None) -> float:
    if units and units.strip().lower().startswith(("n",)):
        return value
    if units or value < 30:
        return value * 1000.0
    return value


def band_wavelengths(layer: QgsRasterLayer, bands: list[int] | None = None) -> list[float] | None:
    """The centre wavelength (nm) of each chosen band from the raster's metadata, or None if one is missing."""
    ds = gdal.Open(layer.source())
    if ds is None:
        return None
    out = []
    for b in bands or range(1, ds.RasterCount + 1):
        if not 1 <= b <= ds.RasterCount:
            return None
        band = ds.GetRasterBand(b)
        imagery, tags = band.GetMetadata("IMAGERY") or {}, {k.lower(): v for k, v in (band.GetMetadata() or {}).items()}
        match = _IN_TEXT.search(band.GetDescription() or "")
        try:
            if "CENTRAL_WAVELENGTH_UM" in imagery:
                out.append(float(imagery["CENTRAL_WAVELENGTH_UM"]) * 1000.0)
            elif "wavelength" in tags:
                out.append(_nm(float(tags["wavelength"]), tags.get("wavelength_units")))
            elif match:
                out.append(_nm(float(match.group(1)), match.group(2)))
            else:
                return None
        except ValueError:
            return None
    return out


def wavelength_text(form: Any) -> tuple[str, bool]:
    """What the form's choices give as band wavelengths, and whether it is a warning."""
    layer = form.value("image")
    if not isinstance(layer, QgsRasterLayer) or not layer.isValid():
        return "", False
    bands = form.value("bands") if "bands" in form.widgets else None
    count = len(bands) if bands else layer.bandCount()
    typed = form.value("wavelengths") if "wavelengths" in form.widgets else None
    sensor = form.value("sensor") if "sensor" in form.widgets else None
    if typed:
        return f"{count} bands; wavelengths as typed.", False
    if sensor:
        values = form.hints.get("sensors", {}).get(sensor, [])
        if len(values) != count:
            return f"The sensor {sensor} has {len(values)} bands, but {count} are chosen: choose its bands.", True
        return f"Wavelengths of {sensor}: {', '.join(f'{w:.0f}' for w in values)} nm.", False
    found = band_wavelengths(layer, bands)
    if found is None:
        return (
            f"The raster does not say which wavelength its {count} bands measure: choose the sensor or type the "
            "wavelengths (an adapter's own sensor is assumed when mapping with the same band count).",
            True,
        )
    return f"Wavelengths from the raster: {', '.join(f'{w:.0f}' for w in found)} nm.", False


def add_wavelength_hint(form: Any) -> None:
    """Hook of the land-cover forms (a `JobForm`) with an image picker and a wavelengths field."""
    image = form.job.param("image")
    if image is None or not image.is_layer or "wavelengths" not in form.widgets:
        return
    hint = QLabel(form)
    hint.setObjectName(HINT_NAME)
    hint.setWordWrap(True)
    form.add_row_below("image", hint)

    def update(name: str | None = None) -> None:
        if name in (None, "image", "bands", "wavelengths", "sensor"):
            text, warning = wavelength_text(form)
            hint.setText(text)
            hint.setStyleSheet(WARNING_STYLE if warning else HINT_STYLE)
            hint.setVisible(bool(text))

    form.valueChanged.connect(update)
    update()
