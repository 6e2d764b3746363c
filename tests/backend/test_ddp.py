"""Fine-tuning on several processes under torchrun (gloo on this CPU machine; NCCL on GPUs is the same code):
the loop's data parallelism reproduces one process, and `--nproc` runs a real fine-tune with rank 0 alone
reporting and saving."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, levir

from backend.cli import without_nproc

PROBE = Path(__file__).with_name("ddp_probe.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def probe(*command: str) -> dict:
    out = subprocess.run([*command, str(PROBE), "8"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_two_processes_train_exactly_as_one_on_the_same_global_batch() -> None:
    """No BatchNorm or dropout in the probe's model, so the only difference allowed is float rounding."""
    one = probe(sys.executable)
    two = probe(*TORCHRUN, "--nproc-per-node=2")
    assert one["batches"] == [8] * 25 and two["batches"] == [4] * 25  # each process trains on its half
    assert np.allclose(two["losses"], one["losses"], rtol=1e-6)
    assert one["losses"][-1] < 0.5 * one["losses"][0]  # it did learn
    for k, w in one["weights"].items():
        assert np.allclose(two["weights"][k], w, atol=1e-6), k


def finetune(tmp_path: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    before, after, label = levir("test_2_0000_0512")
    args = ["--before", str(before), "--after", str(after), "--labels", str(label), "--adapter-name", name]
    args += ["--backbone", "tiny_vit_tiny", "--allow-random-backbone", "--epochs", "2", "--steps-per-epoch", "3"]
    args += ["--patch-size", "64", "--json", "--quiet", *extra]
    env = {"RS_PEFT_QGIS_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "backend", "change.finetune", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_nproc_runs_a_real_change_finetune_on_two_processes(tmp_path: Path) -> None:
    """FILF (miniature encoder) on a real LEVIR-CD pair: one process with a batch of 4, then two with 2 each.
    BatchNorm sees each process's half, so the losses agree closely, not exactly."""
    one = finetune(tmp_path, "one", "--batch-size", "4")
    two = finetune(tmp_path, "two", "--batch-size", "4", "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    result = json.loads(two.stdout)  # rank 0's alone: one JSON object
    assert result["metrics"]["adapter"] == "two"
    saved = {p.parent.name for p in (tmp_path / "data").rglob("adapter.json")}
    assert saved == {"one", "two"}
    histories = [
        json.loads(next((tmp_path / "data").rglob(f"{n}/adapter.json")).read_text())["config"]["history"]
        for n in ("one", "two")
    ]
    assert np.allclose([h["loss"] for h in histories[1]], [h["loss"] for h in histories[0]], rtol=1e-2)


def test_bad_input_on_several_processes_is_one_plain_error(tmp_path: Path) -> None:
    done = finetune(tmp_path, "odd", "--batch-size", "3", "--nproc", "2")  # refused before starting processes
    assert done.returncode == 2 and "must be a multiple of 2" in done.stderr
    missing = finetune(tmp_path, "gone", "--batch-size", "4", "--nproc", "2", "--aoi", str(tmp_path / "none.gpkg"))
    assert missing.returncode == 2 and missing.stderr.count("Error:") == 1  # rank 0's words, not each rank's
    assert "Traceback" not in missing.stderr and "does not exist" in missing.stderr
    assert not list((tmp_path / "data").rglob("adapter.json"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["x", "--nproc", "2", "--y"], ["x", "--y"]), (["x", "--nproc=4"], ["x"]), (["x"], ["x"])],
)
def test_each_process_runs_the_command_without_nproc(argv: list[str], expected: list[str]) -> None:
    assert without_nproc(argv) == expected


def test_cancel_stops_every_process_and_saves_nothing(tmp_path: Path) -> None:
    """SIGINT to the command (what Ctrl-C sends) once training has started: one "Cancelled.", no adapter."""
    before, after, label = levir("test_2_0000_0512")
    args = ["--before", str(before), "--after", str(after), "--labels", str(label), "--adapter-name", "stop"]
    args += ["--backbone", "tiny_vit_tiny", "--allow-random-backbone", "--epochs", "50", "--patch-size", "64"]
    env = {"RS_PEFT_QGIS_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "backend", "change.finetune", *args, "--batch-size", "4", "--nproc", "2"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # wait for the first training step, not for a fixed time
        if "fine-tuning" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 1 and "Cancelled." in rest and "Traceback" not in rest
    assert not list((tmp_path / "data").rglob("adapter.json"))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nproc_on_two_gpus_uses_nccl_and_one_gpu_each(tmp_path: Path) -> None:
    two = finetune(tmp_path, "gpus", "--batch-size", "4", "--nproc", "2", "--device", "cuda")
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads(two.stdout)["metrics"]["adapter"] == "gpus"
