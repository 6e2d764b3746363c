"""Values in and out of a form's widgets, as the analyst chose them: layers as QgsMapLayer, "auto" numbers and
empty text as None, number lists parsed; and what a form still misses, in plain words."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from qgis.core import QgsProject
from qgis.gui import QgsDoubleSpinBox, QgsFieldComboBox, QgsFileWidget, QgsSpinBox
from qgis.PyQt.QtCore import pyqtBoundSignal
from qgis.PyQt.QtWidgets import QCheckBox, QComboBox, QLineEdit, QWidget

from rs_peft_qgis.catalog import ParamInfo
from rs_peft_qgis.forms.adapter_picker import AdapterPicker
from rs_peft_qgis.forms.widgets import AoiChooser, LayerPicker
from rs_peft_qgis.settings import Settings


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


def read_value(w: QWidget, p: ParamInfo) -> Any:
    """The value of parameter `p` shown by its widget `w`."""
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


def write_value(w: QWidget, p: ParamInfo, value: Any) -> None:
    """Show `value` of parameter `p` in its widget `w`."""
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


def changed_signals(w: QWidget) -> list[pyqtBoundSignal]:
    """The signals a widget emits when the analyst (or `write_value`) changes its value."""
    if isinstance(w, AoiChooser):
        return [w.mode.currentIndexChanged, w.layer_combo.layerChanged]
    if isinstance(w, LayerPicker):
        return [w.combo.layerChanged]
    if isinstance(w, QgsFieldComboBox):
        return [w.fieldChanged]
    if isinstance(w, AdapterPicker):
        return [w.combo.currentIndexChanged]
    if isinstance(w, QgsFileWidget):
        return [w.fileChanged]
    if isinstance(w, (QgsSpinBox, QgsDoubleSpinBox)):
        return [w.valueChanged]
    if isinstance(w, QCheckBox):
        return [w.toggled]
    if isinstance(w, QComboBox):
        return [w.currentIndexChanged, w.editTextChanged] if w.isEditable() else [w.currentIndexChanged]
    if isinstance(w, QLineEdit):
        return [w.textChanged]
    return []


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
