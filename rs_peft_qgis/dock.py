"""The RS PEFT dock panel: pick a task and a job, fill its form, run it as a QgsTask on the shared
worker, and get styled layers back; inspect changes; annotate and fine-tune.

Everything that talks to the worker runs in a QgsTask (never on the GUI thread); layers are read and
added on the main thread (the job's `on_done`).
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMapLayer,
    QgsMessageLog,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsTask,
    QgsVectorLayer,
)
from qgis.gui import QgsDockWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QStackedWidget,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from rs_peft_qgis import catalog
from rs_peft_qgis.backend_env import backend_root
from rs_peft_qgis.catalog import JobInfo
from rs_peft_qgis.forms import LAYER_FILTERS, FormError, JobForm, default_out_dir, describe_missing, shrinkable
from rs_peft_qgis.job_task import JobTask
from rs_peft_qgis.layers import LayerError, add_outputs, aoi_from_extent, aoi_from_selection, job_input
from rs_peft_qgis.session import SESSION
from rs_peft_qgis.settings import Settings
from rs_peft_qgis.worker_client import RpcError, load_protocol

LOG_TAG = "RS PEFT"
WORK_DIR = "rs_peft_work"  # exports and area-of-interest files, inside the output folder

# Columns of the epoch table: a fine-tune's "epoch" log records decide which appear (the first record of a
# job), in this order. Validation scores listed here are the headline ones; a record with none of them shows
# its own val_* keys instead (readable labels), so that a new task's fine-tune needs no plugin change.
EPOCH_LABELS = {
    "epoch": "Epoch",
    "stage": "Stage",
    "loss": "Loss",
    "val_f1": "Val F1",
    "val_iou": "Val IoU",
    "val_miou": "Val mIoU",
    "val_q2n": "Val Q2n",
    "val_sam": "Val SAM",
    "val_ergas": "Val ERGAS",
}
EPOCH_BASE = ("epoch", "stage", "loss")
MAX_EPOCH_SCORES = 4
STAGES = {"prior": "stage 1 (local priors)", "adapter": "stage 2 (adapters)"}


class AdapterListTask(QgsTask):
    """Read the adapter library from the worker (starting it if needed), off the GUI thread."""

    def __init__(self, on_done: Any) -> None:
        super().__init__("RS PEFT: reading the adapter library", QgsTask.Flag.CanCancel)
        self.on_done = on_done
        self.adapters: list[dict[str, Any]] = []
        self.error = ""

    def run(self) -> bool:
        try:
            answer = SESSION.client().request("adapters.list", {}, timeout=60)
        except RpcError as exc:
            self.error = str(exc)
            return False
        self.adapters = answer.get("adapters", []) if isinstance(answer, dict) else list(answer or [])
        return True

    def finished(self, ok: bool) -> None:
        if self.on_done is not None:
            self.on_done(self)


def extent_in(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem, layer: QgsMapLayer) -> QgsRectangle:
    """`rect` (in `crs`) as a bounding box in the layer's CRS."""
    if not crs.isValid() or not layer.crs().isValid() or crs == layer.crs():
        return QgsRectangle(rect)
    return QgsCoordinateTransform(crs, layer.crs(), QgsProject.instance()).transformBoundingBox(rect)


def selection_file(layer: QgsVectorLayer, work_dir: Path) -> str:
    """The selected polygons of a layer as an area-of-interest file (also from a layer being edited)."""
    try:
        from rs_peft_qgis.annotation import selection_aoi
    except ImportError:
        return aoi_from_selection(layer, work_dir)
    return selection_aoi(layer, work_dir)


def has_pixels(layer: QgsRasterLayer) -> bool:
    """A raster with a pixel grid of its own (web layers have none: they are rendered to export them)."""
    provider = layer.dataProvider()
    return bool(provider is not None and provider.capabilities() & provider.Size and provider.xSize() > 0)


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


def epoch_label(key: str) -> str:
    """'val_q2n' -> 'Val Q2n' (known keys), 'val_kappa_x' -> 'Val kappa x' (others)."""
    words = key.replace("_", " ")
    return EPOCH_LABELS.get(key, words[:1].upper() + words[1:])


def epoch_columns(record: dict[str, Any]) -> list[str]:
    """The epoch table's columns for a fine-tune whose first epoch record is `record`."""
    scores = [k for k in EPOCH_LABELS if k.startswith("val_") and k in record]
    if not scores:
        scores = [k for k in record if k.startswith("val_")][:MAX_EPOCH_SCORES]
    return ["epoch", *(k for k in EPOCH_BASE[1:] if k in record), *scores]


def cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def training_summary(metrics: dict[str, Any]) -> str:
    """' · best epoch 3 of stage 2 (adapters) · validation Q2n 0.900' (what a fine-tune ends with)."""
    parts = []
    if metrics.get("best_epoch"):
        best = f"best epoch {metrics['best_epoch']}"
        stage = metrics.get("best_stage")
        if stage:
            best += f" of {STAGES.get(stage, f'stage {stage}')}"
        parts.append(best)
    for key in epoch_columns(metrics):
        value = metrics.get(key)
        if key.startswith("val_") and isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"validation {epoch_label(key).removeprefix('Val ')} {value:.3f}")
    return "".join(f" · {part}" for part in parts)


def metrics_text(metrics: dict[str, Any], limit: int = 5) -> str:
    """A job's key numbers in one line: 'polygons 12 · changed fraction 3.4 %'."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        label = key.replace("_", " ").replace("val ", "validation ")
        if key.endswith("fraction"):
            parts.append(f"{label} {100 * value:.1f} %")
        elif isinstance(value, int):
            parts.append(f"{label} {value}")
        else:
            parts.append(f"{label} {value:.3g}")
    return " · ".join(parts[:limit])


class RsPeftDock(QgsDockWidget):
    """The panel: Run (task, job, form, progress, log), Inspect (changes, before/after), Annotate."""

    def __init__(self, iface: Any, parent: QWidget | None = None) -> None:
        super().__init__("RS PEFT", parent)
        self.setObjectName("RsPeftDock")
        self.iface = iface
        self.catalog = catalog.load()
        self.P = load_protocol(backend_root())
        self.forms: dict[str, JobForm] = {}
        self.adapters: list[dict[str, Any]] | None = None  # None until the library was read once
        self.current_task: JobTask | None = None
        self.last_layers: list[QgsMapLayer] = []
        self.last_outcome: dict[str, Any] = {}
        self.apply_now_button: QPushButton | None = None
        self.annotation_layer: QgsVectorLayer | None = None
        self._adapter_task: AdapterListTask | None = None
        self._refresh_again = False
        self._run: dict[str, Any] = {}
        self._aoi_override: tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None = None

        self.tabs = QTabWidget(self)
        self.tabs.setObjectName("tabs")
        self.tabs.addTab(self._build_run_tab(), "Run")
        self.tabs.addTab(self._build_inspect_tab(), "Inspect")
        self.tabs.addTab(self._build_annotate_tab(), "Annotate")
        self.setWidget(self.tabs)
        if self.catalog.tasks:
            self.set_task(self.catalog.tasks[0].id)

    # --- building -------------------------------------------------------------------------------
    def _build_run_tab(self) -> QWidget:
        page = QWidget(self)
        top = QFormLayout()
        self.task_combo = shrinkable(QComboBox(page))
        self.task_combo.setObjectName("taskCombo")
        for task in self.catalog.tasks:
            self.task_combo.addItem(task.title, task.id)
        self.job_combo = shrinkable(QComboBox(page))
        self.job_combo.setObjectName("jobCombo")
        top.addRow("Task", self.task_combo)
        top.addRow("Action", self.job_combo)
        self.summary = QLabel(page)
        self.summary.setWordWrap(True)
        self.summary.setStyleSheet("color: gray;")
        self.stack = QStackedWidget(page)
        scroll = QScrollArea(page)
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setMinimumHeight(160)
        scroll.setWidget(self.stack)
        self.message = QLabel(page)
        self.message.setObjectName("message")
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: #b00020;")
        self.message.hide()
        self.run_button = QPushButton("Run", page)
        self.run_button.setObjectName("runButton")
        self.cancel_button = QPushButton("Cancel", page)
        self.cancel_button.setObjectName("cancelButton")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar(page)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.stage = QLabel("", page)
        self.stage.setObjectName("stage")
        self.epoch_table = QTableWidget(0, 0, page)
        self.epoch_table.setObjectName("epochTable")
        self.epoch_keys: list[str] = []
        self.clear_epochs()
        self.epoch_table.verticalHeader().setVisible(False)
        self.epoch_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.epoch_table.setMaximumHeight(140)
        self.log = QPlainTextEdit(page)
        self.log.setObjectName("log")
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)
        self.log.setPlaceholderText("Messages of the jobs appear here.")
        layout = QVBoxLayout(page)
        layout.addLayout(top)
        layout.addWidget(self.summary)
        layout.addWidget(scroll, 3)
        layout.addWidget(self.message)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.stage)
        layout.addWidget(self.epoch_table)
        layout.addWidget(self.log, 1)
        self.task_combo.currentIndexChanged.connect(lambda _: self.set_task(self.task_combo.currentData()))
        self.job_combo.currentIndexChanged.connect(self._job_combo_changed)
        self.run_button.clicked.connect(lambda: self.run())  # not the `checked` argument as an area
        self.cancel_button.clicked.connect(self.cancel)
        return page

    def _optional_widget(self, module: str, name: str, page: QWidget) -> QWidget | None:
        """A widget of another plugin module, or None (with a label on the page) when it is unavailable."""
        try:
            cls = getattr(__import__(f"rs_peft_qgis.{module}", fromlist=[name]), name)
            return cls(self.iface, page)
        except Exception as exc:
            detail = f"{name} unavailable: {exc}\n{traceback.format_exc()}"
            QgsMessageLog.logMessage(detail, LOG_TAG, Qgis.MessageLevel.Warning)
            return None

    def _build_inspect_tab(self) -> QWidget:
        page = QWidget(self)
        layout = QVBoxLayout(page)
        self.inspector = self._optional_widget("inspection", "ChangeInspector", page)
        self.compare = self._optional_widget("compare", "CompareWidget", page)
        if self.inspector is None and self.compare is None:
            layout.addWidget(QLabel("Change inspection is not available in this installation.", page))
        for widget in (self.compare, self.inspector):
            if widget is not None:
                layout.addWidget(widget, 1 if widget is self.inspector else 0)
        return page

    def _build_annotate_tab(self) -> QWidget:
        page = QWidget(self)
        intro = QLabel(
            "Draw polygons of the class to learn (e.g. changed buildings) in a new annotation layer, select the "
            "labelled area (or leave nothing selected to use the layer's extent), then fine-tune an adapter on it.",
            page,
        )
        intro.setWordWrap(True)
        self.labels_combo = QgsMapLayerComboBox(page)
        self.labels_combo.setObjectName("labelsCombo")
        self.labels_combo.setFilters(LAYER_FILTERS["polygons"])
        self.labels_combo.setAllowEmptyLayer(True, "(choose the annotation layer)")
        self.labels_combo.setLayer(None)
        self.area_combo = QgsMapLayerComboBox(page)
        self.area_combo.setObjectName("areaCombo")
        self.area_combo.setFilters(LAYER_FILTERS["polygons"])
        self.area_combo.setAllowEmptyLayer(True, "(the annotation layer itself)")
        self.area_combo.setLayer(None)
        for combo in (self.labels_combo, self.area_combo):
            shrinkable(combo)
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
            page,
        )
        settings_note.setWordWrap(True)
        settings_note.setStyleSheet("color: gray;")
        self.new_annotation_button = QPushButton("New annotation layer", page)
        self.new_annotation_button.setObjectName("newAnnotationButton")
        self.finetune_button = QPushButton("Fine-tune on selection", page)
        self.finetune_button.setObjectName("finetuneOnSelectionButton")
        self.annotate_status = QLabel("", page)
        self.annotate_status.setWordWrap(True)
        layout = QVBoxLayout(page)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.new_annotation_button)
        layout.addWidget(self.finetune_button)
        layout.addWidget(settings_note)
        layout.addWidget(self.annotate_status)
        layout.addStretch(1)
        self.new_annotation_button.clicked.connect(self.new_annotation_layer)
        self.finetune_button.clicked.connect(self.finetune_on_selection)
        return page

    # --- task / job / form ----------------------------------------------------------------------
    @property
    def task_id(self) -> str:
        return self.task_combo.currentData() or ""

    @property
    def job(self) -> JobInfo:
        return self.catalog.jobs[self.job_combo.currentData()]

    @property
    def form(self) -> JobForm:
        return self.form_for(self.job.name)

    def form_for(self, job_name: str) -> JobForm:
        """The form of a job (built on first use and kept, so values survive switching jobs)."""
        form = self.forms.get(job_name)
        if form is None:
            form = JobForm(self.catalog.jobs[job_name], self.stack)
            self.forms[job_name] = form
            self.stack.addWidget(form)
            picker = form.adapter_picker
            if picker is not None:
                picker.refreshRequested.connect(self.refresh_adapters)
                if self.adapters is not None:
                    picker.set_adapters(self.adapters)
                elif self._adapter_task is None:
                    self.refresh_adapters()
        return form

    def set_task(self, task_id: str) -> None:
        info = next((t for t in self.catalog.tasks if t.id == task_id), None)
        if info is None:
            raise KeyError(f"unknown task {task_id!r}")
        if self.task_combo.currentData() != task_id:
            self.task_combo.setCurrentIndex(self.task_combo.findData(task_id))  # re-enters through the signal
            return
        self.job_combo.blockSignals(True)
        self.job_combo.clear()
        for name in info.jobs:
            if name in self.catalog.jobs:
                self.job_combo.addItem(self.catalog.jobs[name].title, name)
        self.job_combo.blockSignals(False)
        self._job_combo_changed()

    def set_job(self, job_name: str) -> None:
        job = self.catalog.jobs[job_name]
        if job.task != self.task_id:
            self.set_task(job.task)
        self.job_combo.setCurrentIndex(self.job_combo.findData(job_name))

    def _job_combo_changed(self, *_: Any) -> None:
        name = self.job_combo.currentData()
        if not name:
            return
        previous = self.stack.currentWidget()
        form = self.form_for(name)
        if isinstance(previous, JobForm) and previous is not form:
            self._carry_layers(previous, form)
        self.stack.setCurrentWidget(form)
        job = self.catalog.jobs[name]
        self.summary.setText(job.summary)
        self.epoch_table.setVisible(job.trains)
        self.show_message("")

    @staticmethod
    def _carry_layers(source: JobForm, target: JobForm) -> None:
        """Rasters chosen in one job of a task (before/after…) stay chosen in the next one."""
        for param in target.job.params:
            if param.kind != "raster" or source.job.param(param.name) is None:
                continue
            layer = source.value(param.name)
            if layer is not None:
                target.set_value(param.name, layer)

    def apply_job(self, task_id: str | None = None) -> JobInfo | None:
        """The task's job that applies an adapter (it has an `adapter` parameter)."""
        return next(
            (j for j in self.catalog.task_jobs(task_id or self.task_id) if any(p.kind == "adapter" for p in j.params)),
            None,
        )

    def finetune_job(self, task_id: str | None = None) -> JobInfo | None:
        return next((j for j in self.catalog.task_jobs(task_id or self.task_id) if j.trains), None)

    # --- adapters -------------------------------------------------------------------------------
    def refresh_adapters(self) -> AdapterListTask | None:
        """Read the adapter library in a QgsTask (starts the worker); the pickers update when it ends."""
        if self._adapter_task is not None:
            self._refresh_again = True  # the running read may predate what changed (a new adapter)
            return self._adapter_task
        self._refresh_again = False
        task = AdapterListTask(self._adapters_read)
        self._adapter_task = task
        QgsApplication.taskManager().addTask(task)
        return task

    def _adapters_read(self, task: AdapterListTask) -> None:
        self._adapter_task = None
        if task.error:
            self.append_log(f"Could not read the adapter library: {task.error}", "warning")
            if self.adapters is None:
                self.adapters = []
        else:
            self.adapters = task.adapters
        for form in self.forms.values():
            if form.adapter_picker is not None:
                form.adapter_picker.set_adapters(self.adapters)
        if self._refresh_again:
            self.refresh_adapters()

    def showEvent(self, event: Any) -> None:
        super().showEvent(event)
        # Only with a worker already running: showing the panel at QGIS start must not start torch.
        # Forms with an adapter picker read the library when first built.
        if self.adapters is None and self._adapter_task is None and SESSION.running is not None:
            self.refresh_adapters()

    # --- running --------------------------------------------------------------------------------
    def show_message(self, text: str) -> None:
        """A message in the panel itself (bad input: the analyst fixes the form and runs again)."""
        self.message.setText(text)
        self.message.setVisible(bool(text))

    def append_log(self, text: str, level: str = "info") -> None:
        prefix = {"warning": "Warning: ", "error": "Error: "}.get(level, "")
        self.log.appendPlainText(f"[{time.strftime('%H:%M:%S')}] {prefix}{text}")

    def run(self, aoi_extent: tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None = None) -> JobTask | None:
        """Check the form, prepare the input files and start the job; None (and a message) if it cannot start."""
        if self.current_task is not None:
            self.show_message("A job is already running; wait for it or cancel it.")
            return None
        job, form = self.job, self.form
        self._aoi_override = aoi_extent
        try:
            params, context = self._prepare(job, form)
        except (FormError, LayerError) as exc:
            self.show_message(str(exc))
            return None
        except OSError as exc:  # an output folder that cannot be created or written
            self.show_message(f"The output folder cannot be used: {exc.strerror or exc} ({exc.filename or ''}).")
            return None
        finally:
            self._aoi_override = None
        self.show_message("")
        task = JobTask(job.name, params, f"RS PEFT: {job.title}", on_done=self._job_done)
        task.progressChanged.connect(self._on_progress)
        task.logged.connect(self._on_log)
        self.current_task = task
        self._run = {"job": job, "form": form, **context}
        self.clear_epochs()
        self.progress.setValue(0)
        self.stage.setText("starting the backend…" if SESSION.running is None else "starting…")
        self.append_log(f"{job.title}: started.")
        self._set_running(True)
        QgsApplication.taskManager().addTask(task)
        return task

    def cancel(self) -> None:
        if self.current_task is not None:
            self.append_log("Cancelling…")
            self.cancel_button.setEnabled(False)
            self.current_task.cancel()

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.finetune_button.setEnabled(not running)

    def _aoi(self, form: JobForm, work_dir: Path) -> tuple[str | None, tuple[QgsRectangle, Any] | None]:
        """The area-of-interest file for the job and its bounding box (with CRS), or (None, None)."""
        if self._aoi_override is not None:
            rect, crs = self._aoi_override
            return aoi_from_extent(rect, crs, work_dir), (rect, crs)
        if form.job.param("aoi") is None:
            return None, None
        choice = form.value("aoi")
        if choice is None:
            return None, None
        if choice == "canvas":
            settings = self.iface.mapCanvas().mapSettings()
            rect, crs = settings.visibleExtent(), settings.destinationCrs()
            if rect.isEmpty() or not rect.isFinite():
                raise FormError("The map shows nothing yet: zoom to the area first, or choose another area.")
            return aoi_from_extent(rect, crs, work_dir), (rect, crs)
        if isinstance(choice, QgsVectorLayer):
            return selection_file(choice, work_dir), (choice.boundingBoxOfSelected(), choice.crs())
        raise FormError("Choose a polygon layer whose selected features bound the area of interest.")

    def _canvas_resolution(self, layer: QgsMapLayer) -> tuple[float | None, QgsRectangle | None]:
        """The map's pixel size and extent in the layer's CRS (web layers are exported at what the map shows)."""
        settings = self.iface.mapCanvas().mapSettings()
        rect, width = settings.visibleExtent(), settings.outputSize().width()
        if rect.isEmpty() or width <= 0:
            return None, None
        local = extent_in(rect, settings.destinationCrs(), layer)
        return local.width() / width, local

    def _prepare(self, job: JobInfo, form: JobForm) -> tuple[dict[str, Any], dict[str, Any]]:
        """Form values -> the job's parameters (files for layers); what the end of the job needs to know."""
        missing = form.missing()
        if missing:
            raise FormError(describe_missing(missing))
        folder = next((p for p in job.params if p.kind == "folder"), None)
        out_dir = Path((form.value(folder.name) if folder else None) or default_out_dir()).expanduser()
        work_dir = out_dir / WORK_DIR
        aoi_path, aoi_box = self._aoi(form, work_dir)
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
                value = self._layer_file(value, work_dir, aoi_box)
            elif p.name == "name" and value and folder is not None:
                unique = free_name(out_dir, value)
                if unique != value:
                    self.append_log(f"Files named '{value}_…' exist in {out_dir}: this run writes '{unique}_…'.")
                value = unique
            if value is not None:
                params[p.name] = value
        return params, {"layers": layers, "out_dir": out_dir}

    def _layer_file(self, layer: QgsMapLayer, work_dir: Path, aoi_box: tuple[QgsRectangle, Any] | None) -> str:
        """The file a job reads for `layer` (exported over the area of interest when it is not a local file)."""
        if not layer.isValid():
            raise LayerError(f"The layer '{layer.name()}' cannot be read.")
        if isinstance(layer, QgsVectorLayer) and layer.isEditable() and layer.isModified():
            if not layer.commitChanges(False):
                errors = "; ".join(layer.commitErrors()) or "unknown error"
                raise LayerError(f"The edits of '{layer.name()}' could not be saved: {errors}")
            self.append_log(f"Saved the edits of '{layer.name()}' so that the job reads them.")
        extent = extent_in(aoi_box[0], aoi_box[1], layer) if aoi_box else None
        resolution = None
        if isinstance(layer, QgsRasterLayer) and not has_pixels(layer):
            resolution, canvas_extent = self._canvas_resolution(layer)
            if resolution is None:
                raise FormError(
                    f"'{layer.name()}' is a web layer: zoom the map to the area first, it is exported at the "
                    "map's resolution."
                )
            extent = extent or canvas_extent
        path = job_input(layer, work_dir, extent, resolution=resolution)
        if not path.startswith(str(work_dir)):
            return path
        self.append_log(f"Exported '{layer.name()}' to {path}.")
        return path

    # --- job signals ----------------------------------------------------------------------------
    def _on_progress(self, fraction: float, stage: str, message: str) -> None:
        self.progress.setValue(round(100 * fraction))
        self.stage.setText(f"{stage} — {message}" if message else stage)

    def clear_epochs(self) -> None:
        """An empty epoch table for the next job (its first epoch record decides the columns)."""
        self.epoch_table.setRowCount(0)
        self._set_epoch_columns(["epoch", "loss"])

    def _set_epoch_columns(self, keys: list[str]) -> None:
        self.epoch_keys = list(keys)
        self.epoch_table.setColumnCount(len(keys))
        self.epoch_table.setHorizontalHeaderLabels([epoch_label(k) for k in keys])
        # Up to four columns share the width; more would elide the numbers in a narrow panel: fit them instead.
        header = self.epoch_table.horizontalHeader()
        wide = len(keys) > 4
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents if wide else QHeaderView.ResizeMode.Stretch)
        header.setStretchLastSection(True)

    def _on_log(self, level: str, message: str, data: Any) -> None:
        self.append_log(message, level)
        if level == "epoch" and isinstance(data, dict):
            table = self.epoch_table
            if table.rowCount() == 0:
                self._set_epoch_columns(epoch_columns(data))  # the job's first record decides the columns
            row = table.rowCount()
            table.insertRow(row)
            # Every score of the epoch (also those without a column) in the row's tooltip.
            tip = "\n".join(f"{epoch_label(k)}: {cell_text(v)}" for k, v in data.items())
            for col, key in enumerate(self.epoch_keys):
                value = data.get(key)
                item = QTableWidgetItem(cell_text(value))
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                align = Qt.AlignmentFlag.AlignRight if numeric else Qt.AlignmentFlag.AlignLeft
                item.setTextAlignment(align | Qt.AlignmentFlag.AlignVCenter)
                item.setToolTip(tip)
                table.setItem(row, col, item)
            table.scrollToBottom()

    def _job_done(self, task: JobTask) -> None:
        if task is not self.current_task:
            return
        run, self._run = self._run, {}
        self.current_task = None
        self._set_running(False)
        outcome = task.outcome or {}
        self.last_outcome = outcome
        bar = self.iface.messageBar()
        job: JobInfo = run["job"]
        if outcome.get("status") == "finished":
            self._succeeded(job, run, outcome)
            return
        self.progress.setValue(0)
        if task.cancelled or (task.isCanceled() and not outcome):
            self.stage.setText("cancelled")
            self.append_log(f"{job.title}: cancelled — nothing was written.")
            bar.pushMessage(LOG_TAG, f"Cancelled — nothing was written ({job.title}).", Qgis.MessageLevel.Info, 5)
        elif outcome.get("code") == self.P.WORKER_DIED:
            self.stage.setText("the backend stopped")
            self.append_log(outcome.get("message") or "The backend worker stopped.", "error")
            bar.pushMessage(
                LOG_TAG,
                f"{job.title}: the backend stopped unexpectedly during the job. It will be restarted for the next "
                "job; run it again.",
                Qgis.MessageLevel.Critical,
                0,
            )
        else:
            self.stage.setText("failed")
            text = task.failure_text()
            self.append_log(f"{job.title} failed: {text}", "error")
            bar.pushMessage(LOG_TAG, f"{job.title}: {text}", Qgis.MessageLevel.Critical, 0)

    def _succeeded(self, job: JobInfo, run: dict[str, Any], outcome: dict[str, Any]) -> None:
        bar = self.iface.messageBar()
        self.progress.setValue(100)
        self.stage.setText("done")
        outputs = [o for o in outcome.get("outputs") or [] if o.get("kind") in ("raster", "vector")]
        group = f"{job.title} — {time.strftime('%H:%M:%S')}"
        try:
            self.last_layers = add_outputs(outputs, group)
        except LayerError as exc:
            self.last_layers = []
            self.append_log(str(exc), "error")
            bar.pushMessage(LOG_TAG, str(exc), Qgis.MessageLevel.Critical, 0)
            return
        metrics = outcome.get("metrics") or {}
        for warning in outcome.get("warnings") or []:
            self.append_log(warning, "warning")
        if outcome.get("warnings"):
            bar.pushMessage(LOG_TAG, f"{job.title}: " + " ".join(outcome["warnings"]), Qgis.MessageLevel.Warning, 0)
        for out in outputs:
            self.append_log(f"Result: {out['path']}")
        if job.trains:
            self._trained(job, metrics)
        else:
            summary = metrics_text(metrics)
            self.append_log(f"{job.title}: finished. {summary}")
            bar.pushMessage(LOG_TAG, f"{job.title}: done. {summary}".strip(), Qgis.MessageLevel.Success, 10)
        by_key = {out.get("key"): layer for out, layer in zip(outputs, self.last_layers, strict=False)}
        if isinstance(by_key.get("polygons"), QgsVectorLayer):
            self._inspect(by_key["polygons"], run["layers"])

    def _inspect(self, polygons: QgsVectorLayer, inputs: dict[str, QgsMapLayer]) -> None:
        """Hand the change polygons (and the before/after layers) to the Inspect tab."""
        if self.compare is not None and inputs.get("before") and inputs.get("after"):
            self.compare.set_layers(inputs["before"], inputs["after"])
        if self.inspector is not None:
            self.inspector.set_layer(polygons)
            self.tabs.setCurrentIndex(1)

    def _trained(self, job: JobInfo, metrics: dict[str, Any]) -> None:
        name = metrics.get("adapter") or ""
        text = f"Adapter '{name}' saved to the library{training_summary(metrics)}."
        self.append_log(text)
        apply = self.apply_job(job.task)
        if apply is not None and name:
            self.form_for(apply.name).set_value("adapter", name)  # picked as soon as the library list has it
        self.refresh_adapters()
        bar = self.iface.messageBar()
        item = bar.createMessage(LOG_TAG, text)
        if apply is not None and name:
            button = QPushButton("Apply now", item)
            button.setObjectName("applyNowButton")
            button.clicked.connect(lambda: self.apply_now(apply.name, name))
            item.layout().addWidget(button)
            self.apply_now_button = button
        bar.pushWidget(item, Qgis.MessageLevel.Success, 0)

    def apply_now(self, job_name: str, adapter: str) -> None:
        """Switch to the task's apply job with the new adapter chosen."""
        self.set_job(job_name)
        self.form.set_value("adapter", adapter)
        self.tabs.setCurrentIndex(0)
        self.setUserVisible(True)

    # --- annotate -------------------------------------------------------------------------------
    def new_annotation_layer(self) -> QgsVectorLayer | None:
        """A new GeoPackage polygon layer with the task's label field, in the project CRS, in edit mode."""
        try:
            from rs_peft_qgis import annotation
        except ImportError:
            self.annotate_status.setText("Annotation layers are not available in this installation.")
            return None
        project = QgsProject.instance()
        crs = project.crs()
        if not crs.isValid():
            crs = self.iface.mapCanvas().mapSettings().destinationCrs()
        try:
            layer = annotation.new_annotation_layer(self.task_id, crs, annotation.default_annotation_dir(project))
        except (OSError, ValueError) as exc:
            self.annotate_status.setText(f"The annotation layer could not be created: {exc}")
            return None
        if project.mapLayer(layer.id()) is None:
            project.addMapLayer(layer)
        self.annotation_layer = layer
        self.labels_combo.setLayer(layer)
        self.iface.setActiveLayer(layer)
        self.iface.actionAddFeature().trigger()
        self.annotate_status.setText(
            f"Draw polygons in '{layer.name()}' (it is in edit mode); each needs its "
            f"'{self._label_field() or 'label'}' value."
        )
        return layer

    def _label_field(self) -> str | None:
        try:
            from rs_peft_qgis.annotation import LABEL_FIELD
        except ImportError:
            return None
        return LABEL_FIELD.get(self.task_id)

    def finetune_on_selection(self) -> JobTask | None:
        """Fine-tune the task's adapter on the annotation layer inside the selected training area."""
        job = self.finetune_job()
        labels = self.labels_combo.currentLayer()
        if job is None:
            self.annotate_status.setText("This task has no fine-tuning job yet.")
            return None
        if not isinstance(labels, QgsVectorLayer):
            self.annotate_status.setText("Create or choose the annotation layer first.")
            return None
        if labels.isEditable() and labels.isModified() and not labels.commitChanges(False):
            self.annotate_status.setText(f"The edits of '{labels.name()}' could not be saved.")
            return None
        if labels.featureCount() == 0:
            self.annotate_status.setText(f"'{labels.name()}' has no polygons yet: draw some first.")
            return None
        previous = self.form
        self.set_job(job.name)
        form = self.form
        if form is not previous:
            self._carry_layers(previous, form)
        form.set_value("labels", labels)
        field = self._label_field()
        label_param = next((p for p in job.params if p.kind == "field" and p.parent == "labels"), None)
        if label_param is not None and field and field in labels.fields().names():
            form.set_value(label_param.name, field)
        area = self.area_combo.currentLayer() or labels
        extent = None
        if isinstance(area, QgsVectorLayer) and area.selectedFeatureCount() > 0:
            if job.param("aoi") is not None:
                form.set_value("aoi", area)
            note = f"Training area: the {area.selectedFeatureCount()} selected feature(s) of '{area.name()}'."
        else:
            extent = (labels.extent(), labels.crs())
            note = f"Nothing is selected in '{area.name()}': the fine-tune uses the extent of '{labels.name()}'."
        self.annotate_status.setText(note)
        self.append_log(note)
        self.tabs.setCurrentIndex(0)
        task = self.run(aoi_extent=extent)
        if task is None:
            self.annotate_status.setText(f"{note} {self.message.text()}")
        return task

    # --- life cycle -----------------------------------------------------------------------------
    def apply_settings(self) -> None:
        """New settings: the device pickers follow the configured device; the library may have moved."""
        device = Settings.load().device
        for form in self.forms.values():
            if form.job.param("device") is not None:
                form.set_value("device", device)
        if self.adapters is not None:
            self.refresh_adapters()

    def shutdown(self) -> None:
        """Cancel what runs and forget callbacks (the plugin is unloading)."""
        if self.current_task is not None:
            self.current_task.on_done = None
            self.current_task.cancel()
            self.current_task = None
        if self._adapter_task is not None:
            self._adapter_task.on_done = None
            self._adapter_task.cancel()
            self._adapter_task = None
        if self.compare is not None and hasattr(self.compare, "stop_swipe"):
            self.compare.stop_swipe()  # gives the map tool back and shows the hidden layer again
