"""Cancels at random moments and a killed worker, against real workers running real jobs on LEVIR-CD.

(c) 100 jobs (FILF detection on the tiny random encoder, and CVA), each cancelled at a seeded random moment:
the worker lives on, a cancelled job leaves no file, a job that beat its cancel left complete results, and
the loaded backbone is still loaded afterwards. (d) A worker SIGKILLed mid-job leaves `.partial-*` files
(nothing can clean up inside a killed process); the next worker removes them when it starts.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, levir

from backend.client import WorkerClient
from backend.context import JobContext, journal_dir
from backend.jobs import JOBS
from backend.jobs.base import run_job

SEED = 15
ADAPTER = "fuzz-cancel"


@pytest.fixture(scope="module")
def adapter() -> str:
    """A FILF adapter on the tiny random encoder, trained in a few seconds on a real LEVIR-CD crop."""
    before, after, label = levir("test_2_0000_0000")
    spec = JOBS["change.finetune"]
    params = {
        "before": str(before),
        "after": str(after),
        "labels": str(label),
        "adapter_name": ADAPTER,
        "backbone": "tiny_vit_tiny",
        "allow_random_backbone": True,
        "epochs": 1,
        "steps_per_epoch": 2,
        "batch_size": 2,
        "patch_size": 64,
        "overwrite": True,
    }
    run_job(spec, spec.validate(params), JobContext())
    return ADAPTER


def job_params(kind: str, out: Path, adapter: str) -> tuple[str, dict]:
    before, after, _ = levir("test_2_0000_0000")
    common = {"before": str(before), "after": str(after), "out_dir": str(out), "tile_size": 64, "overlap": 16}
    if kind == "detect":
        return "change.detect", {**common, "adapter": adapter}
    return "change.cva", common


def wait_for(condition: Callable[[], bool], timeout: float = 120) -> None:
    """Poll an event-like condition (never a fixed sleep standing in for one)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_a_hundred_random_cancels_leave_the_worker_and_its_model_alive(
    worker: WorkerClient, adapter: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    first = worker.run_job(*job_params("detect", tmp_path / "first", adapter))
    assert first.succeeded, first.outcome
    outcomes = {"finished": 0, "CANCELLED": 0}
    for i in range(100):
        out = tmp_path / f"run{i}"
        handle = worker.start_job(*job_params(rng.choice(["detect", "cva"]), out, adapter))
        moment = rng.choice(["at once", "first progress", "later"])
        if moment != "at once":
            wait_for(lambda h=handle: bool(h.progress) or h.done.is_set())
        if moment == "later":
            handle.done.wait(rng.uniform(0, 0.3))  # random input timing; no assertion depends on it
        worker.cancel(handle.job_id)
        assert handle.done.wait(120), f"job {i} did not end after its cancel"
        status = handle.outcome["status"] if handle.succeeded else handle.outcome["code"]
        assert status in outcomes, handle.outcome
        outcomes[status] += 1
        if status == "CANCELLED":
            assert files_in(out) == [], f"job {i} cancelled {moment}: {files_in(out)}"
        else:
            assert all(not n.startswith(".partial") for n in files_in(out)) and len(files_in(out)) == 3
        assert worker.alive
    last = worker.run_job(*job_params("detect", tmp_path / "last", adapter))
    assert last.succeeded, last.outcome
    assert any("already loaded" in log["message"] for log in last.logs), "the backbone was loaded again"
    print("cancel outcomes:", outcomes)
    assert outcomes["CANCELLED"] >= 50, outcomes  # most cancels land mid-job
    assert not list(journal_dir().glob("*.json"))


def test_partial_files_of_a_killed_worker_are_removed_by_the_next_one(adapter: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    killed = WorkerClient(sys.executable, ROOT)
    killed.start()
    handle = killed.start_job("change.cva", {**job_params("cva", out, adapter)[1], "tile_size": 32})
    wait_for(lambda: bool(handle.progress) and any(p.name.startswith(".partial") for p in out.iterdir()))
    assert not handle.done.is_set(), handle.outcome  # mid-way, its files open
    os.kill(killed.proc.pid, signal.SIGKILL)
    assert handle.done.wait(30) and handle.outcome["code"] == "WORKER_DIED"
    left = [p.name for p in out.iterdir()]
    assert left and all(n.startswith(".partial") for n in left)  # a killed process cannot clean up

    fresh = WorkerClient(sys.executable, ROOT)
    fresh.start()  # answers initialize only after its start-up clean-up
    try:
        assert list(out.iterdir()) == []
        assert not list(journal_dir().glob("*.json"))
    finally:
        fresh.shutdown()
