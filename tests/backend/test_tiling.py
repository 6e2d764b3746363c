"""Tiled + blended inference equals the whole-image result, streams blocks, handles nodata."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import rasterio
from conftest import levir
from rasterio.windows import Window
from scipy import ndimage

from backend.io.raster import RasterSource
from backend.io.tiling import TileSpec, run_tiled, tile_grid


def pointwise(batch: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-pixel nonlinear mix of the bands into two channels (translation-equivariant)."""
    a = np.tanh(batch[:, 0] * 0.02 - batch[:, 1] * 0.01)
    b = np.sqrt(batch[:, 2] + 1.0) * batch[:, 0] / 255.0
    return np.stack([a, b], axis=1)


def blur(batch: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A 7x7 neighbourhood operation (reach 3 px): exact when the blending margin is >= 3."""
    return np.stack([ndimage.uniform_filter(t[0], size=7, mode="reflect")[None] for t in batch])


def tiled(
    image: np.ndarray, fn, channels: int, spec: TileSpec, part=None, out: np.ndarray | None = None
) -> tuple[np.ndarray, list[Window]]:
    out = np.full((channels, *image.shape[1:]), np.nan, dtype=np.float32) if out is None else out
    windows: list[Window] = []

    def read(win: Window):
        r, c, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        return image[:, r : r + h, c : c + w].astype(np.float32), np.ones((h, w), bool)

    def sink(win: Window, values: np.ndarray, valid: np.ndarray) -> None:
        r, c, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        assert np.isnan(out[:, r : r + h, c : c + w]).all(), "a block was written twice"
        out[:, r : r + h, c : c + w] = values
        windows.append(win)

    run_tiled(image.shape[1], image.shape[2], read, fn, sink, channels, spec, part=part)
    return out, windows


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    # A real LEVIR-CD image cropped to a size that is not a multiple of any tile size below.
    with rasterio.open(levir("test_1")[0]) as ds:
        return ds.read(window=Window(0, 0, 1000, 777)).astype(np.float32)


@pytest.mark.parametrize(("tile", "overlap"), [(128, 32), (256, 64), (200, 16), (512, 128), (64, 0)])
def test_tiled_pointwise_equals_whole_image(scene: np.ndarray, tile: int, overlap: int) -> None:
    whole = pointwise(scene[None], np.ones((1, *scene.shape[1:]), bool))[0]
    out, windows = tiled(scene, pointwise, 2, TileSpec(tile, overlap, batch=3))
    assert not np.isnan(out).any(), "some pixels were never written"
    assert np.abs(out - whole).max() <= 1e-5
    rows = [int(w.row_off) for w in windows]
    assert rows == sorted(rows), "blocks must stream in row order"


@pytest.mark.parametrize(("tile", "overlap"), [(128, 32), (96, 24), (300, 40)])
def test_tiled_neighbourhood_op_is_seamless(scene: np.ndarray, tile: int, overlap: int) -> None:
    whole = blur(scene[None, :1], None)[0]
    out, _ = tiled(scene[:1], blur, 1, TileSpec(tile, overlap, batch=2, margin=3))
    assert np.abs(out - whole).max() <= 1e-3  # float32 sums of 49 values of up to 255


def position_dependent(batch: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Depends on where the tile starts (a running sum from its left edge), so blending is seen in the result."""
    return np.cumsum(batch[:, :1], axis=-1) / 1000.0


@pytest.mark.parametrize(("tile", "overlap", "cut"), [(128, 32, (3, 2)), (200, 16, (2, 4)), (96, 24, (4, 3))])
def test_parts_of_the_tile_grid_give_the_whole_run_bit_for_bit(scene: np.ndarray, tile: int, overlap: int, cut) -> None:
    """Blocks of tile rows and columns, each run on its own (as cluster workers do), assemble to the whole run."""
    spec = TileSpec(tile, overlap, batch=3)
    whole, _ = tiled(scene, position_dependent, 1, spec)
    n_rows, n_cols = tile_grid(scene.shape[1], scene.shape[2], spec)
    out = np.full_like(whole, np.nan)
    row_cuts = np.linspace(0, n_rows, cut[0] + 1).astype(int)
    col_cuts = np.linspace(0, n_cols, cut[1] + 1).astype(int)
    for r0, r1 in itertools.pairwise(row_cuts):
        for c0, c1 in itertools.pairwise(col_cuts):
            tiled(scene, position_dependent, 1, spec, (range(r0, r1), range(c0, c1)), out)
    assert np.array_equal(out, whole)  # every pixel written once, and the same bits


def test_scene_smaller_than_a_tile_is_padded(scene: np.ndarray) -> None:
    small = scene[:, :50, :70]
    out, _ = tiled(small, pointwise, 2, TileSpec(128, 32))
    assert np.abs(out - pointwise(small[None], None)[0]).max() <= 1e-5


def test_nodata_in_gives_nodata_out(tmp_path) -> None:
    data = np.arange(3 * 300 * 260, dtype=np.uint16).reshape(3, 300, 260) % 1000 + 1
    data[:, 40:90, 100:180] = 0  # nodata hole
    data[:, :, :20] = 0  # nodata strip along an edge
    path = tmp_path / "nd.tif"
    profile = dict(
        driver="GTiff",
        width=260,
        height=300,
        count=3,
        dtype="uint16",
        nodata=0,
        crs="EPSG:32633",
        transform=rasterio.transform.from_origin(400000, 5000000, 10, 10),
    )
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    valid_out = np.zeros((300, 260), bool)
    with RasterSource(path) as src:

        def sink(win, values, valid):
            r, c = int(win.row_off), int(win.col_off)
            valid_out[r : r + valid.shape[0], c : c + valid.shape[1]] = valid

        run_tiled(300, 260, src.read, pointwise, sink, 2, TileSpec(64, 16))
    assert np.array_equal(valid_out, data[0] != 0)


def test_tile_spec_rejects_bad_values() -> None:
    for kwargs in (
        {"tile": 8},
        {"tile": 64, "overlap": 40},
        {"tile": 64, "batch": 0},
        {"tile": 64, "overlap": 8, "margin": 4},
    ):
        with pytest.raises(ValueError):
            TileSpec(**kwargs)
