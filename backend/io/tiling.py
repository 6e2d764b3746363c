"""Tiled inference over a whole grid with smooth blending, streamed block by block.

Tiles of `tile` pixels step by `stride = tile - overlap`; tiles that run past the scene edge are
mirror-padded. Overlapping predictions are averaged with weights that rise smoothly from zero
inside a `margin` at interior tile edges, so there are no seams, and an operation whose reach is
at most `margin` pixels gives exactly the untiled result.

The weights form a product grid, so their sum at every pixel is known in advance and each tile's
contribution is normalised at once. Only the overlap bands are kept (one of overlap x width below
the current tile row, one of tile x overlap right of the current tile), and every
stride x stride block is handed to `sink` as soon as it is final: memory grows with
overlap x row width, not with the scene.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

# read(window) -> (data (C, h, w) float32, valid (h, w) bool)
ReadFn = Callable[[Window], tuple[np.ndarray, np.ndarray]]
# predict(batch (N, C, T, T), valid (N, T, T)) -> (N, K, T, T)
PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# sink(window, values (K, h, w) float32, valid (h, w) bool)
SinkFn = Callable[[Window, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class TileSpec:
    tile: int = 512
    overlap: int = 64
    batch: int = 4
    margin: int | None = None  # pixels ignored at interior tile edges; default overlap // 4

    def __post_init__(self) -> None:
        if self.tile < 16:
            raise ValueError("The tile size must be at least 16 pixels.")
        if not 0 <= self.overlap <= self.tile // 2:
            raise ValueError("The overlap must be between 0 and half the tile size.")
        if self.batch < 1:
            raise ValueError("The batch size must be at least 1.")
        if self.margin_px > max((self.overlap - 1) // 2, 0):
            raise ValueError("The margin must be less than half the overlap.")

    @property
    def margin_px(self) -> int:
        return self.overlap // 4 if self.margin is None else self.margin

    @property
    def stride(self) -> int:
        return self.tile - self.overlap


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets along one axis: 0, stride, 2*stride ... until a tile reaches the edge."""
    n = 1 if size <= tile else math.ceil((size - tile) / stride) + 1
    return [i * stride for i in range(n)]


def edge_weights(n: int, taper_lo: bool, taper_hi: bool, overlap: int, margin: int) -> np.ndarray:
    """1-D blending weights: zero inside the margin of a tapered edge, then a raised cosine."""
    w = np.ones(n, dtype=np.float64)
    ramp = max(overlap // 2 - margin, 1)
    d = np.arange(n, dtype=np.float64)
    t = np.clip((d - margin + 1) / (ramp + 1), 0.0, 1.0)
    rise = np.where(d < margin, 0.0, 0.5 - 0.5 * np.cos(np.pi * t))
    if taper_lo:
        w *= rise
    if taper_hi:
        w *= rise[::-1]
    return w


def _axis_weights(size: int, spec: TileSpec) -> tuple[list[int], list[np.ndarray], np.ndarray]:
    """Tile starts, each tile's weights (cropped to the scene) and their sum at every pixel."""
    starts = tile_starts(size, spec.tile, spec.stride)
    total = np.zeros(size, dtype=np.float64)
    per_tile = []
    for i, s in enumerate(starts):
        w = edge_weights(spec.tile, i > 0, i < len(starts) - 1, spec.overlap, spec.margin_px)[: size - s]
        total[s : s + len(w)] += w
        per_tile.append(w)
    return starts, per_tile, total


def block_windows(width: int, height: int, block: int, row: int | None = None) -> Iterator[Window]:
    """Row-major windows of block x block pixels (smaller at the right and bottom edges).

    With `row`, only the windows of that block row.
    """
    rows = range(0, height, block) if row is None else [row * block]
    for r in rows:
        for c in range(0, width, block):
            yield Window(c, r, min(block, width - c), min(block, height - r))


def run_tiled(
    height: int,
    width: int,
    read: ReadFn,
    predict: PredictFn,
    sink: SinkFn,
    out_channels: int,
    spec: TileSpec,
    on_tile: Callable[[int, int], None] | None = None,
    part: tuple[range, range] | None = None,
) -> None:
    """Predict over a height x width grid tile by tile; blended blocks go to `sink` in row-major order.

    Blocks are aligned on a grid of `spec.stride` pixels. Tiles without any valid pixel are not
    predicted and their pixels are reported invalid. `on_tile(done, total)` runs after each batch
    (progress and cancellation checks).

    `part` (tile rows, tile columns; see `tile_grid`) hands `sink` only the blocks of those tiles, computing
    the tiles they need (also the row above and the column left of them, whose overlaps blend in) on the
    whole grid's lattice and weights: the blocks are bit for bit those of a run over the whole grid.
    """
    ys, wys, wy_sum = _axis_weights(height, spec)
    xs, wxs, wx_sum = _axis_weights(width, spec)
    s, ov, k_ch = spec.stride, spec.overlap, out_channels
    rows_out, cols_out = part or (range(len(ys)), range(len(xs)))
    tile_rows = range(max(rows_out.start - 1, 0), rows_out.stop)
    tile_cols = range(max(cols_out.start - 1, 0), cols_out.stop)
    total, done = len(tile_rows) * len(tile_cols), 0
    below = np.zeros((k_ch, ov, width), dtype=np.float32)  # tile row k-1 -> rows [y, y+ov)

    for ki in tile_rows:
        y = ys[ki]
        h = min(spec.tile, height - y)
        last_row = ki == len(ys) - 1
        new_below = np.zeros_like(below)
        left: np.ndarray | None = None  # tile j-1 -> columns [x, x+ov) of this tile row
        norm_y = wys[ki] / wy_sum[y : y + h]
        for j0 in range(tile_cols.start, tile_cols.stop, spec.batch):
            batch_idx = range(j0, min(j0 + spec.batch, tile_cols.stop))
            reads = []
            for ji in batch_idx:
                x = xs[ji]
                reads.append(read(Window(x, y, min(spec.tile, width - x), h)))
            live = [i for i, (_, v) in enumerate(reads) if v.any()]
            preds: dict[int, np.ndarray] = {}
            if live:
                data = np.stack([_pad(reads[i][0], spec.tile) for i in live])
                valid = np.stack([_pad(reads[i][1][None], spec.tile)[0] for i in live])
                out = np.asarray(predict(data, valid), dtype=np.float32)
                preds = {i: out[n] for n, i in enumerate(live)}
            for i, ji in enumerate(batch_idx):
                x = xs[ji]
                w = min(spec.tile, width - x)
                last_col = ji == len(xs) - 1
                if i in preds:
                    c = preds[i][:, :h, :w] * (norm_y[:, None] * (wxs[ji] / wx_sum[x : x + w])[None, :]).astype(
                        np.float32
                    )
                else:
                    c = np.zeros((k_ch, h, w), dtype=np.float32)
                if left is not None:
                    c[:, :, : left.shape[2]] += left
                c0 = ov if ji > tile_cols.start else 0  # columns before c0 already got `below` via `left`
                c[:, : min(ov, h), c0:] += below[:, : min(ov, h), x + c0 : x + w]
                rows = h if last_row else s
                cols = w if last_col else s
                if ki in rows_out and ji in cols_out:
                    sink(Window(x, y, cols, rows), c[:, :rows, :cols], reads[i][1][:rows, :cols])
                if not last_row:
                    new_below[:, :, x : x + cols] = c[:, s:, :cols]
                left = None if last_col else c[:, :, s:].copy()
            done += len(batch_idx)
            if on_tile:
                on_tile(done, total)
        below = new_below


@dataclass
class TiledPass:
    """One streamed prediction pass, opened: what `run_tiled` needs over a height x width grid. A job builds it
    once and runs it whole, or (backend/distributed) once per cluster actor, over parts of its tile grid."""

    height: int
    width: int
    read: ReadFn
    predict: PredictFn
    channels: int
    spec: TileSpec
    close: Callable[[], None] = lambda: None

    def run(
        self, sink: SinkFn, on_tile: Callable[[int, int], None] | None = None, part: tuple[range, range] | None = None
    ) -> None:
        run_tiled(self.height, self.width, self.read, self.predict, sink, self.channels, self.spec, on_tile, part)


def tile_grid(height: int, width: int, spec: TileSpec) -> tuple[int, int]:
    """The number of tile rows and columns over a height x width grid (what `part` indexes)."""
    return len(tile_starts(height, spec.tile, spec.stride)), len(tile_starts(width, spec.tile, spec.stride))


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Mirror-pad (C, h, w) to (C, size, size) for tiles that run past the scene edge."""
    ph, pw = size - a.shape[1], size - a.shape[2]
    if ph == 0 and pw == 0:
        return a
    return np.pad(a, ((0, 0), (0, ph), (0, pw)), mode="symmetric")
