"""Segmentation heads on WEFT's four fused levels (1/4 … 1/32): the paper's Mask2Former (mask2former.py) and a
light FPN head, switchable by the `head` parameter. Both give per-pixel logits at 1/4 (`forward`) and their own
training loss (`loss`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backend.io.rasterize import IGNORE

from .extractor import conv_bn_relu
from .mask2former import Mask2FormerHead

HEAD_CHANNELS = 96  # the paper's Mask2Former feature width


class FPNHead(nn.Module):
    """The light head: 1×1 laterals to 96 channels, a top-down pathway, a 3×3 conv per level, all levels
    upsampled to 1/4, concatenated, fused and classified. Per-pixel logits (B, classes, H/4, W/4).

    A departure from the paper, whose Mask2Former head (9 decoder layers, Hungarian matching) costs far more
    per step on a CPU; switchable where the method offers both.
    """

    def __init__(self, dim: int, num_classes: int, channels: int = HEAD_CHANNELS, levels: int = 4) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(dim, channels, 1) for _ in range(levels))
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(levels))
        self.fuse = conv_bn_relu(levels * channels, channels, 1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def loss(self, feats: list[torch.Tensor], label: torch.Tensor, balance: bool = True) -> torch.Tensor:
        logits = F.interpolate(self(feats), size=label.shape[-2:], mode="bilinear", align_corners=False)
        return segmentation_loss(logits.float(), label, balance)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral, feats, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        size = laterals[0].shape[-2:]
        outs = [
            F.interpolate(smooth(lat), size=size, mode="bilinear", align_corners=False) if i else smooth(lat)
            for i, (smooth, lat) in enumerate(zip(self.smooth, laterals, strict=True))
        ]
        return self.classifier(self.fuse(torch.cat(outs, dim=1)))


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor, balance: bool = True) -> torch.Tensor:
    """Cross-entropy over classes, IGNORE excluded; with `balance` each class present weighs the same."""
    per_px = F.cross_entropy(logits, label.long(), ignore_index=IGNORE, reduction="none")
    known = label != IGNORE
    if not balance:
        return per_px[known].mean() if known.any() else per_px.sum() * 0
    parts = [per_px[label == k].mean() for k in torch.unique(label[known]).tolist()]
    return torch.stack(parts).mean() if parts else per_px.sum() * 0


HEADS = {"mask2former": Mask2FormerHead, "fpn": FPNHead}


def make_head(name: str, dim: int, num_classes: int) -> nn.Module:
    """The head called `name` (a key of HEADS) on fused levels `dim` wide."""
    return HEADS[name](dim, num_classes)
