"""The outputs every change job writes: probability + mask GeoTIFFs, change polygons, scores.

Window by window: `write(win, prob, valid)` streams a block of change probability; closing the
context finishes the rasters; `finish()` vectorizes the mask and returns the job result.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend.io.raster import Grid, RasterSource
from backend.io.rasterize import PolygonBurner
from backend.io.vectorize import vectorize
from backend.io.writer import GeoTiffWriter
from backend.jobs.base import JobContext, OutputDecl, Param
from backend.metrics.change import BinaryConfusion
from backend.protocol import JobResult, Output

PROB_NODATA = -1.0
MASK_NODATA = 255


def pair_reader(
    before: RasterSource, after: RasterSource, grid: Grid, aoi: PolygonBurner | None
) -> Callable[[Window], tuple[np.ndarray, np.ndarray]]:
    """Reads both dates of a window stacked (before bands, then after bands) and where both are valid
    (and inside the area of interest)."""

    def read_pair(win: Window) -> tuple[np.ndarray, np.ndarray]:
        a, va = before.read(win)
        b, vb = after.read(win)
        valid = va & vb
        if aoi is not None:
            valid &= aoi.burn(grid.window_grid(win)) > 0
        return np.concatenate([a, b]), valid

    return read_pair


# The inputs every change map job (CVA, FILF detect) takes, declared once.
MAP_INPUTS = (
    Param("before", str, "Raster of the first date (its grid is the output grid).", required=True, kind="raster"),
    Param(
        "after",
        str,
        "Raster of the second date (any CRS/resolution; aligned on the fly).",
        required=True,
        kind="raster",
    ),
    Param("out_dir", str, "Folder for the results.", required=True, kind="folder"),
    Param("aoi", str, "Polygon layer: only the area inside it is analysed (default: all).", kind="polygons"),
)

DECLARED = (
    OutputDecl("probability", "raster", "Change probability (0-1)"),
    OutputDecl("mask", "raster", "Change mask (1 = change)"),
    OutputDecl("polygons", "vector", "Change polygons (area, confidence)"),
)


class ChangeOutputs:
    def __init__(
        self,
        ctx: JobContext,
        out_dir: Path,
        name: str,
        grid: Grid,
        block: int,
        reference: str | None = None,
        threshold: float = 0.5,
    ) -> None:
        self.ctx, self.grid, self.block, self.threshold = ctx, grid, block, threshold
        self.finals = [
            out_dir / f"{name}_change_probability.tif",
            out_dir / f"{name}_change_mask.tif",
            out_dir / f"{name}_changes.gpkg",
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

    def __enter__(self) -> ChangeOutputs:
        self.prob_w = GeoTiffWriter(
            self.prob_path, self.grid, 1, "float32", PROB_NODATA, ("change probability",), block=self.block
        )
        self.mask_w = GeoTiffWriter(
            self.mask_path, self.grid, 1, "uint8", MASK_NODATA, ("change mask",), Resampling.mode, block=self.block
        )
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.prob_w.__exit__(exc_type)
        self.mask_w.__exit__(exc_type)
        if self.ref is not None:
            self.ref.close()

    def write(self, win: Window, prob: np.ndarray, valid: np.ndarray) -> None:
        """A block of change probability (h, w) in [0, 1]; invalid pixels become nodata."""
        mask = (prob > self.threshold).astype(np.uint8)
        self.prob_w.write(win, prob[None], valid)
        self.mask_w.write(win, mask[None], valid)
        self.changed += int(np.count_nonzero(mask.astype(bool) & valid))
        self.valid_px += int(np.count_nonzero(valid))
        if self.ref is not None:
            r, rv = self.ref.read(win)
            self.confusion.update(mask, r[0] > 0, valid & rv)

    def finish(
        self, simplify_px: float = 0.0, min_area_m2: float = 0.0, extra: dict[str, Any] | None = None
    ) -> JobResult:
        n_polys = vectorize(
            self.mask_path,
            self.gpkg_path,
            layer="changes",
            conf_path=self.prob_path,
            block=self.block,
            simplify_px=simplify_px,
            min_area_m2=min_area_m2,
            class_names={1: "change"},
            on_block_row=lambda d, t: self.ctx.progress(0.9 + 0.1 * d / t, "vectorizing"),
        )
        metrics: dict[str, Any] = dict(extra or {})
        metrics.update(
            changed_fraction=self.changed / self.valid_px if self.valid_px else 0.0,
            changed_pixels=self.changed,
            polygons=n_polys,
        )
        g = self.grid
        if g.crs is not None and not g.crs.is_geographic:
            pixel_area = abs(g.transform.a * g.transform.e - g.transform.b * g.transform.d)
            metrics["changed_area_m2"] = self.changed * pixel_area * g.crs.linear_units_factor[1] ** 2
        if self.ref is not None:
            c = self.confusion
            metrics.update(self.confusion.metrics(), tp=c.tp, fp=c.fp, fn=c.fn, tn=c.tn)
        outputs = [
            Output(
                str(self.finals[0]),
                "raster",
                f"{self.name} change probability",
                "change_probability.qml",
                "probability",
            ),
            Output(str(self.finals[1]), "raster", f"{self.name} change mask", "change_mask.qml", "mask"),
            Output(str(self.finals[2]), "vector", f"{self.name} changes", "change_polygons.qml", "polygons"),
        ]
        return JobResult(outputs=outputs, metrics=metrics)
