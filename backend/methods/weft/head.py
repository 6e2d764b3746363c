"""Segmentation heads on WEFT's four fused levels (1/4 … 1/32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .extractor import conv_bn_relu

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
