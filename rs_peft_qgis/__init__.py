"""RS PEFT QGIS plugin. Imports nothing heavy at load time: QGIS calls classFactory."""


def classFactory(iface):
    from rs_peft_qgis.plugin import RsPeftPlugin

    return RsPeftPlugin(iface)
