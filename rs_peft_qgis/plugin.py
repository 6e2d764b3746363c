"""Plugin entry: the RS PEFT panel (toolbar button + Raster menu), settings, diagnostics, installer and the
Processing provider. The backend worker is started on first use (shared session) and stopped on unload."""

from __future__ import annotations

import json
from typing import Any

from qgis.core import Qgis, QgsApplication, QgsMessageLog, QgsSettings
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from rs_peft_qgis.backend_env import backend_root
from rs_peft_qgis.dialogs.diagnostics_dialog import DiagnosticsDialog
from rs_peft_qgis.dialogs.installer_dialog import InstallerDialog
from rs_peft_qgis.dialogs.settings_dialog import SettingsDialog
from rs_peft_qgis.dock import RsPeftDock
from rs_peft_qgis.processing.provider import RsPeftProvider
from rs_peft_qgis.session import SESSION
from rs_peft_qgis.tasks import CallbackTask

MENU = "&RS PEFT"
LOG_TAG = "RS PEFT"
DOCK_VISIBLE_KEY = "rs_peft_qgis/dock_visible"


class RsPeftPlugin:
    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.actions: list[QAction] = []
        self.panel_action: QAction | None = None
        self.dock: RsPeftDock | None = None  # built in initGui
        self.provider: RsPeftProvider | None = None  # once registered
        self._task: CallbackTask | None = None
        self._dialogs: list[Any] = []  # non-modal dialogs kept alive while open
        self.diagnostics: dict | None = None  # the last diagnostics answer (or {"error": ...})

    # --- QGIS hooks -------------------------------------------------------------------------------
    def initProcessing(self) -> None:
        """Register the "RS PEFT" Processing provider (an algorithm for every backend job)."""
        if self.provider is not None:
            return  # QGIS calls it for processing plugins, initGui calls it too: register once
        self.provider = RsPeftProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:
        self.initProcessing()
        main = self.iface.mainWindow()
        icon = QIcon(str(backend_root() / "resources" / "icons" / "rs_peft.svg"))
        self.dock = RsPeftDock(self.iface, main)
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)

        self.panel_action = self._action(icon, "RS PEFT panel", "rsPeftPanel", None)
        self.panel_action.setCheckable(True)
        self.panel_action.setToolTip("Show or hide the RS PEFT panel")
        self.dock.setToggleVisibilityAction(self.panel_action)  # keeps the button and the panel in step
        self.iface.addToolBarIcon(self.panel_action)
        self._action(QIcon(), "Settings…", "rsPeftSettings", self.show_settings)
        self._action(QIcon(), "Backend diagnostics…", "rsPeftDiagnostics", self.show_diagnostics)
        self._action(QIcon(), "Install backend…", "rsPeftInstaller", self.show_installer)
        visible = QgsSettings().value(DOCK_VISIBLE_KEY, True, type=bool)
        self.dock.setVisible(bool(visible))

    def _action(self, icon: QIcon, text: str, name: str, slot: Any) -> QAction:
        action = QAction(icon, text, self.iface.mainWindow())
        action.setObjectName(name)
        if slot is not None:
            action.triggered.connect(slot)
        self.iface.addPluginToRasterMenu(MENU, action)
        self.actions.append(action)
        return action

    def unload(self) -> None:
        for action in self.actions:
            self.iface.removePluginRasterMenu(MENU, action)
        if self.panel_action is not None:
            self.iface.removeToolBarIcon(self.panel_action)
            self.panel_action = None
        self.actions.clear()
        for dialog in self._dialogs:
            dialog.close()
        self._dialogs.clear()
        if self.dock is not None:
            QgsSettings().setValue(DOCK_VISIBLE_KEY, self.dock.isUserVisible())
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.setParent(None)
            self.dock.deleteLater()
            self.dock = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        SESSION.shutdown()

    # --- actions ----------------------------------------------------------------------------------
    def _open(self, dialog: Any) -> None:
        self._dialogs = [d for d in self._dialogs if d.isVisible()]
        self._dialogs.append(dialog)
        dialog.show()
        dialog.raise_()

    def show_settings(self) -> None:
        if SettingsDialog(self.iface.mainWindow()).exec() and self.dock is not None:
            self.dock.apply_settings()

    def show_diagnostics(self) -> None:
        """The Diagnostics dialog (it queries the worker in a QgsTask)."""
        self._open(DiagnosticsDialog(self.iface.mainWindow()))

    def show_installer(self) -> None:
        self._open(InstallerDialog(self.iface.mainWindow()))

    def run_diagnostics(self) -> None:
        """Start the worker in a QgsTask and report its versions and devices in the message bar."""
        self.diagnostics = None
        self._task = CallbackTask("RS PEFT: backend diagnostics", lambda task: SESSION.client().info)
        self._task.done.connect(self._diagnosed)
        QgsApplication.taskManager().addTask(self._task)

    def _diagnosed(self, task: CallbackTask) -> None:
        self._task = None
        bar = self.iface.messageBar()
        info = task.result if not task.error else None
        self.diagnostics = info if info is not None else {"error": task.error}
        if info:
            QgsMessageLog.logMessage(json.dumps(info, indent=2), LOG_TAG, Qgis.MessageLevel.Info)
            devices = ", ".join(d["name"] for d in info["devices"])
            text = f"Backend {info['backend_version']} ready on {devices}."
            bar.pushMessage(LOG_TAG, text, Qgis.MessageLevel.Success, 8)
        else:
            bar.pushMessage(LOG_TAG, f"The backend could not start: {task.error}", Qgis.MessageLevel.Critical, 0)
