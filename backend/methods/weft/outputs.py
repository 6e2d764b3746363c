"""Object segmentation outputs: the object probability, mask and polygons of every map job, and for an adapter
with several object classes also a class raster (0 = background) whose polygons carry their class name."""

from __future__ import annotations

from typing import Any

import numpy as np

from backend.io.maps import ClassMapOutputs, MapStyle
from backend.params import OutputDecl

OBJECTS = MapStyle("object", "objects", {1: "object"}, "object")
CLASSES_OUTPUT = OutputDecl("classes", "raster", "Object class of each pixel (several classes; 0 = background)")


def object_style(class_names: list[str]) -> MapStyle:
    """The maps named after the adapter's one class (e.g. 'building'), or 'object' for several."""
    if len(class_names) == 1:
        return MapStyle("object", "objects", {1: class_names[0]}, "object")
    return OBJECTS


class ObjectClassesOutputs(ClassMapOutputs):
    """Blocks of (object probability, class 1 … K probabilities); the class raster holds the most likely class
    where the object probability passes the threshold, and the polygons are named by class."""

    descriptions = ("object class",)

    def __init__(self, *args: Any, class_names: list[str], **kwargs: Any) -> None:
        super().__init__(*args, class_names=class_names, **kwargs)
        self.polygon_options = {"class_names": dict(enumerate(class_names, 1))}

    def classify(self, values: np.ndarray, marked: np.ndarray) -> np.ndarray:
        return ((values[1:].argmax(0) + 1) * marked)[None]
