"""The adapter library as the worker lists it (`adapters.list`), read off the GUI thread; the adapter pickers
of the panel's forms follow it."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QObject, pyqtSignal

from rs_peft_qgis.forms.adapter_picker import AdapterPicker
from rs_peft_qgis.session import SESSION
from rs_peft_qgis.tasks import CallbackTask


def _list_adapters(task: CallbackTask) -> list[dict[str, Any]]:
    answer = SESSION.client().request("adapters.list", {}, timeout=60)
    return answer.get("adapters", []) if isinstance(answer, dict) else list(answer or [])


class AdapterLibrary(QObject):
    """`adapters` is None until the library was read once. `failed(message)` when a read fails."""

    failed = pyqtSignal(str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.adapters: list[dict[str, Any]] | None = None
        self.task: CallbackTask | None = None
        self._pickers: list[AdapterPicker] = []
        self._again = False

    def attach(self, picker: AdapterPicker) -> None:
        """Keep `picker` filled with the library (read now if it never was)."""
        self._pickers.append(picker)
        picker.refreshRequested.connect(self.refresh)
        if self.adapters is not None:
            picker.set_adapters(self.adapters)
        elif self.task is None:
            self.refresh()

    def refresh(self) -> CallbackTask:
        """Read the library in a QgsTask (starts the worker); the pickers update when it ends."""
        if self.task is not None:
            self._again = True  # the running read may predate what changed (a new adapter)
            return self.task
        self._again = False
        self.task = CallbackTask("RS PEFT: reading the adapter library", _list_adapters)
        self.task.done.connect(self._read)
        QgsApplication.taskManager().addTask(self.task)
        return self.task

    def _read(self, task: CallbackTask) -> None:
        self.task = None
        if task.error:
            self.failed.emit(f"Could not read the adapter library: {task.error}")
            if self.adapters is None:
                self.adapters = []
        else:
            self.adapters = task.result
        for picker in self._pickers:
            picker.set_adapters(self.adapters)
        if self._again:
            self.refresh()

    def stop(self) -> None:
        """Cancel a running read and forget it (the panel is closing)."""
        if self.task is not None:
            self.task.done.disconnect(self._read)
            self.task.cancel()
            self.task = None
