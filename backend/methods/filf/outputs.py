"""Semantic change outputs: the change maps of every change job, plus a 2-band from/to class raster and
polygons that carry their from/to classes (one polygon per connected area of one transition)."""

from __future__ import annotations

from typing import Any

import numpy as np

from backend.io.maps import ClassMapOutputs
from backend.params import OutputDecl

CLASSES_OUTPUT = OutputDecl("classes", "raster", "From/to classes of the changed pixels (band 1 date 1, band 2 date 2)")


class SemanticChangeOutputs(ClassMapOutputs):
    """Blocks of (change probability, date-1 class probabilities …, date-2 class probabilities …), 1 + 2·(K+1)
    channels; `class_names[k]` names class k (0 = no change)."""

    descriptions = ("class at date 1", "class at date 2")

    def __init__(self, *args: Any, class_names: list[str], **kwargs: Any) -> None:
        super().__init__(*args, class_names=class_names, **kwargs)
        n = len(class_names)  # transitions are coded from·n + to, 0 where nothing changed
        self.polygon_options = {
            "encode": lambda a: a[0].astype(np.int64) * n + a[1],
            "class_names": {f * n + t: f"{class_names[f]} → {class_names[t]}" for f in range(n) for t in range(n)},
            "fields": {
                "from_class": ("int", lambda code: code // n),
                "to_class": ("int", lambda code: code % n),
                "from_name": ("str", lambda code: class_names[code // n]),
                "to_name": ("str", lambda code: class_names[code % n]),
            },
        }

    def classify(self, values: np.ndarray, marked: np.ndarray) -> np.ndarray:
        n = len(self.names)
        # Class 0 never trains (it is the loss's ignore index): the most likely class among 1..K.
        return np.stack([(values[1 + d * n + 1 : 1 + (d + 1) * n].argmax(0) + 1) * marked for d in (0, 1)])
