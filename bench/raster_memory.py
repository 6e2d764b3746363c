"""Peak memory and throughput of change.cva on synthetic scenes of growing size.

Each scene is a pair of 3-band uint8 tiled GeoTIFFs (smooth texture + noise, with rectangular
changes), written strip by strip. Each run is a fresh process so its peak RSS is its own.
Goal (issue 2): the peak RSS at 8k² and 16k² stays within +20% of the 2k² figure.

    python -m bench.raster_memory [--sizes 2048 8192 16384] []
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from bench.machine import machine_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STRIP = 512

# Peak RSS is read from VmHWM: ru_maxrss would include the parent's high-water mark, which
# Linux carries over fork + exec (the parent has just written a big scene).
CHILD = """
import json, sys, time
from backend.jobs import JOBS
from backend.context import JobContext
from backend.jobs.base import run_job
spec = JOBS["change.cva"]
params = spec.validate(json.loads(sys.argv[1]))
t0 = time.perf_counter()
result = run_job(spec, params, JobContext())
wall = time.perf_counter() - t0
hwm = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM"))
print(json.dumps({"wall_s": wall, "peak_rss_mb": hwm / 1024,
                  "polygons": result.metrics["polygons"], "changed_fraction": result.metrics["changed_fraction"]}))
"""


def write_scene(path: Path, size: int, seed: int, changes: bool) -> None:
    """A smooth random texture (same for both dates) plus per-date noise and optional changed blocks."""
    base_rng = np.random.default_rng(1234)
    rng = np.random.default_rng(seed)
    coarse = base_rng.integers(40, 200, size=(3, size // 64 + 1, size // 64 + 1), dtype=np.uint8)
    profile = dict(
        driver="GTiff",
        width=size,
        height=size,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500000, 5000000, 0.5, 0.5),
        tiled=True,
        blockxsize=512,
        blockysize=512,
    )
    with rasterio.open(path, "w", **profile) as ds:
        for r in range(0, size, STRIP):
            h = min(STRIP, size - r)
            rows = np.repeat(coarse[:, r // 64 : (r + h - 1) // 64 + 1], 64, axis=1)[:, (r % 64) : (r % 64) + h]
            block = np.repeat(rows, 64, axis=2)[:, :, :size].astype(np.int16)
            block += rng.integers(-6, 7, size=block.shape, dtype=np.int16)
            if changes:
                yy, xx = np.mgrid[r : r + h, 0:size]
                hit = ((yy // 256) % 7 == 3) & ((xx // 256) % 5 == 2) & ((yy % 256) < 120) & ((xx % 256) < 160)
                block[:, hit] = 255 - block[:, hit]
            ds.write(np.clip(block, 0, 255).astype(np.uint8), window=Window(0, r, size, h))


def run(size: int, work: Path) -> dict:
    before, after = work / f"before_{size}.tif", work / f"after_{size}.tif"
    write_scene(before, size, seed=1, changes=False)
    write_scene(after, size, seed=2, changes=True)
    params = {"before": str(before), "after": str(after), "out_dir": str(work / f"out_{size}")}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(params)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec.update(size=size, megapixels=size * size / 1e6)
    rec["mp_per_s"] = rec["megapixels"] / rec["wall_s"]
    for p in (before, after):
        p.unlink()
    shutil.rmtree(work / f"out_{size}")
    return rec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where the synthetic scenes go (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rs-peft-bench-", dir=args.work_dir))
    try:
        records = [run(s, work) for s in sorted(args.sizes)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = records[0]["peak_rss_mb"]
    print(f"{'scene':>8} {'MP':>7} {'peak RSS MB':>12} {'vs first':>9} {'wall s':>8} {'MP/s':>6} {'polygons':>9}")
    for r in records:
        r["rss_vs_first"] = r["peak_rss_mb"] / base - 1
        print(
            f"{r['size']:>7}² {r['megapixels']:7.1f} {r['peak_rss_mb']:12.1f} {r['rss_vs_first']:+9.1%} "
            f"{r['wall_s']:8.1f} {r['mp_per_s']:6.2f} {r['polygons']:9d}"
        )
    out = {
        "benchmark": "raster_memory (change.cva)",
        **machine_record(),
        "records": records,
        "goal_met": all(r["rss_vs_first"] <= 0.20 for r in records),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "raster_memory.json").write_text(json.dumps(out, indent=2))
    print(f"goal (peak RSS within +20% of the smallest scene): {'met' if out['goal_met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
