"""Run by `qgis --code` under Xvfb: is the packaged plugin loaded with its menu action? Screenshot."""

import json
import os

from qgis.core import QgsProject
from qgis.PyQt.QtCore import QTimer
from qgis.PyQt.QtWidgets import QAction
from qgis.utils import iface, plugins


def check() -> None:
    actions = [a.text() for a in iface.mainWindow().findChildren(QAction)]
    result = {
        "loaded": "rs_peft_qgis" in plugins,
        "diagnostics_action": "Backend diagnostics" in actions,
        "raster_menu": [a.text() for a in iface.rasterMenu().actions()],
    }
    iface.mainWindow().grab().save(os.environ["SMOKE_PNG"])
    with open(os.environ["SMOKE_OUT"], "w") as f:
        json.dump(result, f)
    QgsProject.instance().clear()
    iface.actionExit().trigger()


QTimer.singleShot(3000, check)
