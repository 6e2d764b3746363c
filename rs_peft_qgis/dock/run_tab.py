"""The panel's Run tab: task and action pickers, the action's form (built from the catalog, kept per job so
values survive switching), Run/Cancel, progress with stage text, the epoch table and the log. Running the
job is `runner.JobRunner`'s."""

from __future__ import annotations

import time
from typing import Any

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from rs_peft_qgis.catalog import Catalog, JobInfo
from rs_peft_qgis.dock.adapter_library import AdapterLibrary
from rs_peft_qgis.dock.epochs import EpochTable
from rs_peft_qgis.forms.job_form import JobForm
from rs_peft_qgis.forms.widgets import shrinkable


class RunTab(QWidget):
    def __init__(self, catalog: Catalog, library: AdapterLibrary, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.catalog = catalog
        self.library = library
        self.forms: dict[str, JobForm] = {}
        self.task_combo = shrinkable(QComboBox(self))
        self.task_combo.setObjectName("taskCombo")
        for task in catalog.tasks:
            self.task_combo.addItem(task.title, task.id)
        self.job_combo = shrinkable(QComboBox(self))
        self.job_combo.setObjectName("jobCombo")
        top = QFormLayout()
        top.addRow("Task", self.task_combo)
        top.addRow("Action", self.job_combo)
        self.summary = QLabel(self)
        self.summary.setWordWrap(True)
        self.summary.setStyleSheet("color: gray;")
        self.stack = QStackedWidget(self)
        scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setMinimumHeight(160)
        scroll.setWidget(self.stack)
        self.message = QLabel(self)
        self.message.setObjectName("message")
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: #b00020;")
        self.message.hide()
        self.run_button = QPushButton("Run", self)
        self.run_button.setObjectName("runButton")
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setObjectName("cancelButton")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar(self)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.stage = QLabel("", self)
        self.stage.setObjectName("stage")
        self.epoch_table = EpochTable(self)
        self.log = QPlainTextEdit(self)
        self.log.setObjectName("log")
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)
        self.log.setPlaceholderText("Messages of the jobs appear here.")
        layout = QVBoxLayout(self)
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
        library.failed.connect(lambda text: self.append_log(text, "warning"))
        if catalog.tasks:
            self.set_task(catalog.tasks[0].id)

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
            job = self.catalog.jobs[job_name]
            task = self.catalog.task(job.task)
            form = JobForm(job, self.stack, task.hints if task is not None else {})
            self.forms[job_name] = form
            self.stack.addWidget(form)
            for picker in form.adapter_pickers:
                self.library.attach(picker)
        return form

    def set_task(self, task_id: str) -> None:
        info = self.catalog.task(task_id)
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
        """Show the job's form (switching the task if needed)."""
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
            carry_layers(previous, form)
        self.stack.setCurrentWidget(form)
        job = self.catalog.jobs[name]
        self.summary.setText(job.summary)
        self.epoch_table.setVisible(job.trains)
        self.show_message("")

    def apply_job(self, task_id: str | None = None) -> JobInfo | None:
        """The task's job that applies an adapter (it requires one: `adapter`, not an optional adapter to start from
        or to name classes by)."""
        jobs = self.catalog.task_jobs(task_id or self.task_id)
        return next((j for j in jobs if any(p.kind == "adapter" and p.required for p in j.params)), None)

    def finetune_job(self, task_id: str | None = None) -> JobInfo | None:
        """The task's fine-tuning job on labels (`<task>.finetune`; a first stage, landcover.adapt, trains too)."""
        trains = [j for j in self.catalog.task_jobs(task_id or self.task_id) if j.trains]
        return next((j for j in trains if j.name.endswith(".finetune")), trains[0] if trains else None)

    # --- feedback -------------------------------------------------------------------------------
    def show_message(self, text: str) -> None:
        """A message in the panel itself (bad input: the analyst fixes the form and runs again)."""
        self.message.setText(text)
        self.message.setVisible(bool(text))

    def append_log(self, text: str, level: str = "info") -> None:
        prefix = {"warning": "Warning: ", "error": "Error: "}.get(level, "")
        self.log.appendPlainText(f"[{time.strftime('%H:%M:%S')}] {prefix}{text}")

    def set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def show_progress(self, fraction: float, stage: str, message: str) -> None:
        self.progress.setValue(round(100 * fraction))
        self.stage.setText(f"{stage} — {message}" if message else stage)

    def on_log(self, level: str, message: str, data: Any) -> None:
        """A job's log record: in the log; an `epoch` record also as a row of the epoch table; the job's size
        estimate (before its long part starts) also on the progress bar's tooltip for the rest of the run."""
        self.append_log(message, level)
        if level == "epoch" and isinstance(data, dict):
            self.epoch_table.add_record(data)
        elif level == "estimate":
            self.stage.setText(message)
            self.progress.setToolTip(message)


def carry_layers(source: JobForm, target: JobForm) -> None:
    """Rasters chosen in one job of a task (before/after…) stay chosen in the next one."""
    for param in target.job.params:
        if param.kind != "raster" or source.job.param(param.name) is None:
            continue
        layer = source.value(param.name)
        if layer is not None:
            target.set_value(param.name, layer)
