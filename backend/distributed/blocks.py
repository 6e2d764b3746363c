"""The block split of a cluster run, without Ray: parts of a tile grid, their files, the VRT over them, and the
manifest that lets a rerun skip the parts already done.

A part is a rectangle of whole tiles of the job's own tiling (`tiling.tile_grid`); `TiledPass.run(part=…)` gives
its blocks bit for bit as a run over the whole grid does (given the same tile predictions: a model's differ by
float rounding when its tiles are batched otherwise), so the parts put together are the single-machine prediction.
Each part's prediction is written as a GeoTIFF of the predicted channels plus a last band that is 1
where the pixels are valid; a VRT lays the parts side by side on the whole grid for the job's own outputs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from rasterio.windows import Window

from backend.io.raster import Grid
from backend.io.tiling import TiledPass, TileSpec, tile_grid
from backend.io.writer import GeoTiffWriter

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Part:
    """Tile rows [row0, row1) and columns [col0, col1) of scene `scene`, covering pixel window `window`."""

    scene: int
    row0: int
    row1: int
    col0: int
    col1: int
    x: int
    y: int
    width: int
    height: int

    @property
    def id(self) -> str:
        return f"s{self.scene}_r{self.row0}-{self.row1}_c{self.col0}-{self.col1}"

    @property
    def tiles(self) -> tuple[range, range]:
        return range(self.row0, self.row1), range(self.col0, self.col1)

    @property
    def window(self) -> Window:
        return Window(self.x, self.y, self.width, self.height)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def describe(self) -> str:
        """The part as the analyst can find it: its pixel window on the scene."""
        return f"scene {self.scene + 1}, pixels x {self.x}-{self.x + self.width}, y {self.y}-{self.y + self.height}"


def partition(scene: int, height: int, width: int, spec: TileSpec, block: int) -> list[Part]:
    """Parts of about `block` pixels a side, in whole tiles, of even sizes (no sliver of a part at the edge: each
    part but the first row and column also computes the tile row above and the tile column left of it)."""
    rows, cols = tile_grid(height, width, spec)
    per_part = max(1.0, block / spec.stride)
    row_cuts, col_cuts = _cuts(rows, per_part), _cuts(cols, per_part)
    parts = []
    for r0, r1 in itertools.pairwise(row_cuts):
        y0, y1 = r0 * spec.stride, height if r1 == rows else r1 * spec.stride
        for c0, c1 in itertools.pairwise(col_cuts):
            x0, x1 = c0 * spec.stride, width if c1 == cols else c1 * spec.stride
            parts.append(Part(scene, r0, r1, c0, c1, x0, y0, x1 - x0, y1 - y0))
    return parts


def _cuts(n: int, per_part: float) -> list[int]:
    """0 = c0 < c1 < … = n: round(n / per_part) groups (at least one) of as even sizes as can be."""
    groups = max(1, min(n, round(n / per_part)))
    return [round(i * n / groups) for i in range(groups + 1)]


def write_part(tiles: TiledPass, part: Part, grid: Grid, path: Path) -> None:
    """Predict `part` and write it to `path` (renamed into place only once complete)."""
    writing = path.with_name(path.stem + ".writing.tif")
    offset_x, offset_y = part.x, part.y

    try:
        # ZSTD and no overviews: the files are temporary, so speed matters more than size.
        part_grid = grid.window_grid(part.window)
        with GeoTiffWriter(
            writing, part_grid, tiles.channels + 1, "float32", None, block=256, compress="zstd", overviews=False
        ) as out:

            def sink(win: Window, values: np.ndarray, valid: np.ndarray) -> None:
                local = Window(win.col_off - offset_x, win.row_off - offset_y, win.width, win.height)
                out.write(local, np.concatenate([values, valid[None].astype(np.float32)]))

            tiles.run(sink, part=part.tiles)
        os.replace(writing, path)
    finally:
        writing.unlink(missing_ok=True)


def write_vrt(
    path: Path, grid: Grid, bands: int, sources: Iterable[tuple[Window, Path]], data_type: str = "Float32"
) -> None:
    """A VRT of `bands` bands on `grid`, each source file (its bands 1..bands) placed at its window; source paths
    are written relative to the VRT."""
    lines = [f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">']
    if grid.georeferenced:
        t = grid.transform
        lines.append(f"  <SRS>{escape(grid.crs.to_wkt())}</SRS>")
        lines.append(f"  <GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}</GeoTransform>")
    sources = list(sources)
    for b in range(1, bands + 1):
        lines.append(f'  <VRTRasterBand dataType="{data_type}" band="{b}">')
        for win, file in sources:
            rel = escape(os.path.relpath(file, path.parent))
            w, h = int(win.width), int(win.height)
            lines += [
                "    <SimpleSource>",
                f'      <SourceFilename relativeToVRT="1">{rel}</SourceFilename>',
                f"      <SourceBand>{b}</SourceBand>",
                f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>',
                f'      <DstRect xOff="{int(win.col_off)}" yOff="{int(win.row_off)}" xSize="{w}" ySize="{h}"/>',
                "    </SimpleSource>",
            ]
        lines.append("  </VRTRasterBand>")
    lines.append("</VRTDataset>")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def fingerprint(job: str, scenes: list[dict[str, Any]], path_params: Iterable[str], extra: Any = None) -> str:
    """What the parts depend on: the job, its parameters and its input files (size and modification time)."""

    def stat(v: Any) -> Any:
        try:
            st = os.stat(v)
            return [v, st.st_size, st.st_mtime_ns]
        except (OSError, TypeError, ValueError):
            return v

    names = set(path_params)
    described = [{k: stat(v) if k in names and v else v for k, v in sorted(p.items())} for p in scenes]
    blob = json.dumps([job, described, extra], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Manifest:
    """The parts done so far (JSON in the run's state folder, rewritten atomically after each part)."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key
        self.path = folder / MANIFEST
        self.done: dict[str, dict[str, Any]] = {}
        self.stale = False  # a manifest of another run (other inputs or settings) was found and cleared
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                saved = {}
            if saved.get("key") == key:
                self.done = {k: v for k, v in saved.get("done", {}).items() if (folder / f"{k}.tif").is_file()}
            else:
                self.stale = True
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)

    def file(self, part: Part, pass_id: str = "") -> Path:
        return self.folder / f"{pass_id}{part.id}.tif"

    def record(self, name: str, info: dict[str, Any]) -> None:
        self.done[name] = info
        tmp = self.path.with_name(MANIFEST + ".writing")
        tmp.write_text(json.dumps({"key": self.key, "done": self.done}), encoding="utf-8")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
