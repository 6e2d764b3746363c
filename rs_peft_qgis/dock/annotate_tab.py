"""The panel's Annotate tab: a new annotation layer to draw labels in, and a fine-tune of the task's adapter
on it inside a selected training area (the fine-tune action of the Run tab, with its rasters and settings)."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsProject, QgsVectorLayer
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import QFormLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from rs_peft_qgis import annotation
from rs_peft_qgis.dock.run_tab import RunTab, carry_layers
from rs_peft_qgis.dock.runner import JobRunner
from rs_peft_qgis.forms.widgets import LAYER_FILTERS, shrinkable
from rs_peft_qgis.job_task import JobTask


class AnnotateTab(QWidget):
    """`runTabWanted()` when a fine-tune starts (its progress is on the Run tab)."""

    runTabWanted = pyqtSignal()

    def __init__(self, iface: Any, run_tab: RunTab, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.iface = iface
        self.run_tab = run_tab
        self.runner = runner
        self.annotation_layer: QgsVectorLayer | None = None
        intro = QLabel(
            "Draw polygons of the class to learn (e.g. changed buildings) in a new annotation layer, select the "
            "labelled area (or leave nothing selected to use the layer's extent), then fine-tune an adapter on it.",
            self,
        )
        intro.setWordWrap(True)
        self.labels_combo = self._polygon_combo("labelsCombo", "(choose the annotation layer)")
        self.area_combo = self._polygon_combo("areaCombo", "(the annotation layer itself)")
        self.area_combo.setToolTip(
            "The selected polygons of this layer bound the area the fine-tune learns from (inside it, what is not "
            "labelled counts as unchanged). With nothing selected, the annotation layer's extent is used."
        )
        form = QFormLayout()
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapAllRows)
        form.addRow("Annotation layer", self.labels_combo)
        form.addRow("Training area: selected features of", self.area_combo)
        settings_note = QLabel(
            "The fine-tune uses the rasters and settings (epochs, backbone…) of the task's fine-tune action in the "
            "Run tab.",
            self,
        )
        settings_note.setWordWrap(True)
        settings_note.setStyleSheet("color: gray;")
        self.new_annotation_button = QPushButton("New annotation layer", self)
        self.new_annotation_button.setObjectName("newAnnotationButton")
        self.finetune_button = QPushButton("Fine-tune on selection", self)
        self.finetune_button.setObjectName("finetuneOnSelectionButton")
        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.new_annotation_button)
        layout.addWidget(self.finetune_button)
        layout.addWidget(settings_note)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.new_annotation_button.clicked.connect(self.new_annotation_layer)
        self.finetune_button.clicked.connect(self.finetune_on_selection)
        runner.runningChanged.connect(lambda running: self.finetune_button.setEnabled(not running))

    def _polygon_combo(self, name: str, empty: str) -> QgsMapLayerComboBox:
        combo = QgsMapLayerComboBox(self)
        combo.setObjectName(name)
        combo.setFilters(LAYER_FILTERS["polygons"])
        combo.setAllowEmptyLayer(True, empty)
        combo.setLayer(None)
        shrinkable(combo)
        return combo

    def new_annotation_layer(self) -> QgsVectorLayer | None:
        """A new GeoPackage polygon layer with the task's label field, in the project CRS, in edit mode."""
        project = QgsProject.instance()
        crs = project.crs()
        if not crs.isValid():
            crs = self.iface.mapCanvas().mapSettings().destinationCrs()
        task_id = self.run_tab.task_id
        folder = annotation.default_annotation_dir(project)
        try:
            layer = annotation.new_annotation_layer(task_id, crs, folder, semantic=self.semantic())
        except (OSError, ValueError) as exc:
            self.status.setText(f"The annotation layer could not be created: {exc}")
            return None
        if project.mapLayer(layer.id()) is None:
            project.addMapLayer(layer)
        self.annotation_layer = layer
        self.labels_combo.setLayer(layer)
        self.iface.setActiveLayer(layer)
        self.iface.actionAddFeature().trigger()
        fields = [annotation.LABEL_FIELD.get(task_id) or "label"]
        if self.semantic():
            fields = [name for name, _ in annotation.SEMANTIC_FIELDS[task_id]]
        values = " and ".join(f"'{f}'" for f in fields)
        self.status.setText(f"Draw polygons in '{layer.name()}' (it is in edit mode); each needs its {values} value.")
        return layer

    def semantic(self) -> bool:
        """Whether the task's fine-tune is set to semantic change (mode scd): labels then carry from/to classes."""
        job = self.run_tab.finetune_job()
        if job is None or job.param("mode") is None or self.run_tab.task_id not in annotation.SEMANTIC_FIELDS:
            return False
        return self.run_tab.form_for(job.name).value("mode") == "scd"

    def finetune_on_selection(self) -> JobTask | None:
        """Fine-tune the task's adapter on the annotation layer inside the selected training area."""
        run_tab = self.run_tab
        job = run_tab.finetune_job()
        labels = self.labels_combo.currentLayer()
        if job is None:
            self.status.setText("This task has no fine-tuning job yet.")
            return None
        if not isinstance(labels, QgsVectorLayer):
            self.status.setText("Create or choose the annotation layer first.")
            return None
        if labels.isEditable() and labels.isModified() and not labels.commitChanges(False):
            self.status.setText(f"The edits of '{labels.name()}' could not be saved.")
            return None
        if labels.featureCount() == 0:
            self.status.setText(f"'{labels.name()}' has no polygons yet: draw some first.")
            return None
        previous = run_tab.form
        run_tab.set_job(job.name)
        form = run_tab.form
        if form is not previous:
            carry_layers(previous, form)
        form.set_value("labels", labels)
        field = annotation.LABEL_FIELD.get(run_tab.task_id)
        label_param = next((p for p in job.params if p.kind == "field" and p.parent == "labels"), None)
        if label_param is not None and field and field in labels.fields().names():
            form.set_value(label_param.name, field)
        for param, name in annotation.SEMANTIC_PARAMS.items():
            if job.param(param) is not None and name in labels.fields().names():
                form.set_value(param, name)
        area = self.area_combo.currentLayer() or labels
        extent = None
        if isinstance(area, QgsVectorLayer) and area.selectedFeatureCount() > 0:
            if job.param("aoi") is not None:
                form.set_value("aoi", area)
            note = f"Training area: the {area.selectedFeatureCount()} selected feature(s) of '{area.name()}'."
        else:
            extent = (labels.extent(), labels.crs())
            note = f"Nothing is selected in '{area.name()}': the fine-tune uses the extent of '{labels.name()}'."
        self.status.setText(note)
        run_tab.append_log(note)
        self.runTabWanted.emit()
        task = self.runner.run(aoi_extent=extent)
        if task is None:
            self.status.setText(f"{note} {run_tab.message.text()}")
        return task
