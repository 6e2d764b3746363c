"""WTConv2d (Finder et al., ECCV 2024) as WEFT's wavelet experts use it: one level of the Haar (db1) transform,
a depthwise k×k convolution on the four subbands, the inverse transform, plus a depthwise k×k base path
(methods.md §1.2(a)5). The Haar filters come from pywavelets' db1 taps."""

from __future__ import annotations

import pywt
import torch
import torch.nn.functional as F
from torch import nn


def haar_filters() -> torch.Tensor:
    """The four 2×2 analysis filters (LL, LH, HL, HH), (4, 2, 2): outer products of pywavelets' db1
    decomposition taps in reversed order (a cross-correlation with them is pywt's convolution)."""
    w = pywt.Wavelet("db1")
    lo = torch.tensor(w.dec_lo[::-1], dtype=torch.float32)
    hi = torch.tensor(w.dec_hi[::-1], dtype=torch.float32)
    return torch.stack([torch.outer(a, b) for a in (lo, hi) for b in (lo, hi)])


def dwt(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """One Haar level per channel: (B, C, H, W) with even H, W -> (B, C, 4, H/2, W/2)."""
    b, c, h, w = x.shape
    weight = filters.to(x.dtype)[:, None].repeat(c, 1, 1, 1)  # (4C, 1, 2, 2), channel-major
    return F.conv2d(x, weight, stride=2, groups=c).reshape(b, c, 4, h // 2, w // 2)


def idwt(sub: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """The inverse of `dwt`: the filters are orthonormal, so the transposed convolution undoes it exactly."""
    b, c, _, h, w = sub.shape
    weight = filters.to(sub.dtype)[:, None].repeat(c, 1, 1, 1)
    return F.conv_transpose2d(sub.reshape(b, 4 * c, h, w), weight, stride=2, groups=c)


class WTConv2d(nn.Module):
    """Depthwise, stride 1, `channels` in and out: base path scale·dwconv_k(x) (scale 1.0, with bias) plus
    IDWT(scale·dwconv_k(DWT(x))) (scale 0.1, no bias). Odd sides are zero-padded for the transform and the
    result cropped back. For k = 1 both paths reduce to per-channel scalings."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.register_buffer("filters", haar_filters(), persistent=False)
        pad = kernel_size // 2
        self.base_conv = nn.Conv2d(channels, channels, kernel_size, padding=pad, groups=channels)
        self.base_scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.wavelet_conv = nn.Conv2d(
            4 * channels, 4 * channels, kernel_size, padding=pad, groups=4 * channels, bias=False
        )
        self.wavelet_scale = nn.Parameter(torch.full((1, 4 * channels, 1, 1), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        padded = F.pad(x, (0, w % 2, 0, h % 2))
        sub = dwt(padded, self.filters)
        sub = sub.reshape(b, 4 * c, *sub.shape[-2:])
        sub = self.wavelet_scale * self.wavelet_conv(sub)
        detail = idwt(sub.reshape(b, c, 4, *sub.shape[-2:]), self.filters)[..., :h, :w]
        return self.base_scale * self.base_conv(x) + detail
