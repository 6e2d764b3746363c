"""Semantic change outputs: the change maps of every change job, plus a 2-band from/to class raster and
polygons that carry their from/to classes (one polygon per connected area of one transition)."""

from __future__ import annotations

from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend.io.maps import MASK_NODATA, MapOutputs
from backend.io.writer import GeoTiffWriter
from backend.params import OutputDecl
from backend.protocol import JobResult, Output

CLASSES_OUTPUT = OutputDecl("classes", "raster", "From/to classes of the changed pixels (band 1 date 1, band 2 date 2)")


class SemanticChangeOutputs(MapOutputs):
    """MapOutputs for (change probability, date-1 class probabilities …, date-2 class probabilities …) blocks
    of 1 + 2·(K+1) channels; `class_names[k]` names class k (0 = no change)."""

    def __init__(self, *args: Any, class_names: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.names = class_names
        n = len(class_names)  # transitions are coded from·n + to, 0 where nothing changed
        final = self.finals[0].with_name(f"{self.name}_change_classes.tif")
        self.finals.append(final)
        self.classes_path = self.ctx.output_path(final)
        self.polygon_source = self.classes_path
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

    def __enter__(self) -> SemanticChangeOutputs:
        super().__enter__()
        self.classes_w = GeoTiffWriter(
            self.classes_path,
            self.grid,
            2,
            "uint8",
            MASK_NODATA,
            ("class at date 1", "class at date 2"),
            Resampling.mode,
            block=self.block,
        )
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.classes_w.__exit__(exc_type)
        super().__exit__(exc_type, *exc)

    def write(self, win: Window, values: np.ndarray, valid: np.ndarray) -> None:
        prob = values[0]
        super().write(win, prob, valid)
        n = len(self.names)
        changed = prob > self.threshold
        # Class 0 never trains (it is the loss's ignore index): the most likely class among 1..K.
        c1, c2 = ((values[1 + d * n + 1 : 1 + (d + 1) * n].argmax(0) + 1) * changed for d in (0, 1))
        self.classes_w.write(win, np.stack([c1, c2]).astype(np.uint8), valid)

    def finish(self, extra: dict[str, Any] | None = None) -> JobResult:
        result = super().finish(extra)
        n = self.name
        result.outputs.insert(
            2, Output(str(self.finals[3]), "raster", f"{n} change classes", "change_classes.qml", "classes")
        )
        result.metrics["classes"] = self.names
        return result
