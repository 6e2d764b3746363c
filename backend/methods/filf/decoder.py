"""FILF's change decoders (methods.md §4.2b-c): Fourier units and multi-scale FFNs on the two neck outputs.

BCD: CDFE fuses [f1; f2] (2C -> C), FDFE refines and upsamples x2 (C -> C/2 -> C/4), a head upsamples to the
input size and classifies. For the official 256-channel necks the widths are the paper's 512 -> 256 -> 128
-> 64. SCD adds a second FDFE and head, shared by both dates, for the land-cover maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .interaction import fft_ready


class ConvBN(nn.Sequential):
    """Bias-free 1x1 convolution followed by BatchNorm."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__(nn.Conv2d(in_chans, out_chans, 1, bias=False), nn.BatchNorm2d(out_chans))


class FourierUnit(nn.Module):
    """FU(C): GELU(irfft2(Conv1x1([Re; Im] of rfft2(x))) + a), with a = ConvBN1x1(GAP(x)) ⊙ x.

    The channel attention has no sigmoid, and the spectral 1x1 conv starts with every weight 1 (as in the
    authors' code). Because of the BatchNorm over pooled features, training needs at least 2 items a batch.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.attention = ConvBN(channels, channels)
        self.spectral = nn.Conv2d(2 * channels, 2 * channels, 1, bias=False)
        nn.init.constant_(self.spectral.weight, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention(F.adaptive_avg_pool2d(x, 1)) * x
        h, w = x.shape[-2:]
        with torch.autocast(x.device.type, enabled=False):
            spectrum = torch.fft.rfft2(fft_ready(x), norm="ortho")
            mixed = self.spectral(torch.cat([spectrum.real, spectrum.imag], dim=1).to(self.spectral.weight.dtype))
            re, im = fft_ready(mixed).chunk(2, dim=1)
            spatial = torch.fft.irfft2(torch.complex(re, im), s=(h, w), norm="ortho")
        return F.gelu(spatial + a)


class MSFFN(nn.Module):
    """Multi-scale FFN(d): 1x1 d -> 2d, four d/2 chunks (identity, depthwise 3x3, 5x5, 7x7) summed, GELU,
    1x1 d/2 -> d. No residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError("MSFFN needs an even width")
        half = dim // 2
        self.expand = nn.Conv2d(dim, 2 * dim, 1)
        self.depthwise = nn.ModuleList(nn.Conv2d(half, half, k, padding=k // 2, groups=half) for k in (3, 5, 7))
        self.project = nn.Conv2d(half, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = self.expand(x).chunk(4, dim=1)
        y = first + sum(conv(chunk) for conv, chunk in zip(self.depthwise, rest, strict=True))
        return self.project(F.gelu(y))


class CoarseDifferenceExtraction(nn.Module):
    """CDFE: y = Conv1x1([f1; f2]) (2C -> C), y1 = FU(y) + y, output MSFFN(y1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(2 * channels, channels, 1)
        self.fourier = FourierUnit(channels)
        self.ffn = MSFFN(channels)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
        y = self.fuse(torch.cat([f1, f2], dim=1))
        return self.ffn(self.fourier(y) + y)


class FrequencyFeatureEnhancement(nn.Module):
    """FDFE(in, mid, out): Conv1x1 in -> mid, FU(mid), ConvTranspose 2x2 stride 2 mid -> out, MSFFN(out)."""

    def __init__(self, in_chans: int, mid_chans: int, out_chans: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_chans, mid_chans, 1)
        self.fourier = FourierUnit(mid_chans)
        self.up = nn.ConvTranspose2d(mid_chans, out_chans, 2, stride=2)
        self.ffn = MSFFN(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.up(self.fourier(self.reduce(x))))


class PredictionHead(nn.Module):
    """Bilinear upsampling to the input size (align_corners=True), then Conv3x3 to the class logits."""

    def __init__(self, in_chans: int, num_classes: int) -> None:
        super().__init__()
        self.classify = nn.Conv2d(in_chans, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.classify(F.interpolate(x, size=size, mode="bilinear", align_corners=True))


def decoder_widths(channels: int) -> tuple[int, int, int]:
    """(CDFE, FDFE middle, FDFE output) widths for a neck of `channels` (256 -> 256, 128, 64)."""
    if channels % 8:
        raise ValueError(f"the FILF decoder needs a neck width divisible by 8, got {channels}")
    return channels, channels // 2, channels // 4


class BCDDecoder(nn.Module):
    """Binary change decoder: CDFE -> FDFE -> head; (B, C, h, w) x 2 -> (B, num_classes, H, W)."""

    def __init__(self, channels: int = 256, num_classes: int = 2) -> None:
        super().__init__()
        c, mid, out = decoder_widths(channels)
        self.cdfe = CoarseDifferenceExtraction(c)
        self.fdfe = FrequencyFeatureEnhancement(c, mid, out)
        self.head = PredictionHead(out, num_classes)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.head(self.fdfe(self.cdfe(f1, f2)), size)


@dataclass
class SCDOutput:
    """Semantic change logits: `change` (B, 1, H, W), `sem1` and `sem2` (B, num_seg, H, W)."""

    change: torch.Tensor
    sem1: torch.Tensor
    sem2: torch.Tensor


class SCDDecoder(nn.Module):
    """Semantic change decoder: the BCD branch with a 1-channel change logit, plus one FDFE and one head
    shared by both dates that map f1 and f2 separately to land-cover logits."""

    def __init__(self, channels: int = 256, num_seg: int = 7) -> None:
        super().__init__()
        c, mid, out = decoder_widths(channels)
        self.change = BCDDecoder(channels, 1)
        self.semantic = FrequencyFeatureEnhancement(c, mid, out)
        self.semantic_head = PredictionHead(out, num_seg)

    def forward(self, f1: torch.Tensor, f2: torch.Tensor, size: tuple[int, int]) -> SCDOutput:
        sem1, sem2 = (self.semantic_head(self.semantic(f), size) for f in (f1, f2))
        return SCDOutput(self.change(f1, f2, size), sem1, sem2)
