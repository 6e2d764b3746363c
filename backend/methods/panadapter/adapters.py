"""PanAdapter stage 2: the cascaded adapters on the frozen IPT body (methods.md §3.2 (b) 4).

Token widths follow the code dimensions: ViT tokens X of width d = 576, prior tokens of width k = 96,
4 attention heads. One `PanAdapterLayer` =
  X_k = Linear d->k (X);
  CTF per branch (cascade token fusioner): F = P * sigmoid(MLP(P_other)) + P, MLP k->k/4->k with GELU;
  P' = CrossAttn(queries X_k, keys/values F) + F; P'' = P' + FFN(P'), FFN k->k->k with GELU;
  CTI (cascade token injector): G = Linear 2k->k ([P_spa'', P_spe'']); X <- X + gate * Linear k->d
  (CrossAttn(queries G, keys/values X_k)), with the scalar gate starting at 0.
The gate multiplies *after* the k->d projection (the code gates before it): with the projection's bias the
code's order adds that bias to X even at gate 0, while this order leaves X bit-for-bit unchanged at init,
so the frozen IPT path is exactly the pretrained one until the gate moves. Parameter count is the same
(0.288M per layer at the code dimensions; no LayerNorms, as in the code's count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections (nn.MultiheadAttention's parameter count)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"token width {dim} must divide by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(context).chunk(2, dim=-1)
        q, k, v = (self._heads(t) for t in (self.q(query), k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)


class CascadeTokenFusioner(nn.Module):
    """CTF for one prior branch: cross-branch weighting, ViT-queried cross-attention, token FFN."""

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        hidden = max(1, dim // 4)
        self.weighting = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.attn = CrossAttention(dim, num_heads)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, prior: torch.Tensor, other: torch.Tensor, vit_k: torch.Tensor) -> torch.Tensor:
        """prior, other: (N, L, k) tokens of this and the other branch; vit_k: (N, L, k) projected ViT tokens."""
        fused = prior * torch.sigmoid(self.weighting(other)) + prior
        fused = self.attn(vit_k, fused) + fused
        return fused + self.ffn(fused)


class CascadeTokenInjector(nn.Module):
    """CTI: merged prior tokens query the ViT tokens; the gated result is added back to the ViT stream."""

    def __init__(self, dim: int, embed_dim: int, num_heads: int = 4) -> None:
        super().__init__()
        self.merge = nn.Linear(2 * dim, dim)
        self.attn = CrossAttention(dim, num_heads)
        self.up = nn.Linear(dim, embed_dim)
        # Zero-initialised gate: at init the injection is exactly zero and the frozen ViT path is unchanged.
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(
        self, x: torch.Tensor, vit_k: torch.Tensor, spatial: torch.Tensor, spectral: torch.Tensor
    ) -> torch.Tensor:
        g = self.merge(torch.cat([spatial, spectral], dim=-1))
        return x + self.gate * self.up(self.attn(g, vit_k))


class PanAdapterLayer(nn.Module):
    """Down-projection of the ViT tokens, one CTF per branch, and (unless `inject` is False) one CTI."""

    def __init__(self, embed_dim: int, dim: int = 96, num_heads: int = 4, inject: bool = True) -> None:
        super().__init__()
        self.down = nn.Linear(embed_dim, dim)
        self.ctf_spatial = CascadeTokenFusioner(dim, num_heads)
        self.ctf_spectral = CascadeTokenFusioner(dim, num_heads)
        self.cti = CascadeTokenInjector(dim, embed_dim, num_heads) if inject else None

    def forward(
        self, x: torch.Tensor, spatial: torch.Tensor, spectral: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ViT tokens, spatial prior tokens, spectral prior tokens) -> their updated values."""
        vit_k = self.down(x)
        # Both branches fuse from the incoming tokens (neither sees the other's update of this layer).
        new_spatial = self.ctf_spatial(spatial, spectral, vit_k)
        new_spectral = self.ctf_spectral(spectral, spatial, vit_k)
        if self.cti is not None:
            x = self.cti(x, vit_k, new_spatial, new_spectral)
        return x, new_spatial, new_spectral
