"""Activation checkpointing of frozen encoder blocks: recompute each block in the backward pass instead of keeping
its activations. PEFT's gradient must still flow back through every block after the first adapter, so their
activations dominate fine-tuning memory; recomputing them costs one extra encoder forward per step."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def wants_checkpointing(setting: str, device: str) -> bool:
    """The `checkpointing` parameter (auto|on|off): auto is on for CUDA, where memory is the limit."""
    return setting == "on" or (setting == "auto" and device.startswith("cuda"))


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> None:
    """Make each block recompute its forward in the backward pass (only while gradients are recorded)."""
    for block in blocks:
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run
