"""Activation checkpointing: recompute a module's forward in the backward pass instead of keeping its activations.

PEFT's gradient must still flow back through every frozen block after the first adapter, so their activations
dominate fine-tuning memory; recomputing them costs one extra forward per step. Trainable modules can be
checkpointed too: BatchNorm running statistics are then left alone during the recomputation (momentum 0), so
they are updated once per step as without checkpointing, and random draws (dropout, drop path) are replayed."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def wants_checkpointing(setting: str, device: str) -> bool:
    """The `checkpointing` parameter (auto|on|off): auto is on for CUDA, where memory is the limit."""
    return setting == "on" or (setting == "auto" and device.startswith("cuda"))


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> None:
    """Make each module recompute its forward in the backward pass (only while gradients are recorded)."""
    for block in blocks:
        block.forward = _checkpointed(block)


@contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) · running + 0 · batch: unchanged
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum


def _checkpointed(module: nn.Module) -> Callable[..., torch.Tensor]:
    forward = module.forward

    def contexts() -> tuple[Any, Any]:
        return nullcontext(), _running_stats_kept(module)

    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)
        return forward(*args, **kwargs)

    return run
