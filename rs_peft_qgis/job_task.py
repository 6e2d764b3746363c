"""A backend job as a QgsTask: QGIS's task manager shows its progress and can cancel it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from rs_peft_qgis.session import SESSION, WorkerSession
from rs_peft_qgis.worker_client import RpcError

INVALID_PARAMS = -32602  # JSON-RPC: the worker refused the job's parameters


class JobTask(QgsTask):
    """Runs one job on the shared worker; `outcome` is the worker's job.finished / job.failed answer.

    The callbacks come from the worker client's reader thread; they reach Qt widgets through the
    signals (queued to the main thread). `on_done` runs on the main thread once the task ended.
    """

    progressChanged = pyqtSignal(float, str, str)  # fraction, stage, message
    logged = pyqtSignal(str, str, object)  # level, message, data (dict or None)

    def __init__(
        self,
        job: str,
        params: dict[str, Any],
        description: str,
        on_done: Callable[[JobTask], None] | None = None,
        session: WorkerSession = SESSION,
    ) -> None:
        super().__init__(description, QgsTask.CanCancel)
        self.job = job
        self.params = params
        self.on_done = on_done
        self.session = session
        self.outcome: dict[str, Any] = {}
        self.job_id = ""

    def run(self) -> bool:
        try:
            client = self.session.client()
            handle = client.start_job(self.job, self.params, self._progress, self._log)
        except RpcError as exc:
            # A refused request (bad parameters) or a worker that cannot start: a failure in plain words.
            self.outcome = {
                "status": "failed",
                "code": "INVALID_INPUT" if exc.code > 0 else "WORKER",
                "message": str(exc),
            }
            return False
        self.job_id = handle.job_id
        cancel_sent = False
        while not handle.done.wait(0.2):
            if self.isCanceled() and not cancel_sent:
                client.cancel(handle.job_id)  # the worker stops within about a second and keeps running
                cancel_sent = True
        self.outcome = handle.outcome or {}
        return handle.succeeded

    def _progress(self, fraction: float, stage: str, message: str) -> None:
        self.setProgress(100.0 * fraction)
        self.progressChanged.emit(fraction, stage, message)

    def _log(self, level: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.logged.emit(level, message, data)

    @property
    def cancelled(self) -> bool:
        return self.outcome.get("code") == "CANCELLED"

    def failure_text(self) -> str:
        """The failure as the analyst should read it: what happened, then what to do."""
        message = self.outcome.get("message") or "The job failed."
        hint = self.outcome.get("hint")
        return f"{message} {hint}" if hint else message

    def finished(self, ok: bool) -> None:
        if self.on_done is not None:
            self.on_done(self)
