"""The RS PEFT dock panel: a thin shell that assembles the tabs and holds what they share.

* `run_tab.RunTab`: pick a task and a job, fill its form, progress, epoch table, log; `runner.JobRunner`
  runs the job as a QgsTask on the shared worker and adds styled layers at its end.
* `inspect_tab.InspectTab`: review result polygons, compare before/after (or image/result).
* `annotate_tab.AnnotateTab`: annotate and fine-tune on a selection.
* `adapter_library.AdapterLibrary`: the adapter library the forms' pickers show.
"""

from __future__ import annotations

from typing import Any

from qgis.core import QgsMapLayer, QgsVectorLayer
from qgis.gui import QgsDockWidget
from qgis.PyQt.QtWidgets import QTabWidget, QWidget

from rs_peft_qgis import catalog
from rs_peft_qgis.backend_env import backend_root
from rs_peft_qgis.dock.adapter_library import AdapterLibrary
from rs_peft_qgis.dock.annotate_tab import AnnotateTab
from rs_peft_qgis.dock.inspect_tab import InspectTab
from rs_peft_qgis.dock.run_tab import RunTab
from rs_peft_qgis.dock.runner import JobRunner
from rs_peft_qgis.session import SESSION
from rs_peft_qgis.settings import Settings
from rs_peft_qgis.worker_client import load_protocol


class RsPeftDock(QgsDockWidget):
    """The panel: Run (task, job, form, progress, log), Inspect (changes, before/after), Annotate."""

    def __init__(self, iface: Any, parent: QWidget | None = None) -> None:
        super().__init__("RS PEFT", parent)
        self.setObjectName("RsPeftDock")
        self.iface = iface
        self.catalog = catalog.load()
        self.library = AdapterLibrary(self)
        self.tabs = QTabWidget(self)
        self.tabs.setObjectName("tabs")
        self.run_tab = RunTab(self.catalog, self.library, self.tabs)
        self.runner = JobRunner(iface, self.run_tab, self.library, load_protocol(backend_root()))
        self.inspect_tab = InspectTab(iface, self.tabs)
        self.annotate_tab = AnnotateTab(iface, self.run_tab, self.runner, self.tabs)
        self.tabs.addTab(self.run_tab, "Run")
        self.tabs.addTab(self.inspect_tab, "Inspect")
        self.tabs.addTab(self.annotate_tab, "Annotate")
        self.setWidget(self.tabs)
        self.runner.changesFound.connect(self._show_changes)
        self.runner.runTabWanted.connect(self._show_run_tab)
        self.annotate_tab.runTabWanted.connect(lambda: self.tabs.setCurrentWidget(self.run_tab))

    def _show_changes(self, polygons: QgsVectorLayer, inputs: dict[str, QgsMapLayer], about: dict) -> None:
        """A job's polygons (and its before/after layers, or its image and result) go to the Inspect tab."""
        self.inspect_tab.show_changes(polygons, inputs, about["task"], about["result"])
        self.tabs.setCurrentWidget(self.inspect_tab)

    def _show_run_tab(self) -> None:
        self.tabs.setCurrentWidget(self.run_tab)
        self.setUserVisible(True)

    def showEvent(self, event: Any) -> None:
        super().showEvent(event)
        # Only with a worker already running: showing the panel at QGIS start must not start torch.
        # Forms with an adapter picker read the library when first built.
        if self.library.adapters is None and self.library.task is None and SESSION.running is not None:
            self.library.refresh()

    def apply_settings(self) -> None:
        """New settings: parameters the settings give a default (the device) follow it; the library may have
        moved."""
        settings = Settings.load()
        for form in self.run_tab.forms.values():
            for param in form.job.params:
                value = settings.job_default(param.name)
                if value is not None:
                    form.set_value(param.name, value)
        if self.library.adapters is not None:
            self.library.refresh()

    def shutdown(self) -> None:
        """Cancel what runs and forget callbacks (the plugin is unloading)."""
        self.runner.shutdown()
        self.library.stop()
        self.inspect_tab.stop()
