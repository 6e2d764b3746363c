"""Class or mask raster -> GeoPackage polygons (class, area in m², mean confidence), block by block.

Each block is labelled into 4-connected components of equal class; components that touch across
a block edge are joined (union-find) and their pieces unioned into one polygon, so the result
equals whole-raster polygonization while memory stays bounded by block size x row width / block.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fiona
import numpy as np
import rasterio
import shapely
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import shapes
from rasterio.warp import transform_geom
from rasterio.windows import Window
from scipy import ndimage
from shapely.geometry import MultiPolygon, mapping, shape

from backend.io.raster import Grid
from backend.io.tiling import block_windows

STRUCTURE_4 = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])


class AreaCalculator:
    """Polygon area in square metres for any CRS (local UTM for geographic ones); None in pixel space."""

    def __init__(self, grid: Grid) -> None:
        self.crs = grid.crs
        self.utm = None
        self.factor = 1.0
        if self.crs is None:
            return
        if self.crs.is_geographic:
            lon, lat = grid.transform * (grid.width / 2, grid.height / 2)
            zone = int((lon + 180) // 6) % 60 + 1
            self.utm = f"EPSG:{32600 + zone if lat >= 0 else 32700 + zone}"
        else:
            self.factor = self.crs.linear_units_factor[1] ** 2

    def __call__(self, geom: shapely.Geometry) -> float | None:
        if self.crs is None:
            return None
        if self.utm is not None:
            return float(shape(transform_geom(self.crs, self.utm, mapping(geom))).area)
        return float(geom.area * self.factor)


@dataclass
class _Piece:
    geom: shapely.Geometry
    conf_sum: float
    count: int
    cls: int


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def vectorize(
    class_path: str | Path,
    out_path: str | Path,
    layer: str,
    conf_path: str | Path | None = None,
    block: int = 512,
    simplify_px: float = 0.0,
    min_area_m2: float = 0.0,
    class_names: dict[int, str] | None = None,
    background: int = 0,
    on_block_row: Callable[[int, int], None] | None = None,
    encode: Callable[[np.ndarray], np.ndarray] | None = None,
    fields: dict[str, tuple[str, Callable[[int], Any]]] | None = None,
) -> int:
    """Polygonize every non-background class of band 1 of `class_path`; returns the feature count.

    `encode` makes the class of each pixel from all bands ((bands, h, w) -> (h, w), e.g. a from/to pair of
    classes); `fields` adds attributes computed from a polygon's class: {name: (fiona type, class -> value)}.

    Blocks are visited row by row. Components that touch across a block edge are joined; a
    group is written out as soon as no piece of it touches the bottom of the current block row.
    """
    with warnings.catch_warnings(category=NotGeoreferencedWarning, action="ignore"), rasterio.open(class_path) as cds:
        grid = Grid.of(cds)
        conf_ds = rasterio.open(conf_path) if conf_path else None
        area_of = AreaCalculator(grid)
        pixel_area = abs(grid.transform.a * grid.transform.e - grid.transform.b * grid.transform.d)
        tol = simplify_px * math.sqrt(pixel_area)
        schema = {
            "geometry": "MultiPolygon",
            "properties": {"class": "int", "class_name": "str", "area_m2": "float", "confidence": "float"}
            | {name: kind for name, (kind, _) in (fields or {}).items()},
        }
        crs = fiona.crs.CRS.from_wkt(grid.crs.to_wkt()) if grid.crs else None
        uf, pieces, count = _UnionFind(), {}, 0
        with fiona.open(out_path, "w", driver="GPKG", layer=layer, schema=schema, crs=crs) as sink:

            def finalize(ids: list[int]) -> None:
                nonlocal count
                groups: dict[int, list[_Piece]] = {}
                for i in ids:
                    groups.setdefault(uf.find(i), []).append(pieces.pop(i))
                for i in ids:  # whole groups close together, so nothing else points at these
                    uf.parent.pop(i, None)
                records = []
                for parts in groups.values():
                    geom = parts[0].geom if len(parts) == 1 else shapely.union_all([p.geom for p in parts])
                    if tol > 0:
                        geom = geom.simplify(tol, preserve_topology=True)
                    area = area_of(geom)
                    if min_area_m2 > 0 and (area if area is not None else geom.area) < min_area_m2:
                        continue
                    n = sum(p.count for p in parts)
                    if not isinstance(geom, MultiPolygon):
                        geom = MultiPolygon([geom])
                    records.append(
                        {
                            "geometry": mapping(geom),
                            "properties": {
                                "class": parts[0].cls,
                                "class_name": (class_names or {}).get(parts[0].cls, str(parts[0].cls)),
                                "area_m2": area,
                                "confidence": sum(p.conf_sum for p in parts) / n if conf_ds else None,
                            }
                            | {name: value(parts[0].cls) for name, (_, value) in (fields or {}).items()},
                        }
                    )
                sink.writerecords(records)
                count += len(records)

            def join(a_ids: np.ndarray, b_ids: np.ndarray) -> None:
                """Union components facing each other across a block edge when their class matches."""
                touching = (a_ids > 0) & (b_ids > 0)
                for a, b in set(zip(a_ids[touching].tolist(), b_ids[touching].tolist(), strict=True)):
                    if pieces[a].cls == pieces[b].cls:
                        uf.union(a, b)

            next_id = 1
            n_rows = math.ceil(grid.height / block)
            above = np.zeros(grid.width, dtype=np.int64)  # ids along the bottom row of the block row above
            for r in range(n_rows):
                below_ids = np.zeros(grid.width, dtype=np.int64)
                left_col: np.ndarray | None = None
                for win in block_windows(grid.width, grid.height, block, row=r):
                    ids = _label_block(cds, conf_ds, win, background, next_id, pieces, uf, grid, encode)
                    next_id = max(next_id, int(ids.max()) + 1)
                    c0, c1 = int(win.col_off), int(win.col_off + win.width)
                    if r > 0:
                        join(above[c0:c1], ids[0])
                    if left_col is not None:
                        join(left_col, ids[:, 0])
                    left_col = ids[:, -1]
                    below_ids[c0:c1] = ids[-1]
                last = r == n_rows - 1
                open_roots = set() if last else {uf.find(int(g)) for g in np.unique(below_ids[below_ids > 0])}
                finalize([i for i in list(pieces) if uf.find(i) not in open_roots])
                above = below_ids
                if on_block_row:
                    on_block_row(r + 1, n_rows)
        if conf_ds:
            conf_ds.close()
    return count


def _label_block(
    cds: rasterio.io.DatasetReader,
    conf_ds: rasterio.io.DatasetReader | None,
    win: Window,
    background: int,
    next_id: int,
    pieces: dict[int, _Piece],
    uf: _UnionFind,
    grid: Grid,
    encode: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Label one block into 4-connected same-class components, add them as pieces; return global ids."""
    cls = cds.read(1, window=win) if encode is None else encode(cds.read(window=win))
    cls = np.where(cds.read_masks(1, window=win) > 0, cls, background)
    conf = conf_ds.read(1, window=win).astype(np.float64) if conf_ds else np.ones(cls.shape)
    labels = np.zeros(cls.shape, dtype=np.int32)
    comp_cls = [background]
    for c in np.unique(cls):
        if c == background:
            continue
        lab, n = ndimage.label(cls == c, structure=STRUCTURE_4)
        labels[lab > 0] = lab[lab > 0] + len(comp_cls) - 1
        comp_cls.extend([int(c)] * n)
    counts = np.bincount(labels.ravel(), minlength=len(comp_cls))
    sums = np.bincount(labels.ravel(), weights=conf.ravel(), minlength=len(comp_cls))
    tf = rasterio.windows.transform(win, grid.transform)
    for geom, val in shapes(labels, mask=labels > 0, connectivity=4, transform=tf):
        gid = next_id + int(val) - 1
        poly = shape(geom)
        if gid in pieces:  # defensive: one component never yields two shapes with 4-connectivity
            pieces[gid].geom = pieces[gid].geom.union(poly)
            continue
        pieces[gid] = _Piece(poly, float(sums[int(val)]), int(counts[int(val)]), comp_cls[int(val)])
        uf.find(gid)
    return np.where(labels > 0, labels.astype(np.int64) + next_id - 1, 0)
