"""Alignment onto a reference grid, overlap, writer georeferencing and atomic outputs."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from conftest import levir
from rasterio.enums import ColorInterp, Resampling
from rasterio.warp import calculate_default_transform, reproject
from rasterio.windows import Window

from backend.io.raster import Grid, RasterSource, overlap_grid
from backend.io.writer import GeoTiffWriter
from backend.protocol import JobError


def reproject_file(src_path, dst_path, crs: str) -> None:
    with rasterio.open(src_path) as src:
        tf, w, h = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        profile = src.profile | {"crs": crs, "transform": tf, "width": w, "height": h, "nodata": 0}
        with rasterio.open(dst_path, "w", **profile) as dst:
            for b in range(1, src.count + 1):
                reproject(rasterio.band(src, b), rasterio.band(dst, b), resampling=Resampling.bilinear, dst_nodata=0)


def feature_offset(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Sub-pixel shift between two images by phase correlation (parabolic peak fit)."""
    fa, fb = np.fft.fft2(a - a.mean()), np.fft.fft2(b - b.mean())
    r = np.fft.ifft2(fa * np.conj(fb) / (np.abs(fa * np.conj(fb)) + 1e-9)).real
    iy, ix = np.unravel_index(np.argmax(r), r.shape)

    def refine(m, p, n):
        return (m - n) / (2 * (m - 2 * p + n)) if (m - 2 * p + n) != 0 else 0.0

    dy = iy + refine(r[iy - 1, ix], r[iy, ix], r[(iy + 1) % r.shape[0], ix])
    dx = ix + refine(r[iy, ix - 1], r[iy, ix], r[iy, (ix + 1) % r.shape[1]])
    dy = dy - r.shape[0] if dy > r.shape[0] / 2 else dy
    dx = dx - r.shape[1] if dx > r.shape[1] / 2 else dx
    return float(dy), float(dx)


def test_raster_in_another_crs_aligns_back_within_half_a_pixel(tmp_path) -> None:
    before, _, _ = levir("test_1")
    utm = tmp_path / "before_utm.tif"
    reproject_file(before, utm, "EPSG:32614")
    with RasterSource(before) as ref:
        grid = overlap_grid(ref.native, Grid.of(rasterio.open(utm)))
        with RasterSource(utm, grid=grid) as back:
            assert back.grid == grid
            win = Window(200, 200, 512, 512)
            # Compare against the reference read on the same overlap sub-grid.
            with RasterSource(before, grid=grid) as ref_on_grid:
                a, va = ref_on_grid.read(win)
            b, vb = back.read(win)
    assert va.all() and vb.all()
    dy, dx = feature_offset(a.mean(0), b.mean(0))
    assert abs(dy) < 0.5 and abs(dx) < 0.5
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_pixels_outside_the_second_footprint_are_invalid(tmp_path) -> None:
    before, _, _ = levir("test_1")
    with rasterio.open(before) as src:
        profile = src.profile | {"width": 400, "height": 300}
        with rasterio.open(tmp_path / "part.tif", "w", **profile) as dst:
            dst.write(src.read(window=Window(0, 0, 400, 300)))
    with rasterio.open(before) as src:
        ref_grid = Grid.of(src)
    with RasterSource(tmp_path / "part.tif", grid=ref_grid, resampling=Resampling.nearest) as part:
        _, valid = part.read(Window(0, 0, 1024, 1024))
    assert valid[:300, :400].all() and not valid[300:].any() and not valid[:, 400:].any()


def test_an_rgba_raster_warps_with_its_own_alpha_as_the_mask(tmp_path) -> None:
    """A 4-band 8-bit GeoTIFF is tagged RGBA by GDAL's defaults: warping it must not add a second alpha band."""
    before, _, _ = levir("test_1")
    rgba = tmp_path / "rgba.tif"
    with rasterio.open(before) as src:
        data, profile, ref_grid = src.read(), src.profile, Grid.of(src)
    alpha = np.full(data.shape[1:], 255, np.uint8)
    alpha[:, :100] = 0  # transparent left strip
    profile = {k: v for k, v in profile.items() if k != "photometric"} | {"count": 4}
    with rasterio.open(rgba, "w", **profile) as dst:  # GDAL's defaults for 4 bands of bytes
        dst.write(np.concatenate([data, alpha[None]]))
    with rasterio.open(rgba) as ds:
        assert ds.colorinterp[3] == ColorInterp.alpha
    shifted = Grid(ref_grid.crs, ref_grid.transform * rasterio.Affine.translation(0.5, 0.5), 512, 512)
    with RasterSource(rgba, grid=shifted) as src:
        assert src.bands == [1, 2, 3] and src._vrt is not None  # alpha is the mask, not data; warped (half a pixel)
        values, valid = src.read(Window(0, 0, 512, 512))
    assert not valid[:, :99].any() and valid[:, 101:].all()
    assert abs(float(values[:, :, 101:].mean()) - float(data[:, :512, 102:513].mean())) < 2


def test_overlap_grid_is_the_common_part_on_the_reference_grid(tmp_path) -> None:
    before, _, _ = levir("test_1")
    with rasterio.open(before) as src:
        win = Window(100, 200, 600, 500)
        profile = src.profile | {
            "width": 600,
            "height": 500,
            "transform": rasterio.windows.transform(win, src.transform),
        }
        with rasterio.open(tmp_path / "crop.tif", "w", **profile) as dst:
            dst.write(src.read(window=win))
        ref = Grid.of(src)
    sub = overlap_grid(ref, Grid.of(rasterio.open(tmp_path / "crop.tif")))
    assert (sub.width, sub.height) == (600, 500)
    assert sub.transform.almost_equals(rasterio.windows.transform(win, ref.transform))


def test_no_overlap_is_a_clear_error() -> None:
    a, _, _ = levir("test_1")
    b, _, _ = levir("test_77_0512_0256")  # a different place
    with pytest.raises(JobError, match="do not overlap"):
        overlap_grid(Grid.of(rasterio.open(a)), Grid.of(rasterio.open(b)), ("before", "after"))


def test_writer_keeps_crs_transform_nodata_and_tiles(tmp_path) -> None:
    before, _, _ = levir("test_1")
    with rasterio.open(before) as src:
        grid = Grid.of(src)
    with GeoTiffWriter(tmp_path / "o.tif", grid, 1, "float32", -1.0, block=448) as w:
        values = np.random.default_rng(0).random((1, 1024, 1024), dtype=np.float32)
        valid = np.ones((1024, 1024), bool)
        valid[:10] = False
        w.write(Window(0, 0, 1024, 1024), values, valid)
    with rasterio.open(tmp_path / "o.tif") as ds:
        assert ds.crs == grid.crs and ds.transform == grid.transform and ds.nodata == -1.0
        assert ds.block_shapes[0] == (448, 448) and ds.compression.name.lower() == "deflate"
        out = ds.read(1)
    assert (out[:10] == -1).all() and np.allclose(out[10:], values[0, 10:])


def test_reader_scaling_and_band_selection() -> None:
    before, _, _ = levir("test_1")
    with RasterSource(before, bands=[3, 1], scale="dtype") as src:
        data, _ = src.read(Window(0, 0, 8, 8))
        raw = rasterio.open(before).read([3, 1], window=Window(0, 0, 8, 8))
    assert data.shape == (2, 8, 8) and np.allclose(data, raw / 255.0)
    with pytest.raises(JobError, match="band"):
        RasterSource(before, bands=[4])
