"""Data-parallel fine-tuning inside the one training loop, when the job runs under torchrun.

Every rank draws the same global batch from the recipe's seeded sampler and trains on its share of it, so N
processes train on the batches one process would. The gradient is the mean of the shares' mean losses: the
global batch's mean loss where every share weighs alike, up to BatchNorm (which sees each share) and to losses
averaged over labelled pixels (shares may hold different numbers); random draws inside the model (dropout,
masks, noise) differ per rank, as they differ per patch in one process. DistributedDataParallel exchanges
the gradients of the trainable parameters only (the frozen backbone has none); it sends the module's state
from rank 0 once per stage, so all start alike. Validation runs on rank 0 and its scores are broadcast, so
every rank takes the same decisions (best epoch, early stop)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from backend.protocol import INVALID_INPUT, JobError

T = TypeVar("T")
Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_problem(batch_size: int, n: int) -> tuple[str, str] | None:
    """What is wrong with a batch of `batch_size` on `n` processes (message, hint), if anything: each process
    needs a whole share of at least 2 patches (the methods normalise over the batch)."""
    if n > 1 and (batch_size % n or batch_size // n < 2):
        return (
            f"On {n} processes the batch size ({batch_size}) must be a multiple of {n} with at least 2 patches per "
            "process.",
            f"Choose a batch size of {2 * n}, {4 * n} …",
        )
    return None


def check_batch(batch_size: int) -> None:
    problem = batch_problem(batch_size, world()[1])
    if problem:
        raise JobError(INVALID_INPUT, *problem)


def share(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """This rank's consecutive share of a global batch."""
    rank, n = world()
    per = len(arrays[0]) // n
    return tuple(a[rank * per : (rank + 1) * per] for a in arrays)


class _Loss(nn.Module):
    """The recipe's loss as a module's forward, which DistributedDataParallel needs to hook the backward."""

    def __init__(self, model: nn.Module, loss: LossFn) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model, batch)


def loss_of(model: nn.Module, loss: LossFn, device: torch.device) -> Callable[[Batch], torch.Tensor]:
    """batch -> loss; under torchrun through DistributedDataParallel over the parameters that train now (made
    again at each stage, whose trainable set differs)."""
    _, n = world()
    if n == 1:
        return lambda batch: loss(model, batch)
    ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    net = DistributedDataParallel(_Loss(model, loss), device_ids=ids, static_graph=True)
    return lambda batch: net(*batch)


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of every rank's `value` (e.g. the loss of its share), on every rank."""
    _, n = world()
    if n == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / n


def on_rank_0(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0, its result on every rank."""
    rank, n = world()
    if n == 1:
        return compute()
    box = [compute() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]
