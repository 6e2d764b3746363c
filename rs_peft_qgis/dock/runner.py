"""Running the Run tab's job: check the form, prepare the input files, start a JobTask on the shared worker,
and at its end add the result layers, report the failure or offer the new adapter.

Everything that talks to the worker runs in a QgsTask (never on the GUI thread); layers are read and added
on the main thread (the task's `on_done`).
"""

from __future__ import annotations

import time
from typing import Any

from qgis.core import Qgis, QgsApplication, QgsMapLayer, QgsVectorLayer
from qgis.PyQt.QtCore import QObject, pyqtSignal
from qgis.PyQt.QtWidgets import QPushButton

from rs_peft_qgis.catalog import JobInfo
from rs_peft_qgis.dock.adapter_library import AdapterLibrary
from rs_peft_qgis.dock.epochs import metrics_text, training_summary
from rs_peft_qgis.dock.job_inputs import Extent, prepare_job
from rs_peft_qgis.dock.run_tab import RunTab
from rs_peft_qgis.forms.job_form import JobForm
from rs_peft_qgis.forms.values import FormError
from rs_peft_qgis.job_task import JobTask
from rs_peft_qgis.layers import LayerError, add_outputs
from rs_peft_qgis.session import SESSION

LOG_TAG = "RS PEFT"


class JobRunner(QObject):
    """One job at a time from the Run tab. `last_layers` / `last_outcome` are those of the last job.

    Signals: `runningChanged(running)`; `changesFound(polygons, inputs, about)` when a job wrote polygons to
    review (`inputs`: its layers by parameter name; `about`: its task and result raster); `runTabWanted()` when
    the Run tab should be shown.
    """

    runningChanged = pyqtSignal(bool)
    changesFound = pyqtSignal(object, object, object)
    runTabWanted = pyqtSignal()

    def __init__(self, iface: Any, tab: RunTab, library: AdapterLibrary, protocol: Any) -> None:
        super().__init__(tab)
        self.iface = iface
        self.tab = tab
        self.library = library
        self.P = protocol
        self.current_task: JobTask | None = None
        self.last_layers: list[QgsMapLayer] = []
        self.last_outcome: dict[str, Any] = {}
        self.apply_now_button: QPushButton | None = None
        self._run: dict[str, Any] = {}
        tab.run_button.clicked.connect(lambda: self.run())  # not the `checked` argument as an area
        tab.cancel_button.clicked.connect(self.cancel)

    def prepare(self, job: JobInfo, form: JobForm, aoi_extent: Extent | None = None) -> tuple[dict, dict]:
        """The job's parameters from the form (files for layers) and what the end of the job needs to know."""
        return prepare_job(job, form, self.iface.mapCanvas(), self.tab.append_log, aoi_extent)

    def run(self, aoi_extent: Extent | None = None) -> JobTask | None:
        """Check the form, prepare the input files and start the job; None (and a message) if it cannot start."""
        tab = self.tab
        if self.current_task is not None:
            tab.show_message("A job is already running; wait for it or cancel it.")
            return None
        job, form = tab.job, tab.form
        try:
            params, context = self.prepare(job, form, aoi_extent)
        except (FormError, LayerError) as exc:
            tab.show_message(str(exc))
            return None
        except OSError as exc:  # an output folder that cannot be created or written
            tab.show_message(f"The output folder cannot be used: {exc.strerror or exc} ({exc.filename or ''}).")
            return None
        tab.show_message("")
        task = JobTask(job.name, params, f"RS PEFT: {job.title}", on_done=self._job_done)
        task.progressChanged.connect(tab.show_progress)
        task.logged.connect(tab.on_log)
        self.current_task = task
        self._run = {"job": job, "form": form, **context}
        tab.epoch_table.reset()
        tab.progress.setValue(0)
        tab.progress.setToolTip("")
        tab.stage.setText("starting the backend…" if SESSION.running is None else "starting…")
        tab.append_log(f"{job.title}: started.")
        self._set_running(True)
        QgsApplication.taskManager().addTask(task)
        return task

    def cancel(self) -> None:
        if self.current_task is not None:
            self.tab.append_log("Cancelling…")
            self.tab.cancel_button.setEnabled(False)
            self.current_task.cancel()

    def _set_running(self, running: bool) -> None:
        self.tab.set_running(running)
        self.runningChanged.emit(running)

    # --- the end of a job -----------------------------------------------------------------------
    def _job_done(self, task: JobTask) -> None:
        if task is not self.current_task:
            return
        run, self._run = self._run, {}
        self.current_task = None
        self._set_running(False)
        outcome = task.outcome or {}
        self.last_outcome = outcome
        tab, bar = self.tab, self.iface.messageBar()
        job: JobInfo = run["job"]
        if outcome.get("status") == "finished":
            self._succeeded(job, run, outcome)
            return
        tab.progress.setValue(0)
        if task.cancelled or (task.isCanceled() and not outcome):
            tab.stage.setText("cancelled")
            tab.append_log(f"{job.title}: cancelled — nothing was written.")
            bar.pushMessage(LOG_TAG, f"Cancelled — nothing was written ({job.title}).", Qgis.MessageLevel.Info, 5)
        elif outcome.get("code") == self.P.WORKER_DIED:
            tab.stage.setText("the backend stopped")
            tab.append_log(outcome.get("message") or "The backend worker stopped.", "error")
            bar.pushMessage(
                LOG_TAG,
                f"{job.title}: the backend stopped unexpectedly during the job. It will be restarted for the next "
                "job; run it again.",
                Qgis.MessageLevel.Critical,
                0,
            )
        else:
            tab.stage.setText("failed")
            text = task.failure_text()
            tab.append_log(f"{job.title} failed: {text}", "error")
            bar.pushMessage(LOG_TAG, f"{job.title}: {text}", Qgis.MessageLevel.Critical, 0)

    def _succeeded(self, job: JobInfo, run: dict[str, Any], outcome: dict[str, Any]) -> None:
        tab, bar = self.tab, self.iface.messageBar()
        tab.progress.setValue(100)
        tab.stage.setText("done")
        outputs = [o for o in outcome.get("outputs") or [] if o.get("kind") in ("raster", "vector")]
        group = f"{job.title} — {time.strftime('%H:%M:%S')}"
        try:
            self.last_layers = add_outputs(outputs, group)
        except LayerError as exc:
            self.last_layers = []
            tab.append_log(str(exc), "error")
            bar.pushMessage(LOG_TAG, str(exc), Qgis.MessageLevel.Critical, 0)
            return
        metrics = outcome.get("metrics") or {}
        for warning in outcome.get("warnings") or []:
            tab.append_log(warning, "warning")
        if outcome.get("warnings"):
            bar.pushMessage(LOG_TAG, f"{job.title}: " + " ".join(outcome["warnings"]), Qgis.MessageLevel.Warning, 0)
        for out in outputs:
            tab.append_log(f"Result: {out['path']}")
        if job.trains:
            self._trained(job, metrics)
        else:
            summary = metrics_text(metrics)
            tab.append_log(f"{job.title}: finished. {summary}")
            bar.pushMessage(LOG_TAG, f"{job.title}: done. {summary}".strip(), Qgis.MessageLevel.Success, 10)
        by_key = {out.get("key"): layer for out, layer in zip(outputs, self.last_layers, strict=False)}
        if isinstance(by_key.get("polygons"), QgsVectorLayer):
            # The raster the polygons were drawn from, to compare with the image.
            result = next((by_key[k] for k in ("classes", "mask") if by_key.get(k) is not None), None)
            self.changesFound.emit(by_key["polygons"], run["layers"], {"task": job.task, "result": result})

    def _trained(self, job: JobInfo, metrics: dict[str, Any]) -> None:
        name = metrics.get("adapter") or ""
        text = f"Adapter '{name}' saved to the library{training_summary(metrics, job.stages)}."
        self.tab.append_log(text)
        step = self._next_step(job)
        if step is not None and name:
            self.tab.form_for(step[0]).set_value(step[1], name)  # picked as soon as the library list has it
        self.library.refresh()
        bar = self.iface.messageBar()
        item = bar.createMessage(LOG_TAG, text)
        if step is not None and name:
            job_name, param, label = step
            button = QPushButton(label, item)
            button.setObjectName("applyNowButton")
            button.clicked.connect(lambda: self.apply_now(job_name, name, param))
            item.layout().addWidget(button)
            self.apply_now_button = button
        bar.pushWidget(item, Qgis.MessageLevel.Success, 0)

    def _next_step(self, job: JobInfo) -> tuple[str, str, str] | None:
        """(job, its adapter parameter, button label) that takes the new adapter: after a first stage on unlabelled
        imagery (landcover.adapt) the fine-tune that starts from it, else the task's apply job."""
        finetune = self.tab.finetune_job(job.task)
        if finetune is not None and finetune.name != job.name:
            start = next((p for p in finetune.params if p.kind == "adapter"), None)
            if start is not None:
                return finetune.name, start.name, "Fine-tune now"
        apply = self.tab.apply_job(job.task)
        return (apply.name, "adapter", "Apply now") if apply is not None else None

    def apply_now(self, job_name: str, adapter: str, param: str = "adapter") -> None:
        """Switch to the next job (apply, or the fine-tune after a first stage) with the new adapter chosen."""
        self.tab.set_job(job_name)
        self.tab.form.set_value(param, adapter)
        self.runTabWanted.emit()

    def shutdown(self) -> None:
        """Cancel what runs and forget its callback (the plugin is unloading)."""
        if self.current_task is not None:
            self.current_task.on_done = None
            self.current_task.cancel()
            self.current_task = None
