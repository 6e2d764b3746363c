"""SpectralX's decoder (methods.md §2.2d), as mmseg builds it: MultiLevelNeck (4 ViT maps → scales ×4, ×2, ×1,
×0.5) and UPerHead (pyramid pooling 1, 2, 3, 6 on the coarsest level, FPN top-down, fused at the finest),
BatchNorm, dropout 0.1, no auxiliary head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCALES = (4.0, 2.0, 1.0, 0.5)
POOL_SCALES = (1, 2, 3, 6)
DROPOUT = 0.1


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """mmseg's ConvModule with BN and ReLU (the conv without bias)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class MultiLevelNeck(nn.Module):
    """Lateral 1×1 convs, resize each level by its scale, then a 3×3 conv (mmseg's defaults: no norm or act)."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(dim, out, 1) for _ in SCALES)
        self.convs = nn.ModuleList(nn.Conv2d(out, out, 3, padding=1) for _ in SCALES)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for x, lateral, conv, scale in zip(feats, self.lateral_convs, self.convs, SCALES, strict=True):
            x = F.interpolate(lateral(x), scale_factor=scale, mode="bilinear", align_corners=False)
            outs.append(conv(x))
        return outs


class UPerHead(nn.Module):
    def __init__(self, dim: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.psp = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(dim, channels, 1)) for s in POOL_SCALES
        )
        self.bottleneck = conv_bn_relu(dim + len(POOL_SCALES) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in SCALES[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in SCALES[:-1])
        self.fpn_bottleneck = conv_bn_relu(len(SCALES) * channels, channels, 3)
        self.dropout = nn.Dropout2d(DROPOUT)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [F.interpolate(p(top), size=top.shape[-2:], mode="bilinear", align_corners=False) for p in self.psp]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1], strict=True)]
        laterals.append(self.bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class UPerNet(nn.Module):
    """forward(4 maps (B, dim, g, g)) -> logits (B, num_classes, 4g, 4g).

    As the paper: the neck at the ViT's width, the head at half of it (1024 and 512 on ViT-L, 76M parameters).
    `compact`: neck and head at a quarter of the ViT's width (256 on ViT-L, 11.0M), a memory saving of ours."""

    def __init__(self, dim: int, num_classes: int, compact: bool = False) -> None:
        super().__init__()
        neck, head = (dim // 4, dim // 4) if compact else (dim, dim // 2)
        self.neck = MultiLevelNeck(dim, neck)
        self.decode_head = UPerHead(neck, head, num_classes)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.decode_head(self.neck(feats))
