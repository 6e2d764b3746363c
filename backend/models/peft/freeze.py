"""What trains under a recipe: a freezing policy and parameter accounting."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class FreezePolicy:
    """Everything is frozen except what the recipe names.

    adapters: parameters of adapter modules (names containing one of `adapter_markers`);
    norms: all normalisation layers (SpectralX trains every LayerNorm);
    trainable: name patterns (fnmatch) that train, e.g. "decoder.*" or "head.*".
    """

    adapters: bool = True
    norms: bool = False
    trainable: tuple[str, ...] = ()
    adapter_markers: tuple[str, ...] = ("lora_",)


def apply_freezing(model: nn.Module, policy: FreezePolicy) -> None:
    norm_params = set()
    if policy.norms:
        for module in model.modules():
            if isinstance(module, NORM_TYPES):
                norm_params.update(id(p) for p in module.parameters(recurse=False))
    for name, param in model.named_parameters():
        param.requires_grad = (
            (policy.adapters and any(m in name for m in policy.adapter_markers))
            or id(param) in norm_params
            or any(fnmatch.fnmatchcase(name, pat) for pat in policy.trainable)
        )


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.trainable:,} trainable of {self.total:,} parameters ({self.percent:.2f}%)"


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameters, each shared tensor counted once."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return ParamCount(trainable, total)
