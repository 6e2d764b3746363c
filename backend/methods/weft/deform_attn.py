"""Multi-scale deformable attention (Deformable DETR, as ViT-Adapter's injector uses it) in plain PyTorch:
bilinear sampling with `grid_sample`, so it runs on CPU and CUDA alike without a compiled extension."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def token_centres(grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, h*w, 2) reference points: the centres of the token grid as (x, y) in [0, 1], row-major."""
    h, w = grid
    ys, xs = torch.meshgrid(
        (torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
        (torch.arange(w, device=device, dtype=dtype) + 0.5) / w,
        indexing="ij",
    )
    return torch.stack([xs.flatten(), ys.flatten()], -1)[None]


def ms_deform_attn(
    value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """value (B, S, heads, d) over levels of `shapes` (h, w) concatenated row-major; locations (B, Q, heads,
    levels, points, 2) as (x, y) in [0, 1] of each level; weights (B, Q, heads, levels, points), summing to 1 per
    head. Returns (B, Q, heads * d): each head's weighted sum of its bilinearly sampled values (zeros outside)."""
    b, _, heads, d = value.shape
    _, q, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample's [-1, 1], align_corners=False: pixel centres at (i + 0.5) / size
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = per_level[level].permute(0, 2, 3, 1).reshape(b * heads, d, h, w)
        g = grids[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(b * heads, q, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2)  # (B*heads, d, Q, levels, points)
    w = weights.permute(0, 2, 1, 3, 4).reshape(b * heads, 1, q, levels, points)
    out = (stacked * w).sum((-1, -2))  # (B*heads, d, Q)
    return out.reshape(b, heads * d, q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Queries (B, Q, dim) attend to `points` sampled per head and level around their reference points.

    `value_ratio` shrinks the value projection (WEFT's injector: 0.5, i.e. 1024 -> 512 -> 1024); `value_dim` is the
    values' width when it differs from the queries' (a hierarchical backbone's stages). Offsets start
    on a ring of directions (one per head) scaled by the point index, attention weights start uniform, as in
    Deformable DETR. The official repository's unused `cosine_weights` layer is not built.
    """

    def __init__(
        self, dim: int, heads: int, levels: int, points: int, value_ratio: float = 1.0, value_dim: int | None = None
    ) -> None:
        super().__init__()
        inner = int(dim * value_ratio)
        if inner % heads:
            raise ValueError(f"the value width {inner} must be divisible by the {heads} heads")
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(value_dim or dim, inner)
        self.output_proj = nn.Linear(inner, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        ring = torch.stack([angles.cos(), angles.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True).values
        ring = ring[:, None, None, :].repeat(1, self.levels, self.points, 1)
        ring *= torch.arange(1, self.points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor, shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        """query (B, Q, dim); reference (B, Q, 2) as (x, y) in [0, 1]; value (B, S, value_dim) over `shapes`."""
        b, q, _ = query.shape
        v = self.value_proj(value).reshape(b, value.shape[1], self.heads, -1)
        offsets = self.sampling_offsets(query).reshape(b, q, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).reshape(b, q, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).reshape(b, q, self.heads, self.levels, self.points)
        # Offsets are in pixels of each level: normalise by its (width, height).
        size = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference[:, :, None, None, None, :] + offsets / size[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn(v, shapes, locations, weights))
