"""The plugin's dialogs: settings, backend diagnostics (a report to paste into bug reports) and the backend
installer. Slow work (starting the worker, installing) runs in QgsTasks so QGIS never freezes."""

from __future__ import annotations

import configparser
import dataclasses
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from qgis.core import Qgis, QgsApplication, QgsTask
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import PYQT_VERSION_STR, QT_VERSION_STR, QUrl, pyqtSignal
from qgis.PyQt.QtGui import QDesktopServices, QFontDatabase, QGuiApplication
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from rs_peft_qgis import installer
from rs_peft_qgis.backend_env import PLUGIN_DIR, find_backend_python
from rs_peft_qgis.session import SESSION, WorkerSession
from rs_peft_qgis.settings import Settings
from rs_peft_qgis.worker_client import RpcError

ERROR_STYLE = "color: #c0392b;"
OK_STYLE = "color: #1e8449;"
WHAT_TO_DO = (
    "What to do: install the backend from RS PEFT > Install backend…, or choose the backend's Python interpreter "
    "in RS PEFT > Settings (it must be the environment with PyTorch and rasterio)."
)
DEVICE_CHOICES = (
    ("auto", "Automatic (the graphics card when there is one)"),
    ("cpu", "Processor (CPU)"),
    ("cuda", "NVIDIA graphics card (CUDA)"),
)
_STEP_LINE = re.compile(r"Step (\d+) of (\d+): (.*)")


def plugin_version() -> str:
    """The version in metadata.txt (the plugin folder when packaged, the repository root in a checkout)."""
    for folder in (PLUGIN_DIR, *PLUGIN_DIR.parents[:2]):
        path = folder / "metadata.txt"
        if path.is_file():
            meta = configparser.ConfigParser(interpolation=None)
            meta.read(path, encoding="utf-8")
            return meta.get("general", "version", fallback="unknown")
    return "unknown"


def _message(label: QLabel, text: str, style: str = "") -> None:
    label.setStyleSheet(style)
    label.setText(text)
    label.setVisible(bool(text))


def _fixed_font_view() -> QPlainTextEdit:
    view = QPlainTextEdit()
    view.setReadOnly(True)
    view.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
    return view


def _file_widget(mode: QgsFileWidget.StorageMode, title: str, placeholder: str = "") -> QgsFileWidget:
    widget = QgsFileWidget()
    widget.setStorageMode(mode)
    widget.setDialogTitle(title)
    widget.lineEdit().setPlaceholderText(placeholder)
    return widget


def _label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    return label


class _CallbackTask(QgsTask):
    """A QgsTask running `work(task)` off the GUI thread; `done` is emitted on the GUI thread at the end.

    A signal rather than a callback: Qt drops the connection when the dialog was closed and deleted meanwhile.
    """

    done = pyqtSignal(object)  # the task itself

    def __init__(self, description: str, work: Callable[[_CallbackTask], Any]) -> None:
        super().__init__(description, QgsTask.Flag.CanCancel)
        self.work = work
        self.result: Any = None
        self.error = ""

    def run(self) -> bool:
        try:
            self.result = self.work(self)
        except (RpcError, installer.InstallerError, OSError) as exc:
            self.error = str(exc)
        except Exception as exc:  # the dialog shows it; an exception in a task would vanish silently
            self.error = f"Unexpected error: {type(exc).__name__}: {exc}"
        return not self.error

    def finished(self, ok: bool) -> None:
        if not ok and not self.error:
            self.error = "Stopped before it finished."
        self.done.emit(self)


# --- settings ----------------------------------------------------------------------------------------------


class SettingsDialog(QDialog):
    """Backend interpreter, device, model and adapter folders, default output folder (saved in QgsSettings)."""

    def __init__(self, parent: QWidget | None = None, session: WorkerSession = SESSION) -> None:
        super().__init__(parent)
        self.setWindowTitle("RS PEFT settings")
        self.setMinimumWidth(560)
        self.saved = False
        current = Settings.load()
        folders = self._backend_folders(session, current)

        self.python_edit = _file_widget(
            QgsFileWidget.StorageMode.GetFile, "Backend Python interpreter", "(detect automatically)"
        )
        self.python_edit.setFilePath(current.backend_python)
        self.detected_label = _label()
        self.device_combo = QComboBox()
        for value, text in DEVICE_CHOICES:
            self.device_combo.addItem(text, value)
        self.device_combo.setCurrentIndex(max(0, self.device_combo.findData(current.device)))
        self.models_edit = _file_widget(QgsFileWidget.StorageMode.GetDirectory, "Model cache folder", folders[0])
        self.models_edit.setFilePath(current.models_dir)
        self.adapters_edit = _file_widget(QgsFileWidget.StorageMode.GetDirectory, "Adapter library folder", folders[1])
        self.adapters_edit.setFilePath(current.adapters_dir)
        self.out_edit = _file_widget(
            QgsFileWidget.StorageMode.GetDirectory,
            "Default output folder",
            "(a folder next to the project, or the temporary folder)",
        )
        self.out_edit.setFilePath(current.out_dir)
        self.error_label = _label()
        self.error_label.setVisible(False)

        form = QFormLayout()
        form.addRow("Backend interpreter", self.python_edit)
        form.addRow("", self.detected_label)
        form.addRow("Device", self.device_combo)
        form.addRow("Model cache folder", self.models_edit)
        form.addRow("Adapter library folder", self.adapters_edit)
        form.addRow("Default output folder", self.out_edit)
        note = _label(
            "Leave a field empty to use the default. Changes to the interpreter or the folders apply from the next "
            "job: the backend restarts then, so let running jobs finish first."
        )
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(note)
        layout.addWidget(self.error_label)
        layout.addWidget(buttons)

        self.python_edit.fileChanged.connect(self._show_detected)
        self._show_detected()

    @staticmethod
    def _backend_folders(session: WorkerSession, current: Settings) -> tuple[str, str]:
        """Placeholders: the folder a running worker uses where the setting is empty (that is the default)."""
        client = session.running
        folders = client.info.get("folders", {}) if client is not None else {}
        models = folders.get("models") if not current.models_dir else None
        adapters = folders.get("adapters") if not current.adapters_dir else None
        return models or "(backend default)", adapters or "(backend default)"

    def _show_detected(self) -> None:
        found = find_backend_python()
        if found is None:
            text = "Auto-detection: none found — use Install backend…"
        elif self.python_edit.filePath().strip():
            text = f"Auto-detection would use {found} (when the field above is empty)."
        else:
            text = f"Auto-detected: {found}"
        self.detected_label.setText(text)

    def settings(self) -> Settings:
        """The settings as the dialog shows them now (not saved)."""
        return Settings(
            backend_python=self.python_edit.filePath().strip(),
            device=self.device_combo.currentData() or "auto",
            models_dir=self.models_edit.filePath().strip(),
            adapters_dir=self.adapters_edit.filePath().strip(),
            out_dir=self.out_edit.filePath().strip(),
        )

    @staticmethod
    def problem(settings: Settings) -> str:
        """Why these settings cannot be saved, in plain words; "" when they can."""
        if settings.backend_python and not Path(settings.backend_python).expanduser().is_file():
            return (
                f"The backend interpreter '{settings.backend_python}' does not exist. Choose the python file of the "
                "backend environment (for example …/venv/bin/python), or leave the field empty to detect it "
                "automatically."
            )
        for label, value in (
            ("model cache folder", settings.models_dir),
            ("adapter library folder", settings.adapters_dir),
            ("default output folder", settings.out_dir),
        ):
            path = Path(value).expanduser() if value else None
            if path is not None and path.exists() and not path.is_dir():
                return f"The {label} '{value}' is a file, not a folder. Choose a folder."
        return ""

    def accept(self) -> None:
        settings = self.settings()
        problem = self.problem(settings)
        if problem:
            _message(self.error_label, problem, ERROR_STYLE)
            return
        settings.save()
        self.saved = True
        super().accept()


# --- diagnostics -------------------------------------------------------------------------------------------


def _gb(mb: Any) -> str:
    return f"{mb / 1024:.1f} GB" if isinstance(mb, int | float) else "?"


def diagnostics_report(
    info: dict[str, Any] | None, error: str, plugin: dict[str, str], settings: Settings | None = None
) -> str:
    """A Markdown-ish report of both sides of the process boundary, to read or paste into a bug report."""
    lines = [
        "# RS PEFT diagnostics",
        f"Created {datetime.now().astimezone():%Y-%m-%d %H:%M:%S %Z}",
        "",
        "## QGIS side",
        *(f"- {key}: {value}" for key, value in plugin.items()),
    ]
    if settings is not None:
        lines += [
            "",
            "## Settings",
            f"- Backend interpreter: {settings.backend_python or '(detect automatically)'}",
            f"- Device: {settings.device}",
            f"- Model cache folder: {settings.models_dir or '(backend default)'}",
            f"- Adapter library folder: {settings.adapters_dir or '(backend default)'}",
            f"- Default output folder: {settings.out_dir or '(next to the project)'}",
        ]
    lines += ["", "## Backend"]
    if info is None:
        lines += ["The backend could not start:", "", error or "(no message)", "", WHAT_TO_DO]
        return "\n".join(lines) + "\n"
    versions = info.get("versions", {})
    lines += [
        f"- Backend version: {info.get('backend_version', '?')}",
        f"- Python: {info.get('python', '?')} ({info.get('executable', '?')})",
        f"- Platform: {info.get('platform', '?')}",
        f"- torch: {versions.get('torch', '?')}",
        f"- CUDA (torch build): {versions.get('cuda') or 'none (CPU-only build)'}",
        f"- numpy: {versions.get('numpy', '?')}",
        f"- rasterio: {versions.get('rasterio', '?')}",
        f"- GDAL (rasterio's): {versions.get('gdal', '?')}",
        *(f"- {name}: {value}" for name, value in versions.items() if name not in _REPORTED_VERSIONS),
        f"- Jobs: {', '.join(info.get('jobs') or []) or '(none)'}",
        "",
        "## Devices",
    ]
    for device in info.get("devices", []):
        if device.get("type") == "cuda":
            bf16 = ", bf16" if device.get("bf16") else ""
            lines.append(
                f"- {device['name']}: {device.get('model', 'GPU')}, {_gb(device.get('memory_total_mb'))} memory "
                f"({_gb(device.get('memory_free_mb'))} free){bf16}"
            )
        else:
            lines.append(f"- {device['name']}: processor, {device.get('threads', '?')} threads")
    folders = info.get("folders", {})
    lines += [
        f"- Default device: {info.get('default_device', '?')}",
        "",
        "## Folders",
        f"- Worker log: {info.get('log_path') or '(none)'}",
        f"- Model cache: {folders.get('models', '?')}",
        f"- Adapter library: {folders.get('adapters', '?')}",
    ]
    return "\n".join(lines) + "\n"


_REPORTED_VERSIONS = ("torch", "cuda", "numpy", "rasterio", "gdal")


class DiagnosticsDialog(QDialog):
    """Versions, devices and folders of the backend and the plugin as one copyable report.

    `loaded(ok)` is emitted (and `is_loaded` set) once the report is there; `report_text()` is its text.
    """

    loaded = pyqtSignal(bool)

    def __init__(self, parent: QWidget | None = None, session: WorkerSession = SESSION) -> None:
        super().__init__(parent)
        self.setWindowTitle("RS PEFT backend diagnostics")
        self.resize(720, 560)
        self.session = session
        self.is_loaded = False
        self.ok = False
        self.info: dict[str, Any] | None = None
        self._task: _CallbackTask | None = None

        self.status_label = _label()
        self.report_view = _fixed_font_view()
        self.copy_button = QPushButton("Copy report")
        self.copy_button.clicked.connect(self.copy_report)
        self.log_button = QPushButton("Open log folder")
        self.log_button.clicked.connect(self.open_log_folder)
        self.restart_button = QPushButton("Restart backend")
        self.restart_button.clicked.connect(self.restart)
        close = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        close.rejected.connect(self.reject)
        row = QHBoxLayout()
        for button in (self.copy_button, self.log_button, self.restart_button):
            row.addWidget(button)
        row.addStretch(1)
        row.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addWidget(self.status_label)
        layout.addWidget(self.report_view, 1)
        layout.addLayout(row)
        self.refresh()

    def refresh(self, restart: bool = False) -> None:
        """(Re)load the report in a background task; `restart` stops the worker first."""
        if self._task is not None:
            return
        self.is_loaded = False
        self.info = None
        text = "Restarting the backend…" if restart else "Starting the backend…"
        _message(self.status_label, text)
        self.report_view.setPlainText(text)
        for button in (self.copy_button, self.log_button, self.restart_button):
            button.setEnabled(False)

        def work(task: _CallbackTask) -> dict[str, Any]:
            if restart:
                self.session.shutdown()
            client = self.session.client()
            pid = client.proc.pid if client.proc is not None else None
            return {"info": dict(client.info), "python": client.python, "pid": pid}

        self._task = _CallbackTask("RS PEFT: backend diagnostics", work)
        self._task.done.connect(self._on_loaded)
        QgsApplication.taskManager().addTask(self._task)

    def _plugin_side(self, answer: dict[str, Any] | None) -> dict[str, str]:
        if answer is not None:
            interpreter = answer["python"]
        else:
            try:
                interpreter = f"{self.session.python()} (not running)"
            except RpcError:
                interpreter = "(none found)"
        return {
            "Plugin version": plugin_version(),
            "QGIS": Qgis.version(),
            "Qt": f"{QT_VERSION_STR} (PyQt {PYQT_VERSION_STR})",
            "QGIS's Python": sys.version.split()[0],
            "Operating system": platform.platform(),
            "Backend interpreter": interpreter,
            "Worker process id": str(answer["pid"]) if answer else "(not running)",
            "Workers started in this QGIS session": str(self.session.starts),
            "Last worker failure": self.session.last_death or "none",
        }

    def _on_loaded(self, task: _CallbackTask) -> None:
        self._task = None
        answer = task.result if not task.error else None
        self.info = answer["info"] if answer else None
        report = diagnostics_report(self.info, task.error, self._plugin_side(answer), Settings.load())
        self.report_view.setPlainText(report)
        self.ok = self.info is not None
        if self.ok:
            devices = ", ".join(d["name"] for d in self.info.get("devices", []))
            _message(self.status_label, f"The backend is running ({devices}).", OK_STYLE)
        else:
            _message(self.status_label, f"The backend could not start. {WHAT_TO_DO}", ERROR_STYLE)
        self.copy_button.setEnabled(True)
        self.restart_button.setEnabled(True)
        self.log_button.setEnabled(bool(self.log_folder()))
        self.is_loaded = True
        self.loaded.emit(self.ok)

    def report_text(self) -> str:
        return self.report_view.toPlainText()

    def log_folder(self) -> Path | None:
        log_path = (self.info or {}).get("log_path")
        return Path(log_path).parent if log_path else None

    def copy_report(self) -> None:
        QGuiApplication.clipboard().setText(self.report_text())
        _message(self.status_label, "The report is on the clipboard: paste it into your bug report.", OK_STYLE)

    def open_log_folder(self) -> None:
        folder = self.log_folder()
        if folder is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def restart(self) -> None:
        from rs_peft_qgis.job_task import JobTask  # here: job_task imports the session too

        running = [t for t in QgsApplication.taskManager().activeTasks() if isinstance(t, JobTask)]
        if running:
            answer = QMessageBox.question(
                self,
                "Restart the backend",
                f"{len(running)} job(s) are running on the backend. Restarting it stops them. Restart anyway?",
            )
            if answer != QMessageBox.StandardButton.Yes:
                return
        self.refresh(restart=True)


# --- installer ---------------------------------------------------------------------------------------------


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
        lines += [f"{number:2d}. {step.label}", f"    {_show_command(step.argv)}"]
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
        self._task: _InstallTask | None = None
        self._plan_task: _CallbackTask | None = None
        self._close_when_done = False

        intro = _label(
            "The backend runs the models in its own Python environment with PyTorch, separate from QGIS. This "
            "creates that environment and installs what it needs from the internet. QGIS stays usable meanwhile."
        )
        self.folder_edit = _file_widget(QgsFileWidget.StorageMode.GetDirectory, "Folder for the backend environment")
        self.folder_edit.fileChanged.connect(self._folder_changed)
        self.plan_view = _fixed_font_view()
        self.plan_view.setMaximumHeight(230)
        self.log_view = _fixed_font_view()
        self.log_view.setPlaceholderText("The installation's output appears here.")
        self.log_view.setMaximumBlockCount(20_000)  # pip can be chatty; the log file keeps everything
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setFormat("Not started")
        self.progress.setValue(0)
        self.status_label = _label()
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

        def work(task: _CallbackTask) -> tuple[installer.InstallPlan, str | None]:
            return installer.plan_for_this_machine(), installer.detect_cuda()

        self._plan_task = _CallbackTask("RS PEFT: check this computer for the installer", work)
        self._plan_task.done.connect(self._on_detected)
        QgsApplication.taskManager().addTask(self._plan_task)

    def _on_detected(self, task: _CallbackTask) -> None:
        self._plan_task = None
        if task.error:
            self.plan_view.setPlainText(task.error)
            _message(self.status_label, task.error, ERROR_STYLE)
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
        _message(self.status_label, "Installing… (QGIS stays usable; you can close this window's log later)")
        steps = len(self.plan.steps())
        self.progress.setRange(0, steps)
        self.progress.setValue(0)
        self.progress.setFormat(f"Step 1 of {steps}")
        for widget in (self.install_button, self.folder_edit):
            widget.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._task = _InstallTask(self.plan)
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
            _message(self.status_label, "Stopping the installation…")

    def _on_finished(self, ok: bool) -> None:
        task, self._task = self._task, None
        assert self.plan is not None
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
            self.failure_line = (task.last_line if task else "") or "The installation failed."
            line = self.failure_line
            log = f"\nFull log: {self.plan.log_path}" if str(self.plan.log_path) not in line else ""
            _message(self.status_label, line + log, ERROR_STYLE)
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
        _message(self.status_label, text, OK_STYLE)

    def use_new_environment(self) -> None:
        if self.plan is None:
            return
        settings = Settings.load()
        settings.backend_python = str(self.plan.python)
        settings.save()
        self.use_button.setVisible(False)
        _message(self.status_label, f"RS PEFT uses {self.plan.python} from the next job.", OK_STYLE)

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


class _InstallTask(QgsTask):
    """installer.run_plan in the background; each output line goes to the GUI thread through `line`."""

    line = pyqtSignal(str)
    done = pyqtSignal(bool)

    def __init__(self, plan: installer.InstallPlan) -> None:
        super().__init__("RS PEFT: install the backend", QgsTask.Flag.CanCancel)
        self.plan = plan
        self.ok = False
        self.last_line = ""

    def _emit(self, text: str) -> None:
        self.last_line = text
        match = _STEP_LINE.fullmatch(text)
        if match:  # the task manager's own progress bar
            self.setProgress(100.0 * (int(match[1]) - 1) / int(match[2]))
        self.line.emit(text)

    def run(self) -> bool:
        try:
            self.ok = installer.run_plan(self.plan, self._emit, self.isCanceled)
        except OSError as exc:  # e.g. the log folder cannot be written
            self._emit(f"The installation could not run: {exc}")
            self.ok = False
        if self.ok:
            # A worker still running from the replaced environment would keep using the old files.
            client = SESSION.running
            if client is not None and Path(client.python) == self.plan.python:
                SESSION.shutdown()
        return self.ok

    def finished(self, ok: bool) -> None:
        self.done.emit(self.ok)
