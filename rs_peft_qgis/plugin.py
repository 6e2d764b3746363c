"""Plugin entry: menu and toolbar action; the backend worker is started on first use and kept."""

from __future__ import annotations

import json

from qgis.core import Qgis, QgsApplication, QgsMessageLog, QgsTask
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from rs_peft_qgis.backend_env import backend_root, find_backend_python
from rs_peft_qgis.worker_client import RpcError, WorkerClient

MENU = "&RS PEFT"
LOG_TAG = "RS PEFT"


class DiagnosticsTask(QgsTask):
    """Start (or reuse) the worker and read its versions and devices, off the GUI thread."""

    def __init__(self, plugin: RsPeftPlugin) -> None:
        super().__init__("RS PEFT: backend diagnostics", QgsTask.CanCancel)
        self.plugin = plugin
        self.info: dict | None = None
        self.error = ""

    def run(self) -> bool:
        try:
            self.info = self.plugin.worker().info
        except (RpcError, FileNotFoundError) as exc:
            self.error = str(exc)
            return False
        return True

    def finished(self, ok: bool) -> None:
        bar = self.plugin.iface.messageBar()
        self.plugin.diagnostics = self.info if ok else {"error": self.error}
        if ok and self.info:
            QgsMessageLog.logMessage(json.dumps(self.info, indent=2), LOG_TAG, Qgis.Info)
            devices = ", ".join(d["name"] for d in self.info["devices"])
            bar.pushMessage(LOG_TAG, f"Backend {self.info['backend_version']} ready on {devices}.", Qgis.Success, 8)
        else:
            bar.pushMessage(LOG_TAG, f"The backend could not start: {self.error}", Qgis.Critical, 0)


class RsPeftPlugin:
    def __init__(self, iface) -> None:
        self.iface = iface
        self.actions: list[QAction] = []
        self._client: WorkerClient | None = None
        self._task: DiagnosticsTask | None = None
        self.diagnostics: dict | None = None  # the last diagnostics answer (or {"error": ...})

    def initGui(self) -> None:
        icon = QIcon(str(backend_root() / "resources" / "icons" / "rs_peft.svg"))
        action = QAction(icon, "Backend diagnostics", self.iface.mainWindow())
        action.setObjectName("rsPeftDiagnostics")
        action.triggered.connect(self.run_diagnostics)
        self.iface.addPluginToRasterMenu(MENU, action)
        self.actions.append(action)

    def unload(self) -> None:
        for action in self.actions:
            self.iface.removePluginRasterMenu(MENU, action)
        self.actions.clear()
        if self._client is not None:
            self._client.shutdown()
            self._client = None

    def worker(self) -> WorkerClient:
        """The running worker, started with the backend interpreter (never sys.executable)."""
        if self._client is None or not self._client.alive:
            python = find_backend_python()
            if python is None:
                raise FileNotFoundError("No backend Python environment was found; run 'make setup' first.")
            self._client = WorkerClient(python, backend_root())
            self._client.start()
        return self._client

    def run_diagnostics(self) -> None:
        self.diagnostics = None
        self._task = DiagnosticsTask(self)
        QgsApplication.taskManager().addTask(self._task)
