"""A callable run off the GUI thread as a QgsTask (starting the worker, reading the adapter library,
planning or running the installer). A backend job with progress and cancel is `job_task.JobTask`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from rs_peft_qgis.worker_client import RpcError


class CallbackTask(QgsTask):
    """Runs `work(task)` in the task manager's thread; `done(task)` is emitted on the GUI thread at the end.

    `result` is what `work` returned; `error` is set instead when it raised: the exception's own message for
    the `expected` kinds (their messages are written for the analyst), "Unexpected error: …" otherwise (an
    exception in a task would vanish silently). `work` may call `report(text, fraction)`: `line(text)` is
    emitted (queued to the GUI thread) and the task manager's progress bar moves.

    A signal rather than a callback: Qt drops the connection when the receiver was deleted meanwhile.
    """

    done = pyqtSignal(object)  # the task itself
    line = pyqtSignal(str)

    def __init__(
        self,
        description: str,
        work: Callable[[CallbackTask], Any],
        expected: tuple[type[BaseException], ...] = (RpcError, OSError),
    ) -> None:
        super().__init__(description, QgsTask.Flag.CanCancel)
        self.work = work
        self.expected = expected
        self.result: Any = None
        self.error = ""
        self.last_line = ""

    def report(self, text: str, fraction: float | None = None) -> None:
        self.last_line = text
        if fraction is not None:
            self.setProgress(100.0 * fraction)
        self.line.emit(text)

    def run(self) -> bool:
        try:
            self.result = self.work(self)
        except self.expected as exc:
            self.error = str(exc)
        except Exception as exc:
            self.error = f"Unexpected error: {type(exc).__name__}: {exc}"
        return not self.error

    def finished(self, ok: bool) -> None:
        if not ok and not self.error:
            self.error = "Stopped before it finished."
        self.done.emit(self)
