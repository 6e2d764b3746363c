"""The outputs of a mapping job (change, objects): probability + mask GeoTIFFs, polygons, scores.

Window by window: `write(win, prob, valid)` streams a block of probability; closing the context finishes the
rasters; `finish()` vectorizes the mask and returns the job result. A `MapStyle` names the files, layers and
QML styles of a task, so every task's maps are written by this one writer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend.context import JobContext
from backend.io.raster import Grid, RasterSource
from backend.io.rasterize import PolygonBurner
from backend.io.vectorize import vectorize
from backend.io.writer import GeoTiffWriter
from backend.metrics.change import BinaryConfusion, too_few_scored
from backend.params import OutputDecl
from backend.protocol import JobResult, Output

PROB_NODATA = -1.0
MASK_NODATA = 255


def stack_reader(
    sources: tuple[RasterSource, ...], grid: Grid, aoi: PolygonBurner | None
) -> Callable[[Window], tuple[np.ndarray, np.ndarray]]:
    """Reads a window of every source stacked (first source's bands first) and where all are valid (and inside
    the area of interest): both dates of a change pair, or one image."""

    def read(win: Window) -> tuple[np.ndarray, np.ndarray]:
        parts = [src.read(win) for src in sources]
        valid = np.logical_and.reduce([v for _, v in parts])
        if aoi is not None:
            valid &= aoi.burn(grid.window_grid(win)) > 0
        return np.concatenate([x for x, _ in parts]), valid

    return read


@dataclass(frozen=True)
class MapStyle:
    """How a task's maps are named and styled: files `<name>_<word>_probability.tif`, `<name>_<word>_mask.tif`,
    `<name>_<features>.gpkg`, with the QML styles `<word>_probability.qml`, `<word>_mask.qml`,
    `<word>_polygons.qml` from resources/styles."""

    word: str  # "change"
    features: str  # "changes"
    class_names: dict[int, str]
    measure: str  # prefix of the metrics: "changed" -> changed_fraction, changed_pixels, changed_area_m2

    def declared(self) -> tuple[OutputDecl, ...]:
        return (
            OutputDecl("probability", "raster", f"{self.word.capitalize()} probability (0-1)"),
            OutputDecl("mask", "raster", f"{self.word.capitalize()} mask (1 = {self.class_names[1]})"),
            OutputDecl("polygons", "vector", f"{self.word.capitalize()} polygons (area, confidence)"),
        )


# The change-detection task's maps, shared by its classical (CVA) and learned (FILF) jobs.
CHANGE = MapStyle("change", "changes", {1: "change"}, "changed")


class MapOutputs:
    def __init__(
        self,
        ctx: JobContext,
        out_dir: Path,
        name: str,
        grid: Grid,
        block: int,
        style: MapStyle,
        reference: str | None = None,
        threshold: float = 0.5,
        simplify_px: float = 0.0,
        min_area_m2: float = 0.0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.simplify_px, self.min_area_m2, self.extra = simplify_px, min_area_m2, extra or {}
        self.ctx, self.grid, self.block, self.threshold, self.style = ctx, grid, block, threshold, style
        self.finals = [
            out_dir / f"{name}_{style.word}_probability.tif",
            out_dir / f"{name}_{style.word}_mask.tif",
            out_dir / f"{name}_{style.features}.gpkg",
        ]
        self.name = name
        self.prob_path, self.mask_path, self.gpkg_path = (ctx.output_path(f) for f in self.finals)
        self.ref = (
            RasterSource(reference, [1], grid=grid, resampling=Resampling.nearest, what="reference")
            if reference
            else None
        )
        self.confusion = BinaryConfusion()
        self.changed = self.valid_px = 0
        # What the polygons are made of (a subclass may vectorize another raster of its own): see vectorize().
        self.polygon_source: Path = self.mask_path
        self.polygon_options: dict[str, Any] = {"class_names": style.class_names}

    def __enter__(self) -> MapOutputs:
        style = self.style
        self.prob_w = GeoTiffWriter(
            self.prob_path, self.grid, 1, "float32", PROB_NODATA, (f"{style.word} probability",), block=self.block
        )
        self.mask_w = GeoTiffWriter(
            self.mask_path,
            self.grid,
            1,
            "uint8",
            MASK_NODATA,
            (f"{style.word} mask",),
            Resampling.mode,
            block=self.block,
        )
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.prob_w.__exit__(exc_type)
        self.mask_w.__exit__(exc_type)
        if self.ref is not None:
            self.ref.close()

    def write(self, win: Window, prob: np.ndarray, valid: np.ndarray) -> None:
        """A block of probability ((1,) h, w) in [0, 1]; invalid pixels become nodata."""
        prob = prob[0] if prob.ndim == 3 else prob
        mask = (prob > self.threshold).astype(np.uint8)
        self.prob_w.write(win, prob[None], valid)
        self.mask_w.write(win, mask[None], valid)
        self.changed += int(np.count_nonzero(mask.astype(bool) & valid))
        self.valid_px += int(np.count_nonzero(valid))
        if self.ref is not None:
            r, rv = self.ref.read(win)
            self.confusion.update(mask, r[0] > 0, valid & rv)

    def finish(self, extra: dict[str, Any] | None = None) -> JobResult:
        """Vectorize the mask (simplified, small polygons dropped) and give the result with its scores."""
        n_polys = vectorize(
            self.polygon_source,
            self.gpkg_path,
            layer=self.style.features,
            conf_path=self.prob_path,
            block=self.block,
            simplify_px=self.simplify_px,
            min_area_m2=self.min_area_m2,
            on_block_row=lambda d, t: self.ctx.progress(0.9 + 0.1 * d / t, "vectorizing"),
            **self.polygon_options,
        )
        metrics: dict[str, Any] = {**self.extra, **(extra or {})}
        m = self.style.measure
        metrics[f"{m}_fraction"] = self.changed / self.valid_px if self.valid_px else 0.0
        metrics[f"{m}_pixels"] = self.changed
        metrics["polygons"] = n_polys
        g = self.grid
        if g.crs is not None and not g.crs.is_geographic:
            pixel_area = abs(g.transform.a * g.transform.e - g.transform.b * g.transform.d)
            metrics[f"{m}_area_m2"] = self.changed * pixel_area * g.crs.linear_units_factor[1] ** 2
        if self.ref is not None:
            c = self.confusion
            few = too_few_scored(c.tp + c.fp + c.fn + c.tn, self.valid_px)
            if few:  # the maps stand; only the scores would mislead
                self.ctx.warn(f"{few}, so no scores are given. Check that the reference covers the result.")
            else:
                metrics.update(self.confusion.metrics(), tp=c.tp, fp=c.fp, fn=c.fn, tn=c.tn)
        w, n = self.style.word, self.name
        outputs = [
            Output(str(self.finals[0]), "raster", f"{n} {w} probability", f"{w}_probability.qml", "probability"),
            Output(str(self.finals[1]), "raster", f"{n} {w} mask", f"{w}_mask.qml", "mask"),
            Output(str(self.finals[2]), "vector", f"{n} {self.style.features}", f"{w}_polygons.qml", "polygons"),
        ]
        return JobResult(outputs=outputs, metrics=metrics)


class ClassMapOutputs(MapOutputs):
    """MapOutputs for blocks of (probability, further channels …) that also write a uint8 class raster,
    `<name>_<word>_classes.tif` (0 where the mask says nothing), made from each block by `classify`; the polygons
    follow it (a subclass sets their `polygon_options`). `class_names[k]` names class k."""

    descriptions: tuple[str, ...] = ()  # one per band of the class raster

    def __init__(self, *args: Any, class_names: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.names = class_names
        final = self.finals[0].with_name(f"{self.name}_{self.style.word}_classes.tif")
        self.finals.append(final)
        self.classes_path = self.ctx.output_path(final)
        self.polygon_source = self.classes_path

    def classify(self, values: np.ndarray, marked: np.ndarray) -> np.ndarray:
        """(bands, h, w) classes of a block of `values`, where `marked` (the mask) holds."""
        raise NotImplementedError

    def __enter__(self) -> ClassMapOutputs:
        super().__enter__()
        self.classes_w = GeoTiffWriter(
            self.classes_path,
            self.grid,
            len(self.descriptions),
            "uint8",
            MASK_NODATA,
            self.descriptions,
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
        self.classes_w.write(win, self.classify(values, prob > self.threshold).astype(np.uint8), valid)

    def finish(self, extra: dict[str, Any] | None = None) -> JobResult:
        result = super().finish(extra)
        w = self.style.word
        classes = Output(str(self.finals[3]), "raster", f"{self.name} {w} classes", f"{w}_classes.qml", "classes")
        result.outputs.insert(2, classes)
        result.metrics["classes"] = self.names
        return result
