"""Apply jobs on a Ray cluster (`python -m backend cluster …`): a real local Ray cluster (CPU only), real GeoTIFF
mosaics and scenes, the real CLI; the cluster's outputs must equal the single-machine job's.

One Ray head is started for the module (`ray start --head`) and the runs join it by address, as on a real
cluster (the backend's code then travels to the actors as a Ray `py_modules` package); one run starts its own
(`--address local`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import fiona
import numpy as np
import pytest
import rasterio
from affine import Affine
from conftest import ROOT, levir
from rasterio.windows import Window
from test_pansharpen_jobs import MS, PAN
from test_raster_io import reproject_file

from backend.client import WorkerClient
from backend.distributed.blocks import partition, write_vrt
from backend.distributed.cluster import PartWorker, PassRef
from backend.io.raster import Grid
from backend.io.tiling import TiledPass, TileSpec

RAY = Path(sys.executable).with_name("ray")
TILES = ["--tile-size", "64", "--overlap", "16"]
FILF_FAST = [
    "--backbone", "tiny_vit_tiny", "--allow-random-backbone", "--epochs", "1", "--steps-per-epoch", "2",
    "--batch-size", "2", "--patch-size", "64",
]  # fmt: skip


def env() -> dict[str, str]:
    # `ray start` turns on Ray's token authentication; a driver joining by address must say it uses it.
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "token"}


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "backend", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def result_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The adapter library and caches of this module (the actors get the variables from the driver)."""
    root = tmp_path_factory.mktemp("backend-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RS_PEFT_QGIS_DATA_DIR", str(root / "data"))
        mp.setenv("RS_PEFT_QGIS_CACHE_DIR", str(root / "cache"))
        yield root


@pytest.fixture(scope="module")
def head(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head on this machine (2 CPUs), as `ray start` makes one on a cluster's first node; its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tmp_path_factory.mktemp("ray")
    start = [str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
    start += ["--disable-usage-stats", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}"]
    subprocess.run(start, check=True, capture_output=True, env=env(), timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, env=env(), timeout=180)
        # The next tests get the machine to themselves: wait until Ray's processes are gone.
        wait_for(lambda: not pids_with(b"raylet") and not pids_with(b"gcs_server") and not actor_pids(), 120)


def mosaic(tiles: list[Path], path: Path) -> Path:
    """A GDAL VRT mosaic of same-CRS, same-resolution byte GeoTIFFs (what gdalbuildvrt writes, without GDAL)."""
    with rasterio.open(tiles[0]) as first:
        res, crs, count = first.res, first.crs, first.count
    bounds = [rasterio.open(t).bounds for t in tiles]
    left, top = min(b.left for b in bounds), max(b.top for b in bounds)
    width = round((max(b.right for b in bounds) - left) / res[0])
    height = round((top - min(b.bottom for b in bounds)) / res[1])
    grid = Grid(crs, Affine(res[0], 0, left, 0, -res[1], top), width, height)
    windows = [
        Window(
            round((b.left - left) / res[0]),
            round((top - b.top) / res[1]),
            round((b.right - b.left) / res[0]),
            round((b.top - b.bottom) / res[1]),
        )
        for b in bounds
    ]
    write_vrt(path, grid, count, zip(windows, tiles, strict=True), data_type="Byte")
    return path


def cut(src: Path, out_dir: Path, size: int) -> list[Path]:
    """The image cut into size x size GeoTIFF tiles (the scenes a mosaic is made of)."""
    out = []
    with rasterio.open(src) as ds:
        for y in range(0, ds.height, size):
            for x in range(0, ds.width, size):
                win = Window(x, y, size, size)
                path = out_dir / f"{src.stem}_{y}_{x}.tif"
                profile = ds.profile | {"width": size, "height": size, "transform": ds.window_transform(win)}
                with rasterio.open(path, "w", **profile) as dst:
                    dst.write(ds.read(window=win))
                out.append(path)
    return out


def assert_same_outputs(single: dict, clustered: dict, tol: float = 1e-5) -> None:
    """Every output of the cluster run equals the single-machine run's: float rasters within `tol` of their range
    (a model's convolutions round differently in other batch groupings: float32 ulps), masks and classes exactly,
    the same polygons; and the cluster's rasters are Cloud-Optimized GeoTIFFs."""
    outs = {o["key"]: o["path"] for o in clustered["outputs"]}
    assert set(outs) == {o["key"] for o in single["outputs"]}
    for o in single["outputs"]:
        if o["kind"] == "vector":
            with fiona.open(o["path"]) as a, fiona.open(outs[o["key"]]) as b:
                assert len(a) == len(b) and len(a) > 0
            continue
        with rasterio.open(o["path"]) as a, rasterio.open(outs[o["key"]]) as b:
            assert (a.crs, a.transform, a.shape, a.dtypes) == (b.crs, b.transform, b.shape, b.dtypes)
            assert str(a.nodata) == str(b.nodata) and a.descriptions == b.descriptions  # nodata may be NaN
            assert b.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            x, y = a.read().astype(np.float64), b.read().astype(np.float64)
            if np.issubdtype(a.dtypes[0], np.floating):
                assert np.array_equal(np.isnan(x), np.isnan(y))
                scale = max(float(np.nanmax(np.abs(x))), 1.0)
                assert np.nanmax(np.abs(x - y)) <= tol * scale, o["key"]
                print(f"{o['key']}: max abs diff {np.nanmax(np.abs(x - y)):.3g} (range {scale:.3g})")
            else:
                assert np.array_equal(x, y), o["key"]


# --- without Ray ------------------------------------------------------------------------------------------------


def test_parts_cover_the_grid_once_in_whole_tiles() -> None:
    spec = TileSpec(64, 16, 2)
    for height, width, block in ((300, 200, 100), (48, 1000, 4096), (1000, 49, 48)):
        cover = np.zeros((height, width), dtype=int)
        for part in partition(0, height, width, spec, block):
            cover[part.y : part.y + part.height, part.x : part.x + part.width] += 1
            assert part.y == part.row0 * spec.stride and part.x == part.col0 * spec.stride
        assert (cover == 1).all()


def test_a_failing_part_is_reported_with_its_window(tmp_path: Path) -> None:
    """PartWorker (the actor's code, called here directly): a part that keeps failing comes back as an error that
    says what failed, after the attempts; the other parts are written."""
    grid = Grid(None, Affine.identity(), 96, 96)
    spec = TileSpec(32, 8, 2)

    def read(win: Window) -> tuple[np.ndarray, np.ndarray]:
        if win.col_off >= 48:
            raise OSError("a read error on the network share")
        return np.ones((1, win.height, win.width), np.float32), np.ones((win.height, win.width), bool)

    ref = PassRef(lambda: TiledPass(96, 96, read, lambda b, v: b, 1, spec), grid, spec, 1)
    worker = PartWorker([ref], threads=0)
    parts = partition(0, 96, 96, spec, 48)
    items = [
        json.dumps({"pass": 0, "part": vars(p), "name": p.id, "file": str(tmp_path / f"{p.id}.tif")}) for p in parts
    ]
    out = worker({"item": np.array(items)})
    errors = dict(zip(out["name"], out["error"], strict=True))
    assert [p.id for p in parts if errors[p.id]] == [p.id for p in parts if p.x >= 48]  # they read x >= 48
    assert all("a read error on the network share" in e for e in errors.values() if e), errors
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(f"{p.id}.tif" for p in parts if not errors[p.id])
    vrt = tmp_path / "all.vrt"
    write_vrt(vrt, grid, 2, [(p.window, tmp_path / f"{p.id}.tif") for p in parts if not errors[p.id]])
    with rasterio.open(vrt) as ds:
        values, valid = ds.read(window=Window(0, 0, 32, 96))
    assert np.allclose(values, 1, atol=1e-6) and (valid == 1).all(), np.argwhere(values != 1)


# --- on a local Ray cluster ---------------------------------------------------------------------------------------


def test_cva_over_a_mosaic_and_a_scene_in_another_crs_equals_the_single_machine_runs(head: str, tmp_path: Path) -> None:
    """Two scenes: a VRT mosaic of four GeoTIFF tiles cut from a LEVIR-CD image, and a LEVIR-CD crop reprojected to
    UTM (another CRS, so processed on its own grid); Otsu's threshold comes from the distributed first pass."""
    before, after, _ = levir("test_1")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    scenes_b = [mosaic(cut(before, tiles, 512), tmp_path / "city_A.vrt")]
    scenes_a = [mosaic(cut(after, tiles, 512), tmp_path / "city_B.vrt")]
    b2, a2, _ = levir("test_55_0256_0000")
    for src, dst in ((b2, tmp_path / "utm_A.tif"), (a2, tmp_path / "utm_B.tif")):
        reproject_file(src, dst, "EPSG:32650")
    scenes_b.append(tmp_path / "utm_A.tif")
    scenes_a.append(tmp_path / "utm_B.tif")

    out = tmp_path / "cluster"
    args = ["--before", *map(str, scenes_b), "--after", *map(str, scenes_a), "--out-dir", str(out)]
    clustered = result_of(cli("cluster", "change.cva", "--address", head, "--block-size", "300", *args, "--json"))
    assert sorted(p.name for p in out.iterdir()) == ["city_A", "utm_A"]  # nothing else: the run's state is gone
    by_scene = {s["scene"]: s for s in clustered["metrics"]["scenes"]}
    for i, label in enumerate(["city_A", "utm_A"]):
        single = result_of(
            cli(
                "change.cva", "--before", str(scenes_b[i]), "--after", str(scenes_a[i]),
                "--out-dir", str(tmp_path / f"single_{i}"), "--json",
            )
        )  # fmt: skip
        mine = [o for o in clustered["outputs"] if Path(o["path"]).parent.name == label]
        assert_same_outputs(single, {"outputs": mine})
        for k in ("threshold", "changed_pixels", "polygons"):
            assert by_scene[label][k] == single["metrics"][k], k
    with rasterio.open(out / "utm_A" / "cva_change_mask.tif") as utm:
        assert utm.crs.to_epsg() == 32650
    # 3 x 3 parts of one 512-px tile each (stride 448) over the 1024-px mosaic, one for the 256-px crop
    assert clustered["metrics"]["parts_computed"] == 9 + 1 and clustered["metrics"]["parts_reused"] == 0


@pytest.fixture(scope="module")
def filf_adapter(data_dir: Path) -> str:
    before, after, label = levir("test_2_0000_0512")
    cmd = ["change.finetune", "--before", str(before), "--after", str(after), "--labels", str(label)]
    result_of(cli(*cmd, "--adapter-name", "city", *FILF_FAST, "--json"))
    return "city"


def detect_args(out: Path) -> list[str]:
    before, after, _ = levir("test_2_0000_0000")
    return ["--before", str(before), "--after", str(after), "--adapter", filf_adapter_name(), "--out-dir", str(out)]


def filf_adapter_name() -> str:
    return "city"


def test_filf_on_the_cluster_equals_the_single_machine_run(head: str, filf_adapter: str, tmp_path: Path) -> None:
    single = result_of(cli("change.detect", *detect_args(tmp_path / "single"), *TILES, "--json"))
    clustered = result_of(
        cli("cluster", "change.detect", "--address", head, "--workers", "2", "--block-size", "96",
            *detect_args(tmp_path / "cluster"), *TILES, "--json")
    )  # fmt: skip
    assert_same_outputs(single, clustered)
    assert clustered["metrics"]["changed_pixels"] == single["metrics"]["changed_pixels"]
    assert clustered["metrics"]["parts_computed"] == 4  # 5 x 5 tiles in 2 x 2 parts


def test_killing_an_actor_mid_run_still_gives_the_complete_result(head: str, filf_adapter: str, tmp_path: Path) -> None:
    single = result_of(cli("change.detect", *detect_args(tmp_path / "single"), *TILES, "--json"))
    cmd = [sys.executable, "-m", "backend", "cluster", "change.detect", "--address", head, "--workers", "2"]
    cmd += ["--block-size", "48", *detect_args(tmp_path / "cluster"), *TILES, "--json"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, done_then = None, 0
    for line in proc.stderr:  # progress lines ("cluster part 3/25 …"): kill an actor once the first part is in
        if "cluster part" in line and killed is None:
            actors = actor_pids()
            assert actors, "no actor process found"
            killed = actors[0]
            os.kill(killed, signal.SIGKILL)
            done_then = int(line.split("cluster part ")[1].split("/")[0])
    proc.wait(timeout=600)
    assert killed is not None and killed not in actor_pids() and done_then < 25  # killed mid-run
    clustered = json.loads(proc.stdout.read())
    assert_same_outputs(single, clustered)
    assert clustered["metrics"]["parts_computed"] == 25


def pids_with(word: bytes) -> list[int]:
    """The processes whose command line holds `word`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and word in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue  # ended meanwhile
    return pids


def actor_pids() -> list[int]:
    """The processes of the run's actors (Ray names them after the actor class)."""
    return pids_with(b"PartWorker")


def wait_for(predicate, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_rerun_after_an_interrupted_run_computes_only_the_unfinished_parts(
    head: str, filf_adapter: str, tmp_path: Path
) -> None:
    out = tmp_path / "cluster"
    cmd = [sys.executable, "-m", "backend", "cluster", "change.detect", "--address", head, "--workers", "1"]
    cmd += ["--block-size", "48", *detect_args(out), *TILES, "--json"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = out / ".cluster-change.detect" / "manifest.json"

    def parts_done() -> int:
        try:
            return len(json.loads(manifest.read_text())["done"])
        except (OSError, ValueError):
            return 0

    wait_for(lambda: parts_done() >= 3 or proc.poll() is not None)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: cancel
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "The job was cancelled" in err, err
    assert [p.name for p in out.iterdir()] == [".cluster-change.detect"]  # no output that looks like a result
    done = parts_done()
    assert 3 <= done < 25

    rerun = result_of(cli("cluster", "change.detect", "--address", head, "--block-size", "48",
                          *detect_args(out), *TILES, "--json"))  # fmt: skip
    assert rerun["metrics"]["parts_reused"] == done
    assert rerun["metrics"]["parts_computed"] == 25 - done
    single = result_of(cli("change.detect", *detect_args(tmp_path / "single"), *TILES, "--json"))
    assert_same_outputs(single, rerun)
    assert not (out / ".cluster-change.detect").exists()


def test_panadapter_on_a_local_cluster_equals_the_single_machine_run(data_dir: Path, tmp_path: Path) -> None:
    fast = ["--backbone", "tiny", "--allow-random-backbone", "--steps-per-epoch", "4"]
    pair = ["--pan", str(PAN), "--ms", str(MS)]
    result_of(cli("pansharpen.finetune", *pair, "--adapter-name", "sn6", *fast, "--prior-epochs", "1",
                  "--adapter-epochs", "1", "--json"))  # fmt: skip
    apply = ["--adapter", "sn6", "--tile-size", "64"]
    single = result_of(cli("pansharpen.apply", *pair, *apply, "--out-dir", str(tmp_path / "single"), "--json"))
    clustered = result_of(
        cli("cluster", "pansharpen.apply", "--address", "local", "--block-size", "64", *pair, *apply,
            "--out-dir", str(tmp_path / "cluster"), "--json")
    )  # fmt: skip
    assert_same_outputs(single, clustered)
    assert clustered["metrics"]["parts_computed"] > 1


def test_bad_cluster_input_is_a_plain_error_and_writes_nothing(tmp_path: Path) -> None:
    before, after, _ = levir("test_2_0000_0000")
    out = tmp_path / "never"
    pair = ["--before", str(before), "--after", str(after), "--out-dir", str(out)]
    proc = cli("cluster", "change.cva", "--address", "127.0.0.1:1", *pair)
    assert proc.returncode == 2 and "Cannot reach the Ray cluster at '127.0.0.1:1': nothing answers" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    three_after = ["--after", str(after), str(after), str(after)]
    proc = cli("cluster", "change.cva", "--address", "local", *pair[:2], str(before), *three_after, *pair[4:])
    assert proc.returncode == 2 and "as many each" in proc.stderr
    proc = cli("cluster", "change.finetune", "--address", "local")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_the_worker_runs_a_job_on_the_cluster_with_progress(head: str, worker_env: None, tmp_path: Path) -> None:
    """What QGIS does with "Run on a Ray cluster": the job's `cluster` parameter, through the real worker; Ray's own
    prints must not reach the protocol's stdout, and the progress says how far the parts are."""
    before, after, ref = levir("test_1")
    client = WorkerClient(sys.executable, ROOT)
    client.start()
    try:
        params = {"before": str(before), "after": str(after), "reference": str(ref), "out_dir": str(tmp_path)}
        handle = client.run_job("change.cva", {**params, "cluster": head, "tile_size": 256})
        assert handle.succeeded, handle.outcome
        parts = [p["message"] for p in handle.progress if p["stage"] == "cluster"]
        assert parts and all("MP/s" in m for m in parts)
        assert handle.outcome["metrics"]["parts_computed"] == 1  # one part of the default 8192 px
        assert 0 <= handle.outcome["metrics"]["f1"] <= 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cva_change_mask.tif", "cva_change_probability.tif",
                                                             "cva_changes.gpkg"]  # fmt: skip
        assert client.alive and client.request("initialize")["backend_version"]
    finally:
        client.shutdown()


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # as env(): the worker joins the module's head by address
