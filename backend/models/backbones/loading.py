"""Reading official checkpoints safely and loading them with key mapping and precise errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

MAX_LISTED = 12


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the architecture: names the missing, unexpected and mis-shaped keys."""


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an official checkpoint; never unpickles arbitrary objects (weights_only=True).

    Unwraps the usual containers ({"model": ...}, {"state_dict": ...}, {"params": ...}).
    """
    try:  # memory-mapped: verifying or loading ViT-H does not need 2.5 GB of RAM up front
        obj = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (pre-zipfile) checkpoints cannot be mapped
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "params", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointMismatch(f"{Path(path).name} does not contain a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_prefix(prefix: str) -> Callable[[str], str | None]:
    """Key map keeping only keys under `prefix` (e.g. 'image_encoder.'), with the prefix removed."""

    def mapper(key: str) -> str | None:
        return key[len(prefix) :] if key.startswith(prefix) else None

    return mapper


def describe_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str) -> str:
    """Missing, unexpected and mis-shaped keys of `given` against `expected` ("" when they fit)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mis_shaped = [
        f"{k}: {tuple(given[k].shape)} in the {source}, {tuple(expected[k].shape)} expected"
        for k in sorted(set(given) & set(expected))
        if given[k].shape != expected[k].shape
    ]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mis_shaped)):
        if items:
            more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
            problems.append(f"{title}: {', '.join(items[:MAX_LISTED])}{more}")
    return "; ".join(problems)


def load_mapped(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    map_key: Callable[[str], str | None] = lambda k: k,
    source: str = "checkpoint",
) -> None:
    """Load `state` into `module` after renaming keys with `map_key` (None drops a key).

    Every parameter and buffer of the module must be filled with a tensor of the right shape;
    anything else raises CheckpointMismatch naming the keys, before any weight is changed.
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = map_key(key)
        if new is not None:
            mapped[new] = value
    problems = describe_mismatch(module.state_dict(), mapped, source)
    if problems:
        raise CheckpointMismatch(f"The {source} does not fit {type(module).__name__}: {problems}")
    module.load_state_dict(mapped, strict=True)
