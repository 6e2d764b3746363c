"""The backend installer dialog: the installation plan for this computer, run in the background with its
log (the plan and the steps are `installer`'s)."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from qgis.core import QgsApplication
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from rs_peft_qgis import installer
from rs_peft_qgis.dialogs.common import ERROR_STYLE, OK_STYLE, file_widget, fixed_font_view, show_message, wrapped_label
from rs_peft_qgis.session import SESSION
from rs_peft_qgis.settings import Settings
from rs_peft_qgis.tasks import CallbackTask
from rs_peft_qgis.worker_client import RpcError

_STEP_LINE = re.compile(r"Step (\d+) of (\d+): (.*)")
INSTALLER_ERRORS = (installer.InstallerError, RpcError, OSError)


def _show_command(argv: list[str]) -> str:
    return subprocess.list2cmdline(argv) if sys.platform == "win32" else shlex.join(argv)


def torch_build(plan: installer.InstallPlan) -> str:
    """Which torch build the plan installs, in words."""
    for entry in installer.TORCH_WHEEL_INDEXES:
        if entry.url == plan.torch_index_url:
            return f"{plan.torch_spec} for CUDA {entry.cuda} (uses the NVIDIA graphics card)"
    if plan.torch_index_url == installer.CPU_INDEX:
        return f"{plan.torch_spec}, processor-only build (CPU)"
    return f"{plan.torch_spec} from {plan.torch_index_url}"


def describe_plan(plan: installer.InstallPlan, driver: str | None = None, detected: bool = False) -> str:
    """The plan as the user reads it before saying Install."""
    cuda = plan.torch_index_url != installer.CPU_INDEX
    size = "a few GB" if cuda else "several hundred MB"
    lines = [f"Target folder: {plan.venv}"]
    if installer.is_installed(plan.venv):
        lines.append("  A backend environment is already installed there: it will be replaced.")
    lines.append(f"Python used to create it: {plan.base_python}")
    if detected:
        lines.append(f"NVIDIA graphics card: {'driver ' + driver if driver else 'none found'}")
    lines.append(f"PyTorch: {torch_build(plan)}")
    if plan.torch_index_reason:
        lines.append(f"  {plan.torch_index_reason}")
    steps = plan.steps()
    lines += [
        f"Download: {size} from the internet; allow several minutes.",
        f"Log file: {plan.log_path}",
        "",
        f"Steps ({len(steps)}):",
    ]
    for number, step in enumerate(steps, 1):
        optional = " (optional: the backend works without it)" if step.optional else ""
        lines += [f"{number:2d}. {step.label}{optional}", f"    {_show_command(step.argv)}"]
    return "\n".join(lines) + "\n"


class InstallerDialog(QDialog):
    """Shows the installation plan for this computer and runs it in the background with its log.

    Pass `plan` to use a given plan (tests); without one the dialog works it out in a background task
    (`planned(ok)` when ready). `installFinished(ok)` is emitted at the end of an installation.
    """

    planned = pyqtSignal(bool)
    installFinished = pyqtSignal(bool)

    def __init__(self, parent: QWidget | None = None, plan: installer.InstallPlan | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Install the RS PEFT backend")
        self.resize(760, 620)
        self.plan: installer.InstallPlan | None = None
        self.driver: str | None = None
        self._detected = False
        self.succeeded: bool | None = None  # None until an installation ended
        self.failure_line = ""
        self._task: CallbackTask | None = None
        self._plan_task: CallbackTask | None = None
        self._close_when_done = False

        intro = wrapped_label(
            "The backend runs the models in its own Python environment with PyTorch, separate from QGIS. This "
            "creates that environment and installs what it needs from the internet. QGIS stays usable meanwhile."
        )
        self.folder_edit = file_widget(QgsFileWidget.StorageMode.GetDirectory, "Folder for the backend environment")
        self.folder_edit.fileChanged.connect(self._folder_changed)
        self.plan_view = fixed_font_view()
        self.plan_view.setMaximumHeight(230)
        self.log_view = fixed_font_view()
        self.log_view.setPlaceholderText("The installation's output appears here.")
        self.log_view.setMaximumBlockCount(20_000)  # pip can be chatty; the log file keeps everything
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setFormat("Not started")
        self.progress.setValue(0)
        self.status_label = wrapped_label()
        self.install_button = QPushButton("Install")
        self.install_button.clicked.connect(self.install)
        self.install_button.setEnabled(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.setEnabled(False)
        self.use_button = QPushButton("Use this environment")
        self.use_button.clicked.connect(self.use_new_environment)
        self.use_button.setVisible(False)
        close = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        close.rejected.connect(self.reject)

        form = QFormLayout()
        form.addRow("Install into", self.folder_edit)
        row = QHBoxLayout()
        for button in (self.install_button, self.cancel_button, self.use_button):
            row.addWidget(button)
        row.addStretch(1)
        row.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.plan_view)
        layout.addWidget(self.progress)
        layout.addWidget(self.status_label)
        layout.addWidget(self.log_view, 1)
        layout.addLayout(row)

        if plan is not None:
            self._set_plan(plan)
        else:
            self._detect()

    # --- the plan ---
    def _detect(self) -> None:
        self.plan_view.setPlainText("Checking this computer (Python, NVIDIA graphics card)…")
        self.folder_edit.setEnabled(False)

        def work(task: CallbackTask) -> tuple[installer.InstallPlan, str | None]:
            return installer.plan_for_this_machine(), installer.detect_cuda()

        self._plan_task = CallbackTask("RS PEFT: check this computer for the installer", work, INSTALLER_ERRORS)
        self._plan_task.done.connect(self._on_detected)
        QgsApplication.taskManager().addTask(self._plan_task)

    def _on_detected(self, task: CallbackTask) -> None:
        self._plan_task = None
        if task.error:
            self.plan_view.setPlainText(task.error)
            show_message(self.status_label, task.error, ERROR_STYLE)
            self.planned.emit(False)
            return
        plan, self.driver = task.result
        self._detected = True
        self._set_plan(plan)

    def _set_plan(self, plan: installer.InstallPlan) -> None:
        self.plan = plan
        self.folder_edit.blockSignals(True)  # setting the path must not re-plan
        self.folder_edit.setFilePath(str(plan.venv))
        self.folder_edit.blockSignals(False)
        self.folder_edit.setEnabled(True)
        self.plan_view.setPlainText(describe_plan(plan, self.driver, self._detected))
        self.install_button.setEnabled(True)
        self.install_button.setText("Reinstall" if installer.is_installed(plan.venv) else "Install")
        self.planned.emit(True)

    def _folder_changed(self, path: str) -> None:
        if self.plan is None or self.running:
            return
        if not path.strip():  # an emptied field means "keep the folder"
            self._set_plan(self.plan)
            return
        venv = Path(path.strip()).expanduser()
        # A finished install is redone from scratch (the torch build follows the driver); an unfinished one resumed.
        self._set_plan(dataclasses.replace(self.plan, venv=venv, fresh=installer.is_installed(venv)))

    def plan_text(self) -> str:
        return self.plan_view.toPlainText()

    def log_text(self) -> str:
        return self.log_view.toPlainText()

    # --- the installation ---
    @property
    def running(self) -> bool:
        return self._task is not None

    def install(self) -> None:
        if self.plan is None or self.running:
            return
        self.succeeded = None
        self.failure_line = ""
        self.log_view.clear()
        self.use_button.setVisible(False)
        show_message(self.status_label, "Installing… (QGIS stays usable; you can close this window's log later)")
        steps = len(self.plan.steps())
        self.progress.setRange(0, steps)
        self.progress.setValue(0)
        self.progress.setFormat(f"Step 1 of {steps}")
        for widget in (self.install_button, self.folder_edit):
            widget.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._task = CallbackTask("RS PEFT: install the backend", install_work(self.plan), INSTALLER_ERRORS)
        self._task.line.connect(self._on_line)
        self._task.done.connect(self._on_finished)
        QgsApplication.taskManager().addTask(self._task)

    def _on_line(self, line: str) -> None:
        self.log_view.appendPlainText(line)
        match = _STEP_LINE.fullmatch(line)
        if match:
            number, total = int(match[1]), int(match[2])
            self.progress.setRange(0, total)
            self.progress.setValue(number - 1)
            self.progress.setFormat(f"Step {number} of {total}: {match[3]}")

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.cancel_button.setEnabled(False)
            show_message(self.status_label, "Stopping the installation…")

    def _on_finished(self, task: CallbackTask) -> None:
        self._task = None
        assert self.plan is not None
        ok = task.result is True
        self.succeeded = ok
        self.cancel_button.setEnabled(False)
        self.install_button.setEnabled(True)
        self.folder_edit.setEnabled(True)
        if ok:
            self.progress.setValue(self.progress.maximum())
            self.progress.setFormat("Done")
            self.install_button.setText("Reinstall")
            self._after_success()
        else:
            self.progress.setFormat("Stopped")
            # run_plan's last line says what went wrong (failed step, cancel, unusable folder).
            self.failure_line = task.error or task.last_line or "The installation failed."
            line = self.failure_line
            log = f"\nFull log: {self.plan.log_path}" if str(self.plan.log_path) not in line else ""
            show_message(self.status_label, line + log, ERROR_STYLE)
        self.installFinished.emit(ok)
        if self._close_when_done:
            super().reject()

    def _after_success(self) -> None:
        assert self.plan is not None
        python = str(self.plan.python)
        settings = Settings.load()
        text = f"The backend is installed in {self.plan.venv}."
        if not settings.backend_python:
            settings.backend_python = python
            settings.save()
            text += f" RS PEFT uses it from the next job (interpreter: {python})."
        elif Path(settings.backend_python).expanduser() == Path(python):
            text += " RS PEFT already uses this environment."
        else:
            text += f" RS PEFT still uses {settings.backend_python}: click “Use this environment” to switch."
            self.use_button.setVisible(True)
        show_message(self.status_label, text, OK_STYLE)

    def use_new_environment(self) -> None:
        if self.plan is None:
            return
        settings = Settings.load()
        settings.backend_python = str(self.plan.python)
        settings.save()
        self.use_button.setVisible(False)
        show_message(self.status_label, f"RS PEFT uses {self.plan.python} from the next job.", OK_STYLE)

    def reject(self) -> None:
        if self.running:
            answer = QMessageBox.question(
                self, "Stop the installation", "The installation is still running. Stop it and close?"
            )
            if answer == QMessageBox.StandardButton.Yes:
                self._close_when_done = True
                self.cancel()
            return
        super().reject()


def install_work(plan: installer.InstallPlan) -> Callable[[CallbackTask], bool]:
    """installer.run_plan as a task's work: each output line goes to the GUI thread through `task.line`."""

    def work(task: CallbackTask) -> bool:
        def emit(text: str) -> None:
            match = _STEP_LINE.fullmatch(text)  # the task manager's own progress bar follows the steps
            task.report(text, (int(match[1]) - 1) / int(match[2]) if match else None)

        try:
            ok = installer.run_plan(plan, emit, task.isCanceled)
        except OSError as exc:  # e.g. the log folder cannot be written
            emit(f"The installation could not run: {exc}")
            return False
        if ok:
            # A worker still running from the replaced environment would keep using the old files.
            client = SESSION.running
            if client is not None and Path(client.python) == plan.python:
                SESSION.shutdown()
        return ok

    return work
