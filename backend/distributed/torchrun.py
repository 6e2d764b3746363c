"""`python -m backend <task>.finetune --nproc N …`: the same command on N processes under torchrun (one per GPU,
NCCL; or CPU processes, gloo). Each process runs the whole job; the training loop shares the work
(backend/training/ddp.py) and rank 0 alone reports and saves the adapter."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

# torchrun's own lines: its banner about OMP_NUM_THREADS and its agent's log records.
AGENT = re.compile(r"^\*+$|OMP_NUM_THREADS|^[WEI]\d{4} .*torch/distributed/")


def launched() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def start(device: str) -> None:
    """Join the process group torchrun set up: NCCL with one GPU per process for a CUDA job, else gloo."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    # Rank 0 validates while the others wait in a broadcast: allow for a long validation.
    timeout = timedelta(hours=2)
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" now means this process's GPU
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def stop(succeeded: bool) -> None:
    """Leave the process group. After a run that succeeded on this process, first wait for the others: a process
    that tears gloo down while a peer still talks to it can abort the peer ("terminate called without an active
    exception", seen on a loaded machine). After a failure, no wait: the others may never come, and torchrun
    stops them."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if succeeded:
        dist.barrier()
    dist.destroy_process_group()


def device_problem(device: str, nproc: int) -> str | None:
    """What stops `nproc` processes on `device` (the job's resolved device), if anything."""
    if not device.startswith("cuda"):
        return None
    if ":" in device:
        return f"With --nproc each process takes its own GPU: choose the device cuda (or auto), not {device}."
    import torch

    if torch.cuda.device_count() < nproc:
        return f"--nproc {nproc} needs {nproc} GPUs; this machine has {torch.cuda.device_count()}."
    return None


def launch(argv: list[str], nproc: int) -> int:
    """Run `python -m backend *argv` on `nproc` local processes. Their output passes through, each line once (the
    processes meet the same bad input alike); torchrun's own notes and its report of a failed process are
    replaced by one line. The exit code is the failed process's (2 for bad input), else torchrun's."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // nproc, 1)))  # torchrun would say 1
    proc = subprocess.Popen(
        [*command, "-m", "backend", *argv], stderr=subprocess.PIPE, text=True, errors="replace", env=env
    )
    cancelled = []

    def cancel(*_: object) -> None:  # torchrun passes SIGINT on to the processes, which cancel
        cancelled.append(True)
        proc.send_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGINT, cancel)
    failed_with, seen = None, set()
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            code = re.search(r"failed \(exitcode: (-?\d+)\)", line)
            if code and failed_with is None:
                # torchrun has stopped the other processes by now: what follows is its own report.
                failed_with = int(code.group(1))
            if failed_with is not None or AGENT.search(line) or (line.strip() and line in seen):
                continue
            if cancelled and not line.startswith(("Error:", "Hint:")):
                continue  # torchrun's traceback of the signal, the processes' notes
            seen.add(line)
            sys.stderr.write(line)
        proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if cancelled:
        print("Cancelled.", file=sys.stderr)
        return 1
    if failed_with is not None:
        print(f"A process stopped (exit code {failed_with}), so the others were stopped.", file=sys.stderr)
        return failed_with if failed_with > 0 else proc.returncode
    return proc.returncode
