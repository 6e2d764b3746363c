"""The "RS PEFT" Processing provider: an algorithm for every job in the catalog (toolbox, batch, modeler,
qgis_process)."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt import sip
from qgis.PyQt.QtGui import QIcon

from rs_peft_qgis.backend_env import backend_root
from rs_peft_qgis.catalog import load
from rs_peft_qgis.processing.algorithm import JobAlgorithm

PROVIDER_ID = "rs_peft"
# The registry owns the C++ provider but not its Python side: a provider added without a kept reference
# (`addProvider(RsPeftProvider())`) would lose its algorithms' Python code ("Error creating algorithm
# from createInstance()"). Kept here until the registry deleted it.
_LIVE: list[RsPeftProvider] = []


def icon_path() -> str:
    return str(backend_root() / "resources" / "icons" / "rs_peft.svg")


class RsPeftProvider(QgsProcessingProvider):
    def __init__(self) -> None:
        super().__init__()
        _LIVE[:] = [p for p in _LIVE if not sip.isdeleted(p)]
        _LIVE.append(self)

    def id(self) -> str:
        return PROVIDER_ID

    def name(self) -> str:
        return "RS PEFT"

    def longName(self) -> str:
        return "RS PEFT: foundation models adapted to your imagery"

    def icon(self) -> QIcon:
        return QIcon(icon_path())

    def svgIconPath(self) -> str:
        return icon_path()

    def loadAlgorithms(self) -> None:
        # Generic over the catalog: a job that lands in the backend (and in jobs.json) appears here.
        catalog = load()
        titles = {task.id: task.title for task in catalog.tasks}
        for job in catalog.jobs.values():
            self.addAlgorithm(JobAlgorithm(job, titles.get(job.task, job.task)))
