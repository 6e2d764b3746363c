"""Cluster apply (`python -m backend cluster`) against the single-machine job on the same input.

Measures, on a local Ray cluster (`ray start --head` on this machine, joined by address as a real cluster is):
throughput with 1 and 2 actors (`--workers`; the scaling ratio), the cluster path's overhead against the
single-machine job (wall clock of the whole command; the time to start Ray is measured apart with
`--address local`), and the peak memory of each actor and of the driver as the mosaic grows (it should stay flat).

Input: a VRT mosaic of the real LEVIR-CD `test_1` pair (1024 x 1024) repeated n x n times (2048², 8192² …), so the
imagery is real at any size. Jobs: `change.detect` with a small FILF adapter (TinyViT encoder with random frozen
weights, fine-tuned here for a few steps: the speed is the model's, not its accuracy), and `change.cva`.

    python -m bench.cluster [--sizes 2048 8192] [--jobs detect cva] [--block-size 4096] [--workers 1 2] [--address A]

On a real cluster: `--address head:6379` runs against it instead of a head started here (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import rasterio
from rasterio.windows import Window

from backend.distributed.blocks import partition, write_vrt
from backend.io.raster import Grid
from backend.io.tiling import TileSpec, tile_grid
from bench.machine import machine_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LEVIR = ROOT / "tests" / "data" / "levir_cd"
RAY = Path(sys.executable).with_name("ray")
FILF_FAST = ["--backbone", "tiny_vit_tiny", "--allow-random-backbone", "--epochs", "1", "--steps-per-epoch", "2"]
FILF_FAST += ["--batch-size", "2", "--patch-size", "64"]


def mosaic(image: Path, n: int, path: Path) -> Path:
    """A VRT of `image` repeated n x n (what gdalbuildvrt makes of n x n adjacent scenes)."""
    with rasterio.open(image) as ds:
        grid, count = Grid.of(ds), ds.count
    whole = Grid(grid.crs, grid.transform, grid.width * n, grid.height * n)
    places = [Window(j * grid.width, i * grid.height, grid.width, grid.height) for i in range(n) for j in range(n)]
    write_vrt(path, whole, count, [(win, image) for win in places], data_type="Byte")
    return path


def hwm_mb(pid: int) -> float | None:
    """A process's peak resident memory so far (VmHWM), or None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM")), None)
    return None if kb is None else kb / 1024  # a zombie has no memory left to report


def actor_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"PartWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def timed(args: list[str], env: dict[str, str]) -> dict:
    """Run `python -m backend …` and sample the peak memory of it and of the cluster's actors while it runs."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend", *args, "--json", "--quiet"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    driver, actors = 0.0, {}
    while proc.poll() is None:
        driver = max(driver, hwm_mb(proc.pid) or 0.0)
        for pid in actor_pids():
            actors[pid] = max(actors.get(pid, 0.0), hwm_mb(pid) or 0.0)
        time.sleep(0.2)  # sampling; VmHWM is the process's own peak, so a sample late is not a peak missed
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {err[-2000:]}")
    metrics = json.loads(out)["metrics"]
    return {
        "wall_s": round(wall, 2),
        "driver_peak_rss_mb": round(driver, 1),
        "actor_peak_rss_mb": sorted(round(v, 1) for v in actors.values()),
        "parts": metrics.get("parts_computed"),
        "polygons": metrics.get("polygons"),
    }


def halo_ratio(size: int, block: int) -> float:
    """Tiles the parts compute (theirs, the row above, the column left) over the tiles of the grid: both jobs tile
    by 512 px overlapping by 64 at these sizes."""
    spec = TileSpec(512, 64)
    rows, cols = tile_grid(size, size, spec)
    done = sum(
        (p.row1 - p.row0 + (p.row0 > 0)) * (p.col1 - p.col0 + (p.col0 > 0))
        for p in partition(0, size, size, spec, block)
    )
    return done / (rows * cols)


def start_head(temp: Path, env: dict[str, str]) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(RAY), "start", "--head", f"--port={port}", "--num-cpus", str(os.cpu_count()), "--disable-usage-stats"]
    cmd += ["--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}"]
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=300)
    return f"127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192], help="mosaic sides (multiples of 1024)")
    parser.add_argument("--jobs", nargs="+", default=["detect", "cva"], choices=["detect", "cva"])
    parser.add_argument("--block-size", type=int, default=4096, help="pixels a side of a part")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="actor counts to compare")
    parser.add_argument("--address", help="a running cluster's head (default: start one on this machine)")
    args = parser.parse_args()
    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    # RAY_AUTH_MODE: `ray start` turns on token authentication, so the drivers joining by address say they use it.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RS_PEFT_QGIS_DATA_DIR": str(work / "data"), "RAY_AUTH_MODE": "token"}
    before, after, label = LEVIR / "test_2_0000_0512_A.tif", LEVIR / "test_2_0000_0512_B.tif", None
    label = LEVIR / "test_2_0000_0512_label.tif"
    train = ["change.finetune", "--before", str(before), "--after", str(after), "--labels", str(label)]
    subprocess.run([sys.executable, "-m", "backend", *train, "--adapter-name", "bench", *FILF_FAST, "--quiet"],
                   cwd=ROOT, env=env, check=True, capture_output=True)  # fmt: skip
    head = args.address or start_head(work / "ray", env)
    rows = []
    try:
        for size in args.sizes:
            n = size // 1024
            pair = [
                "--before", str(mosaic(LEVIR / "test_1_A.tif", n, work / f"A_{size}.vrt")),
                "--after", str(mosaic(LEVIR / "test_1_B.tif", n, work / f"B_{size}.vrt")),
            ]  # fmt: skip
            for job in args.jobs:
                name, extra = ("change.detect", ["--adapter", "bench"]) if job == "detect" else ("change.cva", [])
                row = {"job": name, "size": size, "megapixels": size * size / 1e6}
                row["single"] = timed([name, *pair, *extra, "--out-dir", str(work / f"s_{job}_{size}")], env)
                for workers in args.workers:
                    cmd = ["cluster", name, "--address", head, "--workers", str(workers)]
                    cmd += ["--block-size", str(args.block_size), *pair, *extra]
                    row[f"cluster_{workers}"] = timed([*cmd, "--out-dir", str(work / f"c{workers}_{job}_{size}")], env)
                if size == args.sizes[-1]:  # Ray's own start, once: a cluster started for the run
                    cmd = ["cluster", name, "--address", "local", "--block-size", str(args.block_size), *pair, *extra]
                    row["cluster_local"] = timed([*cmd, "--out-dir", str(work / f"l_{job}_{size}")], env)
                lo, hi = args.workers[0], args.workers[-1]
                one, many, single = (
                    row[f"cluster_{lo}"]["wall_s"],
                    row[f"cluster_{hi}"]["wall_s"],
                    row["single"]["wall_s"],
                )
                row[f"scaling_{hi}_over_{lo}"] = round(one / many, 3)
                row["tiles_computed_over_grid"] = round(halo_ratio(size, args.block_size), 3)
                row["overhead_vs_single"] = round(one / single - 1, 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if not args.address:  # the head started here
            subprocess.run([str(RAY), "stop", "--force"], capture_output=True, env=env, timeout=300)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cluster.json"
    out.write_text(json.dumps({"machine": machine_record("cpu", load), "block_size": args.block_size, "rows": rows}))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
