"""The panel's Inspect tab: review a job's polygons (accept / reject, export as labels) and compare the
before and after layers, or an image and its result (toggle or swipe)."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsMapLayer, QgsVectorLayer
from qgis.PyQt.QtWidgets import QVBoxLayout, QWidget

from rs_peft_qgis.compare import CompareWidget
from rs_peft_qgis.inspection.inspector import ChangeInspector


class InspectTab(QWidget):
    def __init__(self, iface: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.compare = CompareWidget(iface, self)
        self.inspector = ChangeInspector(iface, self)
        layout = QVBoxLayout(self)
        layout.addWidget(self.compare, 0)
        layout.addWidget(self.inspector, 1)

    def show_changes(
        self,
        polygons: QgsVectorLayer,
        inputs: dict[str, QgsMapLayer],
        task: str | None = None,
        result: QgsMapLayer | None = None,
    ) -> None:
        """Review `polygons`, the result of a `task` job; compare the job's before/after layers (`inputs` by
        parameter name) or, for a single image, the image with the job's `result` raster."""
        if inputs.get("before") and inputs.get("after"):
            self.compare.set_layers(inputs["before"], inputs["after"])
        elif inputs.get("image") and result is not None:
            self.compare.set_layers(inputs["image"], result, ("Image", "Result"))
        self.inspector.set_layer(polygons, task)

    def stop(self) -> None:
        self.compare.stop_swipe()  # gives the map tool back and shows the hidden layer again
