"""A job's parameter form, built from its catalog entry (one widget per parameter kind), with the task's form
hook (`form_hooks`) added on top.

The form knows widgets and values only; turning layers into files for the worker is the dock's job.
Values come back as the analyst chose them: layers as QgsMapLayer, "auto" numbers as None.
"""

from __future__ import annotations

import time
from typing import Any

from qgis.core import QgsMapLayer, QgsProject, QgsVectorLayer
from qgis.gui import QgsCollapsibleGroupBox, QgsFieldComboBox, QgsFileWidget
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import QCheckBox, QFormLayout, QLabel, QLineEdit, QVBoxLayout, QWidget

from rs_peft_qgis import form_hooks
from rs_peft_qgis.catalog import JobInfo, ParamInfo
from rs_peft_qgis.forms.adapter_picker import AdapterPicker
from rs_peft_qgis.forms.values import FormError, changed_signals, default_out_dir, read_value, write_value
from rs_peft_qgis.forms.widgets import AoiChooser, LayerPicker, choice_combo, number_widget, shrinkable
from rs_peft_qgis.settings import Settings


class JobForm(QWidget):
    """The parameter form of one job: required parameters first, then the other inputs and the few prominent
    settings the catalog marks prominent (method, sensor, ratio); the rest under "Advanced".

    `hints` are the task's constants for its form hook. `valueChanged(name)` is emitted whenever the value of
    a parameter changes (form hooks follow it).
    """

    valueChanged = pyqtSignal(str)

    def __init__(self, job: JobInfo, parent: QWidget | None = None, hints: dict[str, Any] | None = None) -> None:
        super().__init__(parent)
        self.job = job
        self.hints = dict(hints or {})
        self.widgets: dict[str, QWidget] = {}
        self.labels: dict[str, QLabel] = {}
        self.setObjectName(f"form_{job.name}")
        self.main = self._form_layout()
        self.advanced = QgsCollapsibleGroupBox("Advanced", self)
        self.advanced.setObjectName("advanced")
        self.advanced.setSaveCollapsedState(False)
        advanced = self._form_layout(self.advanced)
        ordered = sorted(job.params, key=lambda p: not p.required)  # stable: catalog order within each group
        settings = Settings.load()
        for param in ordered:
            widget = self._make_widget(param, settings)
            widget.setObjectName(f"param_{param.name}")
            widget.setToolTip(param.help)
            self.widgets[param.name] = widget
            label = QLabel(param.label, self)
            label.setToolTip(param.help)
            self.labels[param.name] = label
            (self.main if self.on_main_form(param) else advanced).addRow(label, widget)
            for signal in changed_signals(widget):
                signal.connect(lambda *_, name=param.name: self.valueChanged.emit(name))
        self._bind_fields()
        self._spread_rasters()
        # A combo that had no layer takes the first one added: keep before/after on different layers.
        QgsProject.instance().layersAdded.connect(self._layers_added)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self.main)
        if advanced.rowCount():
            layout.addWidget(self.advanced)
            self.advanced.setCollapsed(True)
        else:
            self.advanced.hide()
        layout.addStretch(1)
        form_hooks.apply(self)

    # --- building -------------------------------------------------------------------------------
    @staticmethod
    def _form_layout(parent: QWidget | None = None) -> QFormLayout:
        layout = QFormLayout(parent) if parent is not None else QFormLayout()
        layout.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        layout.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        return layout

    @staticmethod
    def on_main_form(p: ParamInfo) -> bool:
        """Inputs, what must be filled in and the few prominent settings (sensor…); the rest is "Advanced"."""
        return p.required or p.is_layer or p.kind == "field" or p.name == "aoi" or p.prominent

    def add_row_below(self, name: str, widget: QWidget) -> None:
        """A full-width row right under the row of parameter `name` (in its section): a hook's hint."""
        anchor = self.widgets[name]
        layout = self.advanced.layout() if self.advanced.isAncestorOf(anchor) else self.main
        row, _role = layout.getWidgetPosition(anchor)
        layout.insertRow(row + 1, widget)

    def _make_widget(self, p: ParamInfo, settings: Settings) -> QWidget:
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
            return AdapterPicker(self.job.method or "", self, optional=not p.required)
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
        if p.choices:
            return choice_combo(p, settings.job_default(p.name), self)
        if p.kind in ("int", "float"):
            return number_widget(p)
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
        elif p.name == "cluster":  # the Ray address (docs/SCALING.md)
            edit.setPlaceholderText("this computer (or: local, auto, head:6379)")
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
    def adapter_pickers(self) -> list[AdapterPicker]:
        return [w for w in self.widgets.values() if isinstance(w, AdapterPicker)]

    @property
    def adapter_picker(self) -> AdapterPicker | None:
        """The picker of the adapter the job runs (a required one), else the first."""
        pickers = self.adapter_pickers
        return next((w for w in pickers if not w.optional), pickers[0] if pickers else None)

    def param(self, name: str) -> ParamInfo:
        param = self.job.param(name)
        if param is None:
            raise KeyError(f"{self.job.name} has no parameter {name!r}")
        return param

    def value(self, name: str) -> Any:
        """The value as chosen: layers as QgsMapLayer, "auto" numbers and empty text as None."""
        return read_value(self.widgets[name], self.param(name))

    def set_value(self, name: str, value: Any) -> None:
        write_value(self.widgets[name], self.param(name), value)

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
