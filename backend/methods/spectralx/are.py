"""The Are-adapter, attribute-refined adapter (methods.md §2.2c), stage 2 only: one shared instance refines the
ViT's patch tokens after each adapted block with HyperT's low-level spatial and spectral features.

Each low-level position (spatial) or channel (spectral) picks the ViT token that attends to it most (argmax of
a single-head cross-attention map over the queries); the picked tokens, normalised, pass a small CNN whose
channel mean gates each ViT token's attribute half; T ← T + α·[gated T_spa, gated T_spe] with α = 0.01 at start.
Only the argmax of the attention maps is used, so (as released) the query/key projections get no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ALPHA = 0.01


class AttentionMap(nn.Module):
    """Single-head attention weights softmax(q·kᵀ/√d) of queries (B, n, dq) over keys (B, m, dk): (B, n, m)."""

    def __init__(self, query_dim: int, key_dim: int, head_dim: int) -> None:
        super().__init__()
        self.q = nn.Linear(query_dim, head_dim)
        self.k = nn.Linear(key_dim, head_dim)
        self.head_dim = head_dim

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return (self.q(queries) @ self.k(keys).transpose(1, 2) / math.sqrt(self.head_dim)).softmax(-1)


def gather_best(tokens: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """For each key of attention (B, n, m), the token (of tokens (B, n, d)) attending to it most: (B, m, d)."""
    index = attention.argmax(dim=1)  # (B, m)
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


class AttributeRefinedAdapter(nn.Module):
    """forward(T (B, n, D) patch tokens, S_spa (B, g², D/2), S_spe (B, D/2, g²)) -> refined T."""

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        half, g2 = dim // 2, grid * grid
        tokens = (grid // 2) ** 2
        self.grid = grid
        self.spatial_map = AttentionMap(half, half, half // 2)
        self.spatial_norm = nn.LayerNorm(half)
        self.spatial_cnn = nn.Sequential(
            nn.Conv2d(half, half // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(half // 2),
            nn.ReLU(),
            nn.Conv2d(half // 2, half // 2, 3, padding=1),
            nn.BatchNorm2d(half // 2),
            nn.ReLU(),
        )
        self.spectral_map = AttentionMap(half, g2, g2 // 2)
        self.spectral_norm = nn.LayerNorm(half)
        self.spectral_cnn = nn.Sequential(nn.Conv1d(half, tokens, 1), nn.BatchNorm1d(tokens), nn.ReLU())
        self.alpha = nn.Parameter(torch.tensor(ALPHA))

    def forward(self, t: torch.Tensor, s_spa: torch.Tensor, s_spe: torch.Tensor) -> torch.Tensor:
        b, _n, d = t.shape
        t_spa, t_spe = t.chunk(2, dim=-1)
        with torch.no_grad():  # only the argmax is used: no gradient reaches the projections either way
            spa_pick = self.spatial_map(t_spa, s_spa)
            spe_pick = self.spectral_map(t_spe, s_spe)
        picked = self.spatial_norm(gather_best(t_spa, spa_pick))  # (B, g², half)
        picked = picked.transpose(1, 2).reshape(b, d // 2, self.grid, self.grid)
        spa_gate = self.spatial_cnn(picked).mean(1).flatten(1)[..., None]  # (B, n, 1)
        picked = self.spectral_norm(gather_best(t_spe, spe_pick))  # (B, half, half)
        spe_gate = self.spectral_cnn(picked).mean(-1)[..., None]  # (B, n, 1)
        return t + self.alpha * torch.cat([t_spa * spa_gate, t_spe * spe_gate], dim=-1)
