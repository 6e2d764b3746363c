"""landcover.map's outputs, streamed block by block: the class raster (uint8, 1 … K, with an embedded colour
table), the confidence raster (the winning class's probability) and the class polygons (class, name, area,
mean confidence). Each layer gets a QGIS style file beside it (`<file>.qml`, which QGIS loads by default) that
names the adapter's classes, since every adapter has its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend.context import JobContext
from backend.io.raster import Grid
from backend.io.vectorize import vectorize
from backend.io.writer import GeoTiffWriter
from backend.params import OutputDecl
from backend.protocol import JobResult, Output

CLASS_NODATA = 0  # class 0 is "unlabelled": never predicted, so it marks nodata
CONF_NODATA = -1.0
OUTPUTS = (
    OutputDecl("classes", "raster", "Land-cover class of each pixel (colour table with the adapter's class names)"),
    OutputDecl("confidence", "raster", "Probability of the mapped class (0-1)"),
    OutputDecl("polygons", "vector", "Land-cover polygons (class, name, area, mean confidence)"),
)
# Colours for class names that say what they are; other classes take the qualitative palette in order.
NAMED_COLOURS = {
    "water": "#1f78b4",
    "cloud": "#f0f0f0",
    "shadow": "#4d4d4d",
    "snow": "#a6e3f5",
    "ice": "#a6e3f5",
    "clear": "#8fbc5a",
    "forest": "#1b7837",
    "tree": "#1b7837",
    "grass": "#a6d96a",
    "vegetation": "#33a02c",
    "crop": "#f6e05e",
    "agricult": "#f6e05e",
    "urban": "#d7301f",
    "built": "#d7301f",
    "building": "#d7301f",
    "road": "#969696",
    "bare": "#c2a878",
    "soil": "#c2a878",
    "sand": "#f4d9a6",
    "wetland": "#6a51a3",
}
PALETTE = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c", "#fabebe",
    "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1", "#000075", "#808080",
)  # fmt: skip


def class_colours(names: list[str]) -> dict[int, str]:
    """A colour per class 1 … K (names[k] names class k; names[0] is "unlabelled")."""
    colours, spare = {}, iter(PALETTE * (1 + len(names) // len(PALETTE)))
    for k, name in enumerate(names[1:], 1):
        key = next((c for word, c in NAMED_COLOURS.items() if word in name.lower()), None)
        colours[k] = key or next(spare)
    return colours


def _rgba(colour: str) -> tuple[int, int, int, int]:
    return (int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16), 255)


def raster_style(names: list[str]) -> str:
    entries = "\n".join(
        f'        <paletteEntry value="{k}" label={quoteattr(names[k])} color="{c}" alpha="255"/>'
        for k, c in class_colours(names).items()
    )
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.40.6-Bratislava" styleCategories="Symbology">
  <pipe>
    <rasterrenderer type="paletted" band="1" opacity="0.8" alphaBand="-1" nodataColor="">
      <colorPalette>
{entries}
      </colorPalette>
    </rasterrenderer>
  </pipe>
</qgis>
"""


def polygon_style(names: list[str]) -> str:
    colours = class_colours(names)
    categories = "\n".join(
        f'      <category render="true" symbol="{i}" value="{k}" label={quoteattr(names[k])}/>'
        for i, k in enumerate(colours)
    )
    symbols = "\n".join(
        f"""      <symbol type="fill" name="{i}" alpha="0.6" clip_to_extent="1" force_rhr="0">
        <layer class="SimpleFill" enabled="1" locked="0" pass="0">
          <Option type="Map">
            <Option name="color" type="QString" value="{",".join(map(str, _rgba(c)))}"/>
            <Option name="outline_color" type="QString" value="35,35,35,255"/>
            <Option name="outline_width" type="QString" value="0.2"/>
            <Option name="style" type="QString" value="solid"/>
          </Option>
        </layer>
      </symbol>"""
        for i, c in enumerate(colours.values())
    )
    return f"""<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>
<qgis version="3.40.6-Bratislava" styleCategories="Symbology">
  <renderer-v2 type="categorizedSymbol" attr="class" symbollevels="0" enableorderby="0" forceraster="0">
    <categories>
{categories}
    </categories>
    <symbols>
{symbols}
    </symbols>
  </renderer-v2>
</qgis>
"""


class LandCoverOutputs:
    """A Sink: `write(win, probabilities (K, h, w) of classes 1 … K, valid)`, then `finish()`."""

    def __init__(
        self,
        ctx: JobContext,
        out_dir: Path,
        name: str,
        grid: Grid,
        block: int,
        class_names: list[str],
        simplify_px: float = 0.0,
        min_area_m2: float = 0.0,
    ) -> None:
        self.ctx, self.grid, self.block, self.names = ctx, grid, block, class_names
        self.simplify_px, self.min_area_m2 = simplify_px, min_area_m2
        self.finals = [
            out_dir / f"{name}_landcover_classes.tif",
            out_dir / f"{name}_landcover_confidence.tif",
            out_dir / f"{name}_landcover.gpkg",
        ]
        self.layer_names = [f"{name} land cover", f"{name} land-cover confidence", f"{name} land-cover polygons"]
        self.paths = [ctx.output_path(f) for f in self.finals]
        self.counts = np.zeros(len(class_names), np.int64)

    def __enter__(self) -> LandCoverOutputs:
        self.classes_w = GeoTiffWriter(
            self.paths[0], self.grid, 1, "uint8", CLASS_NODATA, ("land-cover class",), Resampling.mode, self.block
        )
        self.classes_w.ds.write_colormap(
            1, {0: (0, 0, 0, 0)} | {k: _rgba(c) for k, c in class_colours(self.names).items()}
        )
        self.conf_w = GeoTiffWriter(
            self.paths[1], self.grid, 1, "float32", CONF_NODATA, ("class probability",), block=self.block
        )
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.classes_w.__exit__(exc_type)
        self.conf_w.__exit__(exc_type)

    def write(self, win: Window, values: np.ndarray, valid: np.ndarray) -> None:
        classes = (values.argmax(0) + 1).astype(np.uint8)
        self.classes_w.write(win, classes[None], valid)
        self.conf_w.write(win, values.max(0)[None], valid)
        self.counts += np.bincount(classes[valid], minlength=len(self.counts))[: len(self.counts)]

    def finish(self) -> JobResult:
        n_polys = vectorize(
            self.paths[0],
            self.paths[2],
            layer="landcover",
            conf_path=self.paths[1],
            block=self.block,
            simplify_px=self.simplify_px,
            min_area_m2=self.min_area_m2,
            class_names=dict(enumerate(self.names)),
            on_block_row=lambda d, t: self.ctx.progress(0.9 + 0.1 * d / t, "vectorizing"),
        )
        for final, text in ((self.finals[0], raster_style(self.names)), (self.finals[2], polygon_style(self.names))):
            self.ctx.output_path(final.with_suffix(".qml")).write_text(text, encoding="utf-8")
        total = int(self.counts.sum())
        g = self.grid
        metrics: dict[str, Any] = {"classes": self.names[1:], "polygons": n_polys, "mapped_pixels": total}
        metrics["class_fractions"] = {
            self.names[k]: float(self.counts[k] / total) if total else 0.0 for k in range(1, len(self.names))
        }
        if g.crs is not None and not g.crs.is_geographic:
            pixel_area = abs(g.transform.a * g.transform.e) * g.crs.linear_units_factor[1] ** 2
            metrics["class_areas_m2"] = {
                self.names[k]: float(self.counts[k] * pixel_area) for k in range(1, len(self.names))
            }
        outputs = [
            Output(str(self.finals[0]), "raster", self.layer_names[0], "", "classes"),
            Output(str(self.finals[1]), "raster", self.layer_names[1], "landcover_confidence.qml", "confidence"),
            Output(str(self.finals[2]), "vector", self.layer_names[2], "", "polygons"),
        ]
        return JobResult(outputs=outputs, metrics=metrics)
