"""HyperT, the Hyper Tokenizer (methods.md §2.2a): turns C spectral bands into the frozen ViT's patch tokens.

For a ViT of width D on S×S inputs (D = 1024, S = 224 for ViT-L) with `half` = D / 2 and the low-level grid
g = S / 8 (28):
* a CNN down-sampler C → half/8 → half/4 → half/2 → half channels at stride 8;
* attribute perception: a spatial block (window attention, window 14) over the g² tokens of width `half`, and a
  spectral block over the `half` channels as tokens of width g² (global attention), each with its positional
  code (Scale-MAE's GSD-aware 2-D sin-cos; a 1-D sin-cos of each band's centre wavelength in nm, interpolated
  from C bands to `half` positions);
* attribute match: two sets of (S/16)² learnable queries cross-attend to each branch; their outputs, concatenated,
  pass a bias-free feed-forward to the attribute tokens (first half "spatial", second half "spectral");
* a low-rank conv branch (C → 16 → D at stride 16) added in parallel, then a per-channel scale.

As released, the core (everything but the low-rank branch and the scale) keeps its random initialisation and is
frozen; `SpectralX(hypert_trainable=True)` trains it as the paper's figure shows (methods.md §2.6).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from backend.models.backbones.vit import sincos_positions_with_resolution

HEADS = 8
WINDOW = 14  # the released code's window on the 28×28 grid (the paper's figure shows 7×7)
LOW_RANK = 16


class ConvBNGELU(nn.Module):
    """Residual [Conv3×3, BN, GELU] of the down-sampler."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.norm(self.conv(x)))


def downsampler(bands: int, half: int) -> nn.Sequential:
    """The CNN down-sampler: (B, C, S, S) -> (B, half, S/8, S/8)."""
    c1, c2, c3 = half // 8, half // 4, half // 2
    return nn.Sequential(
        nn.Conv2d(bands, c1, 1),
        ConvBNGELU(c1),
        nn.Conv2d(c1, c2, 2, stride=2),
        nn.BatchNorm2d(c2),
        ConvBNGELU(c2),
        nn.Conv2d(c2, c3, 2, stride=2),
        nn.BatchNorm2d(c3),
        nn.Conv2d(c3, half, 3, stride=2, padding=1),
    )


def window_attention(x: torch.Tensor, grid: int, window: int, attn: nn.MultiheadAttention) -> torch.Tensor:
    """Self-attention within non-overlapping windows of the (B, grid², d) token map (padded to whole windows)."""
    b, _, d = x.shape
    window = min(window, grid)
    pad = -grid % window
    m = x.reshape(b, grid, grid, d)
    if pad:
        m = F.pad(m, (0, 0, 0, pad, 0, pad))
    side = grid + pad
    n = side // window
    w = m.reshape(b, n, window, n, window, d).permute(0, 1, 3, 2, 4, 5).reshape(b * n * n, window * window, d)
    w = attn(w, w, w, need_weights=False)[0]
    m = w.reshape(b, n, n, window, window, d).permute(0, 1, 3, 2, 4, 5).reshape(b, side, side, d)
    return m[:, :grid, :grid].reshape(b, grid * grid, d)


class AttributeBlock(nn.Module):
    """LN → MHSA (8 heads; windowed when `window`) → residual → LN → MLP ×4 → residual (a SAM/ViTDet block)."""

    def __init__(self, dim: int, window: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, HEADS, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.window:
            h = window_attention(h, math.isqrt(x.shape[1]), self.window, self.attn)
        else:
            h = self.attn(h, h, h, need_weights=False)[0]
        x = x + h
        return x + self.mlp(self.norm2(x))


class PerceiverCrossAttention(nn.Module):
    """Single-head cross-attention without biases, LN on queries and on keys/values; output + query."""

    def __init__(self, query_dim: int, context_dim: int, head_dim: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(query_dim)
        self.norm_kv = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(query_dim, head_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * head_dim, bias=False)
        self.to_out = nn.Linear(head_dim, query_dim, bias=False)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.to_q(self.norm_q(queries))
        k, v = self.to_kv(self.norm_kv(context)).chunk(2, dim=-1)
        return self.to_out(F.scaled_dot_product_attention(q, k, v)) + queries


def wavelength_code(wavelengths: torch.Tensor, dim: int, positions: int) -> torch.Tensor:
    """1-D sin-cos code (dim) of each band's centre wavelength in nm, linearly interpolated from the C bands to
    `positions` rows: (positions, dim)."""
    quarter = torch.arange(dim // 2, dtype=torch.float32, device=wavelengths.device)
    omega = 1.0 / 10000 ** (quarter / (dim // 2))
    angles = wavelengths.float()[:, None] * omega  # (C, dim/2)
    code = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (C, dim)
    return F.interpolate(code.T[None], size=positions, mode="linear", align_corners=True)[0].T


class HyperTokenizer(nn.Module):
    """forward(x (B, C, S, S), wavelengths (C,) nm) -> (tokens (B, (S/16)², D), S_spa (B, g², half),
    S_spe (B, half, g²)): the attribute tokens and the low-level features the Are-adapter re-uses."""

    def __init__(self, bands: int, dim: int, size: int, input_res: float) -> None:
        super().__init__()
        half = dim // 2
        self.size, self.half, self.input_res = size, half, input_res
        self.grid = size // 8
        tokens = (size // 16) ** 2
        g2 = self.grid**2
        # The core (frozen as released).
        self.downsampler = downsampler(bands, half)
        self.spatial_block = AttributeBlock(half, window=WINDOW)
        self.spectral_block = AttributeBlock(g2)
        self.spatial_queries = nn.Parameter(torch.randn(tokens, half))
        self.spectral_queries = nn.Parameter(torch.randn(tokens, half))
        self.spatial_match = PerceiverCrossAttention(half, half, half // 2)
        self.spectral_match = PerceiverCrossAttention(half, g2, g2 // 2)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False)
        )
        # The low-rank conv branch and the scale (trained in both stages).
        self.low_rank = nn.Sequential(nn.Conv2d(bands, LOW_RANK, 4, stride=4), nn.Conv2d(LOW_RANK, dim, 4, stride=4))
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, wavelengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"HyperT takes {self.size}×{self.size} inputs, got {tuple(x.shape[-2:])}")
        b = x.shape[0]
        low = self.downsampler(x)  # (B, half, g, g)
        spa = low.flatten(2).transpose(1, 2)  # (B, g², half)
        res = torch.tensor(self.input_res, device=x.device)
        spa = spa + sincos_positions_with_resolution(self.half, (self.grid, self.grid), res).to(spa.dtype)
        spa = self.spatial_block(spa)
        spe = low.flatten(2)  # (B, half, g²): channels as tokens
        spe = spe + wavelength_code(wavelengths, self.grid**2, self.half).to(spe.dtype)
        spe = self.spectral_block(spe)
        attr = torch.cat(
            [
                self.spatial_match(self.spatial_queries.expand(b, -1, -1), spa),
                self.spectral_match(self.spectral_queries.expand(b, -1, -1), spe),
            ],
            dim=-1,
        )
        tokens = self.ff(attr)
        lr = self.low_rank(x).flatten(2).transpose(1, 2)
        return (tokens + lr) * self.scale, spa, spe
