"""The task-specific wavelet expert extractor (WEFT's "Module1", methods.md §1.2(a)): a CNN stem, then a
pyramid at 1/4 … 1/32 where one tied down-sampler and one tied dynamic mixture of seven wavelet experts refine
every scale; the scales are projected to the ViT width and become the adapter's spatial features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .wavelet import WTConv2d

EXPERT_KERNELS = (1, 3, 5, 7, 9, 11, 13)
TOP_K = 4
WIDTH = 64  # the extractor's channels
GROUPS = 4  # Res2Net-style channel groups inside an expert


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class WaveletExpert(nn.Module):
    """E_k: the channels split into 4 groups; y0 = g(s0), y_i = g(y_{i-1} + s_i) with ONE g = WTConv2d(k) + BN +
    ReLU shared by the groups; out = ReLU(BN(Conv1×1(concat(y) + x)))."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        group = channels // GROUPS
        self.g = nn.Sequential(WTConv2d(group, kernel_size), nn.BatchNorm2d(group), nn.ReLU(inplace=True))
        self.fuse = nn.Conv2d(channels, channels, 1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys: list[torch.Tensor] = []
        for s in x.chunk(GROUPS, dim=1):
            ys.append(self.g(s if not ys else ys[-1] + s))
        return F.relu(self.norm(self.fuse(torch.cat(ys, dim=1) + x)))


class WaveletExperts(nn.Module):
    """WE: a gate on the pooled input picks the top 4 of 7 experts per sample. Gate = softmax(Linear(GAP(x))),
    top-4 probabilities, a second softmax over those probabilities, + 1e-8, renormalised (as the code does).
    Every expert runs densely; the unpicked ones get weight 0. No load-balancing loss."""

    def __init__(self, channels: int = WIDTH, kernels: tuple[int, ...] = EXPERT_KERNELS, top_k: int = TOP_K) -> None:
        super().__init__()
        self.experts = nn.ModuleList(WaveletExpert(channels, k) for k in kernels)
        self.gate = nn.Linear(channels, len(kernels))
        self.top_k = top_k

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_experts) mixing weights, zero outside each sample's top k."""
        probs = self.gate(x.mean(dim=(2, 3))).softmax(-1)
        top, index = probs.topk(self.top_k, dim=-1)
        top = top.softmax(-1) + 1e-8
        top = top / top.sum(-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, index, top)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights(x)
        out = torch.stack([expert(x) for expert in self.experts], dim=1)  # (B, E, C, H, W)
        return (w[:, :, None, None, None] * out).sum(1)


class WaveletExpertExtractor(nn.Module):
    """Image (B, 3, H, W), sides multiples of 32 -> (c1 map (B, D, H/4, W/4), c tokens (B, N8 + N16 + N32, D),
    the three token grids). DS and WE are the same modules at every scale (tied weights)."""

    def __init__(self, dim: int, in_chans: int = 3, width: int = WIDTH) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(in_chans, width, 3, 2), nn.MaxPool2d(3, 2, 1))
        self.down = conv_bn_relu(width, width, 3, 2, bias=True)  # DS
        self.experts = WaveletExperts(width)  # WE
        self.proj = nn.Conv2d(width, dim, 1)
        self.level_embed = nn.Parameter(torch.zeros(3, dim))
        nn.init.normal_(self.level_embed)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        c = self.stem(x)
        maps = [c + self.experts(c)]
        for _ in range(3):
            c = self.down(maps[-1])
            maps.append(c + self.experts(c))
        c1, *rest = (self.proj(m) for m in maps)
        grids = [(m.shape[-2], m.shape[-1]) for m in rest]
        tokens = torch.cat([m.flatten(2).transpose(1, 2) + self.level_embed[i] for i, m in enumerate(rest)], dim=1)
        return c1, tokens, grids
