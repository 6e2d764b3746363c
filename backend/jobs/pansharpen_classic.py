"""pansharpen.classic: Brovey, GSA or MTF-GLP-HPM over a whole PAN + MS scene, streamed tile by tile.

The output is on the PAN grid (CRS, transform, resolution of the PAN, limited to the PAN/MS overlap and the
area of interest), with the MS's bands, dtype, value scale and nodata. The MS is read onto the PAN grid on
the fly through a warped VRT with cubic resampling (what GDAL's own pansharpening uses), so the two rasters
may differ in CRS or extent. The evaluation job interpolates with the classical 23-tap filter instead; here
the warp also aligns the grids, which that filter cannot.

Tiles never overlap and are never blended: the classical methods are exact per pixel once their few global
statistics are known, so each tile is computed from its own window plus a halo wide enough for the filters
(none for Brovey and GSA, 12 x ratio PAN pixels for the MTF low-pass and re-interpolation of MTF-GLP-HPM), and
the result does not depend on the tile size (no seams). GSA's regression weights and means come from a first
streaming pass over a decimated sample, on fixed blocks independent of the tile size; weights estimated per
tile would change from tile to tile and leave seams.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window

from backend.context import JobContext
from backend.io.pairs import FusedImage, fill_nearest, grid_offset, open_pair, read_padded
from backend.io.raster import RasterSource
from backend.io.rasterize import restrict_to_aoi
from backend.io.tiling import block_windows
from backend.jobs.base import JobSpec
from backend.methods.gsa import compute_stats, fuse_gsa
from backend.methods.pansharpening_classic import (
    MS,
    MS_BANDS,
    PAN,
    PANSHARPENED,
    RATIO,
    SENSOR,
    brovey,
    mtf_glp_hpm,
    sensor_gains,
)
from backend.params import AOI, NAME, OUT_DIR, TILE_SIZE, Param
from backend.preflight import preflight
from backend.protocol import JobResult

METHODS = ("brovey", "gsa", "mtf_glp_hpm")
METHOD_TITLES = {"brovey": "Brovey", "gsa": "GSA", "mtf_glp_hpm": "MTF-GLP-HPM"}
HPM_HALO = 12  # x ratio: the reach of MTF filter + decimation + 23-tap re-interpolation (measured ~11)
CPU_MP_PER_S = 0.68  # Brovey on SpaceNet-6, 2-core dev VM (docs/BENCHMARKS.md); the others are slower

PARAMS = (
    PAN,
    MS,
    OUT_DIR.but(help="Folder for the result."),
    Param(
        "method",
        str,
        "brovey: GDAL's weighted Brovey (fast, strong colour shifts); gsa: Gram-Schmidt adaptive; "
        "mtf_glp_hpm: MTF-matched high-pass modulation (usually the most faithful colours).",
        default="mtf_glp_hpm",
        choices=METHODS,
        prominent=True,
    ),
    SENSOR,
    RATIO,
    MS_BANDS.but(help="MS bands to pansharpen, e.g. 1,2,3 (default: all)."),
    AOI.but(help="Polygon layer: only the area inside it is pansharpened (default: all)."),
    NAME.but(default="pansharpened", help="Prefix of the output file name."),
    TILE_SIZE.but(default=512, help="Tile size in PAN pixels (memory grows with its square)."),
)


# --- the job ------------------------------------------------------------------------------------------------


def run(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    started = time.monotonic()
    ctx.protect_inputs(p["pan"], p["ms"])
    out_dir = ctx.prepare_out_dir(p["out_dir"])
    pair = open_pair(p["pan"], p["ms"], p["ms_bands"], p["ratio"], ctx.warn)
    r, method = pair.ratio, p["method"]
    gains = sensor_gains(p["sensor"], pair.bands)
    data_grid = pair.overlap()
    grid, aoi = data_grid, None
    if p["aoi"]:
        grid, aoi = restrict_to_aoi(data_grid, p["aoi"], ctx.warnings)
    if not pair.georeferenced:
        ctx.warn(
            "The PAN and MS are not georeferenced: they are matched in pixel space (same top-left corner, one MS "
            "pixel per ratio x ratio PAN pixels) and the result has no CRS."
        )
    oy, ox = grid_offset(data_grid, grid)
    phase = pair.ms_origin_phase(grid)
    ctx.log(
        f"Pansharpening {grid.width} x {grid.height} PAN pixels ({grid.width * grid.height / 1e6:.1f} MP), "
        f"{pair.bands} MS band(s), ratio {r} ({pair.ratio_note}), {METHOD_TITLES[method]}, sensor {p['sensor']}."
    )
    final = out_dir / f"{p['name']}_{method}.tif"
    tile = p["tile_size"]
    out_bytes = pair.bands * pair.ms_dtype.itemsize
    preflight(ctx, grid.height, grid.width, tile, out_dir, out_bytes, "cpu", CPU_MP_PER_S)
    block = tile if tile % 16 == 0 else 256
    halo = HPM_HALO * r if method == "mtf_glp_hpm" else 0

    pan_src = RasterSource(pair.pan, grid=data_grid, what="PAN")
    # Cubic warping onto the PAN grid (GDAL pansharpening's default) also aligns the grids on the fly.
    ms_src = pair.ms_reader(data_grid, Resampling.cubic)
    with pan_src, ms_src:
        stats = None
        if method == "gsa":
            stats = compute_stats(ctx, pair, pan_src, ms_src, data_grid, grid, aoi, phase, (0.0, 0.2))
            ctx.log(f"GSA weights from {stats.samples} sample pixels: {np.round(stats.alpha, 4).tolist()}.")
        start = 0.2 if stats is not None else 0.0
        title = f"{p['name']} ({METHOD_TITLES[method]})"
        with FusedImage(ctx, final, grid, pair, block, title) as image:
            wins = list(block_windows(grid.width, grid.height, tile))
            for i, win in enumerate(wins):
                ctx.progress(start + (1.0 - start) * i / len(wins), "pansharpening", f"tile {i + 1}/{len(wins)}")
                y0, x0, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
                ms, mvalid = ms_src.read(Window(ox + x0, oy + y0, w, h))
                ms = ms.astype(np.float64)
                if method == "mtf_glp_hpm":
                    # Whole MS pixels around the tile, so the decimation samples MS pixel centres in every tile.
                    ya = y0 - halo - (y0 - halo - phase[0]) % r
                    xa = x0 - halo - (x0 - halo - phase[1]) % r
                    yb = y0 + h + halo + (phase[0] - y0 - h - halo) % r
                    xb = x0 + w + halo + (phase[1] - x0 - w - halo) % r
                    pan, pvalid_all = read_padded(pan_src, data_grid, oy + ya, ox + xa, yb - ya, xb - xa)
                    pan = fill_nearest(pan[0].astype(np.float64), pvalid_all)
                    pvalid = pvalid_all[y0 - ya : y0 - ya + h, x0 - xa : x0 - xa + w]
                    fused = mtf_glp_hpm(pan, ms, r, gains, (y0 - ya, x0 - xa))
                else:
                    pan, pvalid = pan_src.read(Window(ox + x0, oy + y0, w, h))
                    pan = pan[0].astype(np.float64)
                    fused = brovey(pan, ms) if method == "brovey" else fuse_gsa(pan, ms, stats)  # type: ignore[arg-type]
                valid = pvalid & mvalid
                if aoi is not None:
                    valid &= aoi.burn(grid.window_grid(win)) > 0
                image.write(win, fused, valid)
        ctx.progress(1.0, "pansharpening", "done")
    result = image.finish()
    seconds = time.monotonic() - started
    result.metrics["megapixels_per_second"] = grid.width * grid.height / 1e6 / max(seconds, 1e-9)
    return result


SPEC = JobSpec(
    "pansharpen.classic",
    "Pansharpen a PAN + MS pair with a classical method (no training): the MS's bands at the PAN's resolution.",
    PARAMS,
    run,
    title="Pansharpen (classical: Brovey / GSA / MTF-GLP-HPM)",
    outputs=PANSHARPENED,
)
