"""`python -m backend <task>.finetune --nproc N …`: the same command on N processes under torchrun (one per GPU,
NCCL; or CPU processes, gloo). Each process runs the whole job; the training loop shares the work
(backend/training/ddp.py) and rank 0 alone reports and saves the adapter."""

from __future__ import annotations

import os
import re
import subprocess
import sys

# torchrun's own lines: its banner about OMP_NUM_THREADS and its agent's log records.
AGENT = re.compile(r"^\*+$|OMP_NUM_THREADS|^[WEI]\d{4} .*torch/distributed/")


def launched() -> bool:
    """Whether this process is one of several that torchrun started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def start() -> None:
    """Join the process group torchrun set up: NCCL with one GPU per process where there are GPUs, else gloo."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" now means this process's GPU
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def launch(argv: list[str], nproc: int) -> int:
    """Run `python -m backend *argv` on `nproc` local processes. Their output passes through; torchrun's own
    notes and its report of a failed process are replaced by one line (the process said what went wrong). The
    exit code is the failed process's (2 for bad input), else torchrun's."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.Popen([*command, "-m", "backend", *argv], stderr=subprocess.PIPE, text=True)
    failed_with, in_report = None, False
    assert proc.stderr is not None
    for line in proc.stderr:
        code = re.search(r"failed \(exitcode: (-?\d+)\)", line)
        if code and failed_with is None:
            failed_with, in_report = int(code.group(1)), True
        if in_report or AGENT.search(line):
            continue
        sys.stderr.write(line)
    proc.wait()
    if failed_with is not None:
        print(f"A process stopped (exit code {failed_with}), so the others were stopped.", file=sys.stderr)
        return failed_with if failed_with > 0 else proc.returncode
    return proc.returncode
