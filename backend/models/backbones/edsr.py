"""The EDSR-baseline trunk (`edsr_baseline_x2-1bc95232.pt`), PanAdapter's two CNN prior extractors.

Architecture and key names read in sanghyun-son/EDSR-PyTorch `src/model/edsr.py` (`EDSR`) and
`src/model/common.py` (`default_conv`, `ResBlock`, `MeanShift`, `Upsampler`): `head` is one 3x3 conv from RGB,
`body` is 16 ResBlocks (conv-ReLU-conv, scaled by res_scale, plus the input) followed by one 3x3 conv, and the
trunk output is body(head(x)) + head(x); `tail` upsamples. EDSR-baseline: 16 blocks, 64 features, res_scale 1.

Kept when loading: `head.0.*` (PanAdapter replaces the head after loading: assign a new module to `head`),
`body.0..15.*` -> `blocks.0..15.*` (names inside a block are identical: `body.0` and `body.2` are the convs)
and `body.16.*` -> `body_conv.*`. Dropped: `tail.*` (x2 upsampler and RGB output conv) and the fixed RGB
mean shifts `sub_mean.*` / `add_mean.*`. Without `sub_mean`, an RGB input for the official head must already
have the DIV2K mean removed (rgb_range 255 in the official training).

Subclasses Backbone for `blocks` and per-block features (PanAdapter taps all 16 block outputs); it has no
attention, so `qkv_projections()` is empty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .base import Backbone, BackboneFeatures
from .loading import load_mapped


@dataclass(frozen=True)
class EDSRConfig:
    n_resblocks: int = 16
    n_feats: int = 64
    kernel_size: int = 3
    res_scale: float = 1.0
    n_colors: int = 3  # input channels of the official head


VARIANTS: dict[str, EDSRConfig] = {
    "edsr_baseline": EDSRConfig(),
    "tiny": EDSRConfig(n_resblocks=2, n_feats=8),
}


def conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    """EDSR's default_conv: 'same' padding, with bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


class ResBlock(nn.Module):
    """x + res_scale * conv(relu(conv(x))); `body` indices match the official Sequential (convs at 0 and 2)."""

    def __init__(self, n_feats: int, kernel_size: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(n_feats, n_feats, kernel_size), nn.ReLU(), conv(n_feats, n_feats, kernel_size))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class EDSRTrunk(Backbone):
    """head -> 16 ResBlocks -> conv, plus the head output: (B, n_colors, H, W) -> (B, n_feats, H, W)."""

    def __init__(self, config: EDSRConfig) -> None:
        super().__init__()
        self.config = config
        self.head = nn.Sequential(conv(config.n_colors, config.n_feats, config.kernel_size))
        self.blocks = nn.ModuleList(
            ResBlock(config.n_feats, config.kernel_size, config.res_scale) for _ in range(config.n_resblocks)
        )
        self.body_conv = conv(config.n_feats, config.n_feats, config.kernel_size)

    def forward_features(self, x: torch.Tensor) -> BackboneFeatures:
        x = self.head(x)
        res = x
        outputs = []
        for block in self.blocks:
            res = block(res)
            outputs.append(res)
        return BackboneFeatures(self.body_conv(res) + x, outputs)


def build(variant: str, **overrides: object) -> EDSRTrunk:
    """An EDSR trunk of a named variant (see VARIANTS); keyword overrides replace config fields."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EDSR variant {variant!r}; known: {', '.join(VARIANTS)}")
    return EDSRTrunk(dataclasses.replace(VARIANTS[variant], **overrides))


_DROPPED = ("tail.", "sub_mean.", "add_mean.")


def official_key(key: str, n_resblocks: int) -> str | None:
    """Map one key of the official EDSR checkpoint to EDSRTrunk's name; None drops it."""
    if key.startswith(_DROPPED):
        return None
    if key.startswith("body."):
        index, _, rest = key[len("body.") :].partition(".")
        if index.isdigit() and int(index) == n_resblocks:
            return f"body_conv.{rest}"
        return f"blocks.{index}.{rest}"
    return key  # head.0.*


def load_official(model: EDSRTrunk, state: Mapping[str, torch.Tensor]) -> None:
    """Load the full official EDSR checkpoint; raises CheckpointMismatch naming any misfit."""
    n = model.config.n_resblocks
    load_mapped(model, state, lambda key: official_key(key, n), source="EDSR checkpoint")
