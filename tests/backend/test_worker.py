"""The worker protocol against a real worker process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, levir

from backend.client import RpcError, WorkerClient


def slow_cva_params(out_dir: Path) -> dict:
    """A real change.cva job made slow (tiny tiles) so it can be cancelled or killed mid-run."""
    before, after, _ = levir("test_1")
    return {"before": str(before), "after": str(after), "out_dir": str(out_dir), "tile_size": 32, "overlap": 16}


def test_initialize_reports_versions_devices_and_jobs(worker: WorkerClient) -> None:
    info = worker.info
    assert info["versions"]["torch"].startswith("2.")
    assert info["devices"][0]["name"] == "cpu"
    assert "change.cva" in info["jobs"]
    names = [p["name"] for p in info["jobs"]["change.cva"]["params"]]
    assert {"before", "after", "out_dir", "tile_size", "overlap", "batch_size"} <= set(names)
    assert Path(info["log_path"]).name == "worker.log"


def test_job_progress_and_result(worker: WorkerClient, tmp_path: Path) -> None:
    before, after, ref = levir("test_2_0000_0000")
    handle = worker.run_job(
        "change.cva", {"before": str(before), "after": str(after), "reference": str(ref), "out_dir": str(tmp_path)}
    )
    assert handle.succeeded, handle.outcome
    assert handle.progress, "no job.progress notification arrived"
    fractions = [p["fraction"] for p in handle.progress]
    assert fractions == sorted(fractions) and fractions[0] >= 0 and fractions[-1] <= 1
    kinds = {o["kind"] for o in handle.outcome["outputs"]}
    assert kinds == {"raster", "vector"}
    for o in handle.outcome["outputs"]:
        assert Path(o["path"]).is_file() and o["layer_name"] and o["style"].endswith(".qml")
    assert 0 <= handle.outcome["metrics"]["f1"] <= 1


def test_progress_is_throttled(worker: WorkerClient, tmp_path: Path) -> None:
    start = time.monotonic()
    handle = worker.run_job("change.cva", slow_cva_params(tmp_path))
    elapsed = time.monotonic() - start
    assert handle.succeeded, handle.outcome
    # ~1600 tiles each report progress; the pipe carries at most ~10 per second.
    assert len(handle.progress) <= 10 * elapsed + 5


def test_cancel_stops_quickly_and_leaves_no_output(worker: WorkerClient, tmp_path: Path) -> None:
    handle = worker.start_job("change.cva", slow_cva_params(tmp_path))
    while not handle.progress:
        time.sleep(0.05)
    time.sleep(0.5)
    t0 = time.monotonic()
    worker.cancel(handle.job_id)
    assert handle.done.wait(10)
    assert time.monotonic() - t0 < 2.0
    assert handle.outcome["status"] == "failed" and handle.outcome["code"] == "CANCELLED"
    assert list(tmp_path.iterdir()) == []
    # The worker lives on and runs the next job.
    again = worker.run_job("change.cva", {**slow_cva_params(tmp_path), "tile_size": 512, "overlap": 64})
    assert again.succeeded


def test_jobs_queue_one_at_a_time_and_queued_jobs_cancel(worker: WorkerClient, tmp_path: Path) -> None:
    first = worker.start_job("change.cva", slow_cva_params(tmp_path / "a"))
    seen_first_done: list[bool] = []
    second = worker.start_job(
        "change.cva",
        slow_cva_params(tmp_path / "b"),
        on_progress=lambda *_: seen_first_done.append(first.done.is_set()),
    )
    third = worker.start_job("change.cva", slow_cva_params(tmp_path / "c"))
    worker.cancel(third.job_id)
    assert third.done.wait(5) and third.outcome["code"] == "CANCELLED"
    assert first.done.wait(120) and first.succeeded
    assert second.done.wait(120) and second.succeeded
    # Notifications arrive in order, so every progress of the second came after the first ended.
    assert seen_first_done and all(seen_first_done)
    assert not (tmp_path / "c").exists()


def test_malformed_input_gets_errors_and_worker_lives(worker: WorkerClient, tmp_path: Path) -> None:
    for line in ("this is not json", "[1, 2, 3]", '{"jsonrpc": "2.0", "id": 5}'):
        worker.send_raw(line)
    try:
        worker.request("no.such.method")
    except RpcError as exc:
        assert exc.code == -32601
    else:
        raise AssertionError("unknown method accepted")
    for bad in ({"job": "nope"}, {"job": "change.cva", "params": {"before": "x"}}, {"job": "change.cva", "params": []}):
        try:
            worker.request("job.start", bad)
        except RpcError as exc:
            assert exc.code == -32602 and exc.args[0]
        else:
            raise AssertionError(f"bad job.start accepted: {bad}")
    with pytest.raises(RpcError, match="tile_size"):
        worker.request(
            "job.start",
            {"job": "change.cva", "params": {"before": "a", "after": "b", "out_dir": "c", "tile_size": "big"}},
        )
    with pytest.raises(RpcError, match="used in file names, so it cannot contain '/'"):  # no escape from out_dir
        worker.request(
            "job.start",
            {"job": "change.cva", "params": {"before": "a", "after": "b", "out_dir": str(tmp_path), "name": "../x"}},
        )
    assert worker.alive
    assert worker.request("initialize")["backend_version"]


def test_failing_job_reports_plain_error_and_loop_survives(worker: WorkerClient, tmp_path: Path) -> None:
    handle = worker.run_job("change.cva", {"before": "/nope/a.tif", "after": "/nope/b.tif", "out_dir": str(tmp_path)})
    assert handle.outcome["code"] == "INVALID_INPUT"
    assert "does not exist" in handle.outcome["message"] and "Traceback" not in handle.outcome["message"]
    assert worker.alive


def test_worker_killed_mid_job_is_reported_as_failure(worker: WorkerClient, tmp_path: Path) -> None:
    handle = worker.start_job("change.cva", slow_cva_params(tmp_path))
    while not handle.progress:
        time.sleep(0.05)
    os.kill(worker.proc.pid, signal.SIGKILL)
    assert handle.done.wait(10)
    assert handle.outcome["code"] == "WORKER_DIED"
    assert "stopped unexpectedly" in handle.outcome["message"]
    assert not worker.alive


NOISY_WORKER = """
import os, sys
from backend.jobs import JOBS
from backend.jobs.base import JobSpec
from backend.protocol import JobResult

def noisy(ctx, params):
    print("a library printing to stdout")
    sys.stdout.flush()
    os.write(1, b"C-level write to fd 1\\n")
    ctx.progress(0.5, "noise", "", force=True)
    return JobResult(metrics={"ok": 1})

JOBS["test.noisy"] = JobSpec("test.noisy", "prints to stdout", (), noisy)
print("import-time print before the worker claims stdout goes where it goes")
from backend.worker import main
sys.exit(main())
"""


def test_stdout_carries_protocol_lines_only_when_a_library_prints(tmp_path: Path) -> None:
    # A real worker process with a test-only job injected before main() (the job prints to
    # stdout from Python and from C level); every stdout line after start must be JSON-RPC.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RS_PEFT_QGIS_LOG_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", NOISY_WORKER],
        cwd=ROOT,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    requests = [
        {"jsonrpc": "2.0", "id": 1, "method": "job.start", "params": {"job": "test.noisy"}},
    ]
    proc.stdin.write("".join(json.dumps(r) + "\n" for r in requests))
    proc.stdin.flush()
    lines = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if '"job.finished"' in line:
            break
    proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "shutdown"}) + "\n")
    proc.stdin.flush()
    rest, err = proc.communicate(timeout=30)
    lines += rest.splitlines(keepends=True)
    assert lines[0].startswith("import-time print")  # before main(): not ours to control
    msgs = [json.loads(x) for x in lines[1:]]  # every later line parses as JSON-RPC
    assert all(m["jsonrpc"] == "2.0" for m in msgs)
    assert any(m.get("method") == "job.finished" for m in msgs)
    assert "a library printing to stdout" in err and "C-level write to fd 1" in err
