"""Apply jobs on a Ray cluster: the job's tiled pass split into parts that Ray Data streams to a pool of actors.

Each actor opens the job's pass once (rasters, backbone and adapter; one GPU each on a GPU cluster) and predicts
the parts it is handed with the one tiled predictor (`TiledPass.run(part=…)`), writing each part as a GeoTIFF in
the run's state folder (`<out dir>/.cluster-<job>/`). The driver records finished parts in a manifest, so a rerun
after a crash or a cancel skips them; then the job writes its own outputs from a VRT of the parts, as it would
from its single-machine prediction, and the raster outputs are copied as Cloud-Optimized GeoTIFFs.

Ray is imported here only: single-machine jobs and the plugin never load it (requirements/ray.txt).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil

from backend import adapters
from backend.context import Cancelled, JobContext, to_job_error
from backend.distributed.blocks import Manifest, Part, fingerprint, partition, write_part, write_vrt
from backend.io.raster import Grid
from backend.io.tiling import TiledPass, TileSpec, block_windows
from backend.io.writer import OVERVIEW_MIN_SIZE
from backend.params import LAYER_KINDS
from backend.protocol import INTERNAL, INVALID_INPUT, MISSING_WEIGHTS, JobError, JobResult

# Pixels a side of a part, by default. A part also computes the tile row above and the tile column left of it (for
# bit-exact blending), about 2 / (block / stride) more work: +11 % at FILF's stride of 448 px. Seconds of work per
# part on a GPU, a few minutes on CPUs; the manifest records parts, so a rerun loses at most the parts in flight.
BLOCK = 8192
# Options that change only what the driver writes from the parts, not the parts.
FINAL_ONLY = {"batch_size", "name", "threshold", "simplify", "min_area_m2", "reference", "out_dir", "cluster"}
ATTEMPTS = 3  # of a part inside its actor before it is reported as failed (a dead actor is Ray's to retry)
THREADS_PER_CPU_ACTOR = 4


@dataclass
class PassRef:
    """A tiled pass to run on the cluster: how an actor opens it (picklable), and its grid and tiling."""

    open: Callable[[], TiledPass]
    grid: Grid
    spec: TileSpec
    channels: int


@dataclass
class Scene:
    """One scene of a cluster run: its own context (outputs in its own folder) and parameters."""

    ctx: JobContext
    params: dict[str, Any]
    label: str


class PartWorker:
    """A Ray Data actor: opens a pass once and predicts the parts it is handed into their files."""

    def __init__(self, passes: list[PassRef], threads: int) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.passes = passes
        self.opened: tuple[int, TiledPass] | None = None

    def _pass(self, i: int) -> TiledPass:
        if self.opened is not None and self.opened[0] == i:
            return self.opened[1]
        self._close()
        tiles = self.passes[i].open()
        self.opened = (i, tiles)
        return tiles

    def _close(self) -> None:
        if self.opened is not None:
            self.opened[1].close()
            self.opened = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"name": [], "seconds": [], "error": [], "code": []}
        for item in batch["item"]:
            job = json.loads(str(item))
            part, i = Part(**job["part"]), job["pass"]
            started, error, code = time.monotonic(), "", ""
            for _ in range(ATTEMPTS):
                try:
                    write_part(self._pass(i), part, self.passes[i].grid, Path(job["file"]))
                    error = ""
                    break
                except Exception as exc:  # reported with the part's window once the attempts are spent
                    err = to_job_error(exc)
                    error, code = err.message, err.code
                    self._close()
                    if code in (INVALID_INPUT, MISSING_WEIGHTS):  # the same next time (a path this node lacks …)
                        break
            out["name"].append(job["name"])
            out["seconds"].append(time.monotonic() - started)
            out["error"].append(error)
            out["code"].append(code)
        return out


class Cluster:
    """A connection to a Ray cluster for one job: runs tiled passes (and small first passes) on it."""

    def __init__(self, ctx: JobContext, address: str, state: Path, key: str, workers: int, block: int) -> None:
        self.ctx, self.block = ctx, block
        _connect(address)  # first: a wrong address leaves nothing in the output folder
        import ray

        try:
            self.manifest = Manifest(state, key)
            if self.manifest.stale:
                ctx.warn(
                    "An unfinished cluster run with other inputs or settings was in the output folder: starting over."
                )
            self.computed = self.reused = 0
            self.failed: list[str] = []
            self.parts: list[tuple[int, Part]] = []
            resources = ray.cluster_resources()
            self.cpus, self.gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
            # An actor lives on one node: it can ask for no more CPUs than the largest node has.
            self.node_cpus = max((int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=1)
            self.workers = workers
        except BaseException:
            ray.shutdown()  # the next job of this process must be able to connect again
            raise

    def device(self, wanted: str) -> str:
        """The device the actors run on: a GPU each where the cluster has GPUs (auto or cuda), else the CPU."""
        if wanted.startswith("cuda") and not self.gpus:
            raise JobError(INVALID_INPUT, "The Ray cluster has no GPU.", "Use --device auto or cpu.")
        return "cuda" if self.gpus and wanted != "cpu" else "cpu"

    def tiled(self, passes: Sequence[PassRef], device: str, lo: float, hi: float) -> list[Path]:
        """Run every pass over its grid, part by part on the actors; a VRT of each pass's parts."""
        parts = [
            (i, part)
            for i, ref in enumerate(passes)
            for part in partition(i, ref.grid.height, ref.grid.width, ref.spec, self.block)
        ]
        pending = [(i, part) for i, part in parts if part.id not in self.manifest.done]
        self.reused += len(parts) - len(pending)
        if self.reused:
            self.ctx.log(f"Resuming: {self.reused} of {len(parts)} parts were done by an earlier run.")
        if pending:
            self._run_parts(passes, pending, len(parts), device, lo, hi)
        self.parts = parts
        vrts = []
        for i, ref in enumerate(passes):
            vrt = self.manifest.folder / f"pass{i}.vrt"
            mine = [(part.window, self.manifest.file(part)) for j, part in parts if j == i]
            write_vrt(vrt, ref.grid, ref.channels + 1, mine)
            vrts.append(vrt)
        return vrts

    def _run_parts(
        self, passes: Sequence[PassRef], pending: list[tuple[int, Part]], total: int, device: str, lo: float, hi: float
    ) -> None:
        import ray
        import ray.data

        gpu = device == "cuda"
        actors = self.workers or (self.gpus if gpu else max(1, self.cpus // THREADS_PER_CPU_ACTOR))
        actors = max(1, min(actors, len(pending)))
        cpus = 1 if gpu else max(1, min(self.cpus // actors, self.node_cpus))
        items = [
            {
                "item": json.dumps(
                    {"pass": i, "part": vars(part), "name": part.id, "file": str(self.manifest.file(part))}
                )
            }
            for i, part in pending
        ]
        with warnings.catch_warnings():
            # Ray 2.60 has no named option for it yet; without it, a part that kills every actor would run forever.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                PartWorker,
                fn_constructor_kwargs={"passes": list(passes), "threads": 0 if gpu else cpus},
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2),
                num_cpus=cpus,
                num_gpus=1 if gpu else 0,
                max_task_retries=ATTEMPTS,  # a part whose actor died (killed node, out of memory) runs again
            )
        self.ctx.log(f"{len(pending)} parts on {actors} {'GPU' if gpu else 'CPU'} actor(s) of the Ray cluster.")
        by_name = {part.id: part for _, part in pending}
        started, pixels, done = time.monotonic(), 0, total - len(pending)
        pending_pixels = sum(p.pixels for _, p in pending)
        try:
            for row in _rows(ds, self.ctx):
                part = by_name[row["name"]]
                if row["error"] and row["code"] in (INVALID_INPUT, MISSING_WEIGHTS):  # every part would say it
                    raise JobError(row["code"], f"On the cluster ({part.describe()}): {row['error']}")
                if row["error"]:
                    self.failed.append(f"{part.describe()}: {row['error']}")
                    continue
                self.manifest.record(part.id, {"seconds": row["seconds"]})
                self.computed += 1
                done += 1
                pixels += part.pixels
                rate = pixels / 1e6 / max(time.monotonic() - started, 1e-9)
                eta = f", about {_duration((pending_pixels - pixels) / 1e6 / rate)} left" if rate > 0 else ""
                self.ctx.progress(
                    lo + (hi - lo) * done / total, "cluster", f"part {done}/{total}, {rate:.2f} MP/s{eta}"
                )
        except (Cancelled, JobError):
            raise
        except Exception as exc:
            raise JobError(
                INTERNAL,
                f"The Ray cluster stopped the run: {str(exc).splitlines()[0][:300]}",
                self.resume_hint(total),
            ) from exc
        if self.failed:
            shown = "; ".join(self.failed[:5]) + (f"; and {len(self.failed) - 5} more" if len(self.failed) > 5 else "")
            raise JobError(
                INTERNAL, f"{len(self.failed)} part(s) failed {ATTEMPTS} times: {shown}", self.resume_hint(total)
            )

    def part_files(self, i: int) -> list[Path]:
        """The part files of pass `i` of the last `tiled` call."""
        return [self.manifest.file(part) for j, part in self.parts if j == i]

    def resume_hint(self, total: int) -> str:
        return (
            f"{len(self.manifest.done)} of {total} parts are done and kept: run the same command again to compute "
            "only the others."
        )

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], lo: float, hi: float, stage: str) -> list[Any]:
        """fn(item) for every item as Ray tasks (one CPU each); the results in the items' order."""
        import ray

        task = ray.remote(num_cpus=1, max_retries=ATTEMPTS)(fn)
        refs = [task.remote(item) for item in items]
        waiting = list(refs)
        try:
            while waiting:
                _, waiting = ray.wait(waiting, num_returns=min(len(waiting), 1), timeout=0.2)
                done = len(refs) - len(waiting)
                self.ctx.progress(lo + (hi - lo) * done / len(refs), stage, f"part {done}/{len(refs)}")
            return ray.get(refs)
        except Cancelled:
            raise
        except Exception as exc:
            raise to_job_error(getattr(exc, "cause", None) or exc) from exc  # a task's own error, not Ray's wrapper

    def close(self, succeeded: bool) -> None:
        import ray

        ray.shutdown()  # first: actors still running would write into the state folder
        if succeeded or not self.manifest.done:  # what a rerun would reuse is kept, nothing else
            self.manifest.remove()
        elif self.ctx.cancel_event.is_set():
            self.ctx.warn(f"{len(self.manifest.done)} finished parts are kept in {self.manifest.folder} for a rerun.")


def _connect(address: str) -> None:
    """Start a Ray cluster on this machine (local) or join one (auto, host:port, ray://host:10001)."""
    # Ray's core would print C++ notes on the terminal (an error line about actor restarts from Ray Data's own
    # actors); at level fatal it prints only that it was set so, while starting, which goes to /dev/null.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"  # after a cancel's shutdown, Ray must not start a cluster of its own
    env = {k: v for k, v in os.environ.items() if k.startswith("RS_PEFT_QGIS_")}
    package = Path(__file__).resolve().parents[1]
    if address == "local":
        # Actors on this machine import the backend from where this process does.
        paths = [str(package.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        runtime_env: dict[str, Any] = {"env_vars": {**env, "PYTHONPATH": os.pathsep.join(paths)}}
    else:  # other machines get the backend's code from this one (their Python environment must match)
        runtime_env = {"env_vars": env, "py_modules": [str(package)], "excludes": ["__pycache__"]}
    _check_address(address)
    try:
        with _stderr_to_devnull():
            import ray
    except ImportError:
        raise JobError(
            INVALID_INPUT,
            "Running on a Ray cluster needs Ray, which is not installed in the backend's Python environment.",
            f"Install it there: {sys.executable} -m pip install 'ray[data]==2.60.0' (requirements/ray.txt).",
        ) from None
    if ray.is_initialized():  # one Ray connection per process (the worker runs one job at a time on it)
        raise JobError(
            INVALID_INPUT,
            "Another job of this backend is running on a Ray cluster.",
            "Wait for it to finish, or start this job from a terminal (python -m backend cluster …).",
        )
    try:
        with _stderr_to_devnull():
            ray.init(
                address=address,
                runtime_env=runtime_env,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
    except Exception as exc:  # ConnectionError, ValueError for a malformed address, RuntimeError …
        raise JobError(
            INVALID_INPUT,
            f"Cannot reach the Ray cluster at '{address}': {str(exc).splitlines()[0][:300]}",
            "Give local (a cluster on this machine), auto (the one `ray start` made here) or the head's address. "
            "A cluster with token authentication (`ray start`'s default) needs RAY_AUTH_MODE=token and its token "
            "(~/.ray/auth_token or RAY_AUTH_TOKEN) here too.",
        ) from None
    import ray.data

    data = ray.data.DataContext.get_current()
    data.enable_progress_bars = False
    data.print_on_execution_start = False
    for name in ("ray", "ray.data"):  # their notes are not the analyst's; failures reach the job as exceptions
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _check_address(address: str) -> None:
    """A head's address must answer before Ray is asked to join it (Ray would retry for minutes)."""
    if address in ("local", "auto"):
        return
    found = re.fullmatch(r"(?:ray://)?\[?([\w.:-]+?)\]?:(\d{1,5})", address)
    if not found:
        raise JobError(
            INVALID_INPUT,
            f"'{address}' is not a Ray cluster address.",
            "Give local, auto, the head's host:port (e.g. head:6379) or ray://head:10001.",
        )
    try:
        socket.create_connection((found[1], int(found[2])), timeout=5).close()
    except OSError as exc:
        raise JobError(
            INVALID_INPUT,
            f"Cannot reach the Ray cluster at '{address}': nothing answers there ({exc.strerror or exc}).",
            "Check that the cluster is running (ray status on its head) and the address and port.",
        ) from None


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """File descriptor 2 to /dev/null (C++ code writes there, not to sys.stderr); errors still raise."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _rows(ds: Any, ctx: JobContext) -> Iterator[dict[str, Any]]:
    """The dataset's rows as they come, checking for cancel meanwhile: Ray Data blocks while parts are computed,
    so a thread of its own iterates, and a cancel leaves it to `Cluster.close` (ray.shutdown) to stop."""
    rows: queue.Queue = queue.Queue()

    def consume() -> None:
        try:
            for row in ds.iter_rows():
                rows.put(("row", row))
            rows.put(("end", None))
        except BaseException as exc:  # handed to the job's thread
            rows.put(("error", exc))

    threading.Thread(target=consume, name="cluster-rows", daemon=True).start()
    while True:
        try:
            kind, value = rows.get(timeout=0.2)
        except queue.Empty:
            ctx.check_cancelled()
            continue
        if kind == "end":
            return
        if kind == "error":
            raise value
        yield value


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def read_blocks(vrt: Path, grid: Grid, block: int) -> Any:
    """(window, values (K, h, w), valid (h, w)) of a pass's VRT, block by block in row-major order."""
    with rasterio.open(vrt) as ds:
        for win in block_windows(grid.width, grid.height, block):
            data = ds.read(window=win)
            yield win, data[:-1], data[-1] > 0.5


def as_cog(ctx: JobContext, result: JobResult) -> None:
    """Copy the raster outputs as Cloud-Optimized GeoTIFFs (their overviews kept, none added)."""
    for out in result.outputs:
        if out.kind != "raster":
            continue
        tmp = ctx.pending_path(Path(out.path))
        cog = tmp.with_name(tmp.name + ".cog")
        with rasterio.open(tmp) as ds:
            big = max(ds.width, ds.height) >= OVERVIEW_MIN_SIZE
            predictor = 3 if np.issubdtype(np.dtype(ds.dtypes[0]), np.floating) else 2
        try:
            rasterio.shutil.copy(
                tmp,
                cog,
                driver="COG",
                COMPRESS="DEFLATE",
                PREDICTOR=predictor,
                OVERVIEWS="FORCE_USE_EXISTING" if big else "NONE",
                NUM_THREADS="ALL_CPUS",
            )
            os.replace(cog, tmp)
        finally:
            cog.unlink(missing_ok=True)


def scene_labels(paths: Sequence[str]) -> list[str]:
    """A folder name per scene, from its file name (numbered where two agree)."""
    labels: list[str] = []
    for path in paths:
        label = re.sub(r"[^\w.-]+", "_", Path(path).stem).strip("._") or "scene"
        labels.append(label if label not in labels else f"{label}_{len(labels) + 1}")
    return labels


def _prepare(
    job: Any, ctx: JobContext, scenes: list[dict[str, Any]], root: Path, address: str, workers: int, block: int
) -> tuple[list[Scene], Cluster]:
    """The scenes' contexts and parameters, and the connection to the cluster with the run's manifest."""
    path_params = [p.name for p in job.params if p.kind in LAYER_KINDS]
    # Actors run elsewhere (another folder, another node): input paths are made absolute here.
    scenes = [{k: os.path.abspath(v) if k in path_params and v else v for k, v in s.items()} for s in scenes]
    if len(scenes) > 1:
        first = next(n for n in path_params if scenes[0].get(n))
        labels = scene_labels([s[first] for s in scenes])
    else:
        labels = [""]
    runs = []
    for params, label in zip(scenes, labels, strict=True):
        child = JobContext(on_progress=ctx.on_progress, on_log=ctx.on_log, cancel_event=ctx.cancel_event)
        child.warnings = ctx.warnings
        out = root / label if label else root
        runs.append(Scene(child, {**params, "out_dir": str(out), "cluster": None}, label))
    adapter_files = [str(adapters.weights_file(s[p.name])) for s in scenes for p in job.params if p.kind == "adapter"]
    # What the parts depend on: not the options that only the final outputs use (a smaller batch after running out
    # of memory keeps the parts done; they differ from a run with the other batch only by float rounding).
    parts_params = [{k: v for k, v in s.params.items() if k not in FINAL_ONLY} for s in runs]
    extra = [[(f, os.stat(f).st_mtime_ns) for f in adapter_files], block or BLOCK]
    key = fingerprint(job.name, parts_params, path_params, extra)
    return runs, Cluster(ctx, address, root / f".cluster-{job.name}", key, workers, block or BLOCK)


def run(
    job: Any, ctx: JobContext, scenes: list[dict[str, Any]], address: str, workers: int = 0, block: int = BLOCK
) -> JobResult:
    """Run `job` (a JobSpec with a `cluster` plan) over one or more scenes on the Ray cluster at `address`.

    Each scene is the job's own parameters; with several, each writes into a folder of its own under the common
    output folder, named after its first input. Outputs are committed once every scene is done.
    """
    if job.cluster is None:
        raise JobError(INVALID_INPUT, f"The job {job.name} does not run on a cluster.", "Run it on this machine.")
    started = time.monotonic()
    root = ctx.prepare_out_dir(scenes[0]["out_dir"])
    try:
        runs, cluster = _prepare(job, ctx, scenes, root, address, workers, block)
    except BaseException:
        ctx.discard_outputs()  # the output folder, where this run created it
        raise
    succeeded = False
    try:
        results = job.cluster(runs, cluster)
        for scene, result in zip(runs, results, strict=True):
            as_cog(scene.ctx, result)
        ctx.check_cancelled()
        for scene in runs:
            scene.ctx.commit_outputs()
        succeeded = True
    except BaseException:
        for scene in runs:
            scene.ctx.discard_outputs()
        raise
    finally:
        for scene in runs:
            scene.ctx.end()
        cluster.close(succeeded)
        if not succeeded:
            ctx.discard_outputs()  # the output folder, where this run made it and nothing is kept in it
    merged = JobResult(outputs=[o for r in results for o in r.outputs], metrics={})
    if len(runs) == 1:
        merged.metrics.update(results[0].metrics)
    else:
        merged.metrics["scenes"] = [{"scene": s.label, **r.metrics} for s, r in zip(runs, results, strict=True)]
    merged.metrics.update(
        parts_computed=cluster.computed,
        parts_reused=cluster.reused,
        cluster_seconds=time.monotonic() - started,
    )
    merged.warnings = [w for r in results for w in r.warnings]
    return merged
