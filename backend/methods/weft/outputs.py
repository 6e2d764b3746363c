"""Object segmentation outputs: the object probability, mask and polygons of every map job, and for an adapter
with several object classes also a class raster (0 = background) whose polygons carry their class name."""

from __future__ import annotations

from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend.io.maps import MASK_NODATA, MapOutputs, MapStyle
from backend.io.writer import GeoTiffWriter
from backend.params import OutputDecl
from backend.protocol import JobResult, Output

OBJECTS = MapStyle("object", "objects", {1: "object"}, "object")
CLASSES_OUTPUT = OutputDecl("classes", "raster", "Object class of each pixel (several classes; 0 = background)")


def object_style(class_names: list[str]) -> MapStyle:
    """The maps named after the adapter's one class (e.g. 'building'), or 'object' for several."""
    if len(class_names) == 1:
        return MapStyle("object", "objects", {1: class_names[0]}, "object")
    return OBJECTS


class ObjectClassesOutputs(MapOutputs):
    """MapOutputs for blocks of (object probability, class 1 … K probabilities); the class raster holds the most
    likely class where the object probability passes the threshold, and the polygons follow it."""

    def __init__(self, *args: Any, class_names: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.names = class_names
        final = self.finals[0].with_name(f"{self.name}_object_classes.tif")
        self.finals.append(final)
        self.classes_path = self.ctx.output_path(final)
        self.polygon_source = self.classes_path
        self.polygon_options = {"class_names": {k: name for k, name in enumerate(class_names, 1)}}

    def __enter__(self) -> ObjectClassesOutputs:
        super().__enter__()
        self.classes_w = GeoTiffWriter(
            self.classes_path, self.grid, 1, "uint8", MASK_NODATA, ("object class",), Resampling.mode, block=self.block
        )
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.classes_w.__exit__(exc_type)
        super().__exit__(exc_type, *exc)

    def write(self, win: Window, values: np.ndarray, valid: np.ndarray) -> None:
        prob = values[0]
        super().write(win, prob, valid)
        classes = (values[1:].argmax(0) + 1) * (prob > self.threshold)
        self.classes_w.write(win, classes[None].astype(np.uint8), valid)

    def finish(self, extra: dict[str, Any] | None = None) -> JobResult:
        result = super().finish(extra)
        result.outputs.insert(
            2, Output(str(self.finals[3]), "raster", f"{self.name} object classes", "object_classes.qml", "classes")
        )
        result.metrics["classes"] = self.names
        return result
