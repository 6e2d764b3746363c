"""What every frozen foundation backbone offers the methods.

Conventions (all backbones in this package follow them):
* Module and parameter names mirror the official implementation, so loading an official checkpoint
  is a prefix strip or a small rename (see `loading.load_mapped`).
* `forward(x)` returns exactly what the official encoder returns (tested for equivalence).
* `forward_features(x)` returns `BackboneFeatures`: the final output plus the output of every block
  (tokens or maps, as the official code shapes them) — what adapters and decoders need.
* Adapters attach between blocks (`blocks`, in order) and on the fused qkv projections
  (`qkv_projections()`: every `nn.Linear` named `...attn.qkv`).
* Every backbone has a tiny configuration (few layers, narrow) for CPU tests and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class BackboneFeatures:
    out: torch.Tensor
    blocks: list[torch.Tensor] = field(default_factory=list)


class Backbone(nn.Module):
    """Base class: subclasses set `blocks` and implement `forward_features`."""

    blocks: nn.ModuleList

    def forward_features(self, x: torch.Tensor) -> BackboneFeatures:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).out

    def qkv_projections(self) -> list[tuple[str, nn.Linear]]:
        return [(n, m) for n, m in self.named_modules() if n.endswith("attn.qkv") and isinstance(m, nn.Linear)]
