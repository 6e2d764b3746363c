"""SAM image encoder (ViT-B / ViT-L / ViT-H), loadable from the official Segment Anything checkpoints.

The architecture is the one of `segment_anything.modeling.image_encoder.ImageEncoderViT` (ViTDet style):
16x16 patch embedding plus an absolute position embedding, transformer blocks with windowed attention
except at a few global blocks, decomposed relative position embeddings in every attention, and a conv
neck down to 256 channels. Module and parameter names mirror the official ones, so a checkpoint loads by
stripping `image_encoder.` from its keys.

Beyond the official encoder, inputs of another size (a multiple of the patch size) also work: the
absolute position embedding is resized bicubically and the relative position tables linearly, as ViTDet
does. At the pre-training size the output is the official one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, BackboneFeatures
from .loading import load_mapped, strip_prefix

# SAM builds every LayerNorm (blocks and neck) with this epsilon, not PyTorch's default 1e-5.
NORM_EPS = 1e-6


@dataclass(frozen=True)
class SamViTConfig:
    """Hyper-parameters of one SAM image encoder (those of `segment_anything.build_sam`)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    out_chans: int = 256
    in_chans: int = 3


VARIANTS: dict[str, SamViTConfig] = {
    "vit_b": SamViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # For CPU tests and the demo. An 8x8 token grid with window 3 needs padding to 9x9, like the real
    # 64x64 grid with window 14 does (to 70x70), so the padding path is exercised too.
    "tiny": SamViTConfig(embed_dim=64, depth=3, num_heads=4, global_attn_indexes=(2,), img_size=128, window_size=3),
}


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, num_channels: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens, laid out (B, H, W, C) as the blocks expect."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class MLPBlock(nn.Module):
    def __init__(self, embedding_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


def relative_position_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Embeddings (size, size, C) of the offsets query-key along one axis, from a (L, C) table.

    The table holds one row per offset -(size-1)..size-1; one learned for another size is resized linearly.
    """
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.T[None], size=length, mode="linear")[0].T
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[idx[:, None] - idx[None, :] + size - 1]


def relative_position_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """Decomposed relative position bias (MViTv2) for queries q (B, heads, H*W, C): (B, heads, H*W, H*W).

    The bias of query (y, x) for key (y', x') is q . Rh[y, y'] + q . Rw[x, x'], with the unscaled query.
    """
    h, w = hw
    q = q.unflatten(2, (h, w))
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q, relative_position_table(h, rel_pos_h))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q, relative_position_table(w, rel_pos_w))
    return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2).flatten(2, 3)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative position embeddings."""

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        # One fused projection, named like the official one: LoRA wraps `attn.qkv`.
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        # softmax(q k^T / sqrt(d) + bias): the official scores exactly, so the fused kernels can be used.
        bias = relative_position_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(b, h, w, c))


def window_partition(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * windows, size, size, C), zero-padding H and W up to multiples of size."""
    b, h, w, c = x.shape
    pad_h, pad_w = -h % size, -w % size
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // size, size, wp // size, size, c).transpose(2, 3)
    return x.reshape(-1, size, size, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, size: int, padded: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: back to (B, H, W, C), padding removed."""
    (hp, wp), (h, w) = padded, hw
    c = windows.shape[-1]
    x = windows.view(-1, hp // size, wp // size, size, size, c).transpose(2, 3).reshape(-1, hp, wp, c)
    return x[:, :h, :w]


class Block(nn.Module):
    """Pre-norm transformer block; attention is windowed when `window_size` > 0, else global."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        # Relative position tables cover the attended extent: a window, or the whole pre-training grid.
        self.attn = Attention(dim, num_heads, (window_size, window_size) if window_size else grid)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window_size:
            windows, padded = window_partition(y, self.window_size)
            y = window_unpartition(self.attn(windows), self.window_size, padded, (x.shape[1], x.shape[2]))
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(Backbone):
    """SAM's image encoder: (B, 3, H, W) normalised image -> (B, 256, H/16, W/16) embedding."""

    def __init__(self, config: SamViTConfig) -> None:
        super().__init__()
        self.config = config
        self.img_size = config.img_size
        grid = (config.img_size // config.patch_size,) * 2
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, config.embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                config.embed_dim,
                config.num_heads,
                config.mlp_ratio,
                0 if i in config.global_attn_indexes else config.window_size,
                grid,
            )
            for i in range(config.depth)
        )
        # Indexes 0..3 are the official names (neck.0.weight, neck.1.weight, ...): keep them a Sequential.
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        """Absolute position embedding (1, h, w, C) for an h x w token grid."""
        pos = self.pos_embed
        if pos.shape[1:3] != (h, w):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
            pos = pos.permute(0, 2, 3, 1)
        return pos

    def forward_features(self, x: torch.Tensor) -> BackboneFeatures:
        x = self.patch_embed(x)
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        blocks = []
        for block in self.blocks:
            x = block(x)
            blocks.append(x)
        return BackboneFeatures(out=self.neck(x.permute(0, 3, 1, 2)), blocks=blocks)


def build(variant: str) -> ImageEncoderViT:
    """A randomly initialised encoder of one of `VARIANTS` ("vit_b", "vit_l", "vit_h", "tiny")."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown SAM variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return ImageEncoderViT(VARIANTS[variant])


def load_official(model: ImageEncoderViT, state: Mapping[str, torch.Tensor]) -> None:
    """Load the image encoder of a full official SAM checkpoint (keys `image_encoder.*`; others ignored).

    Raises CheckpointMismatch naming the missing, unexpected and mis-shaped keys, before changing any weight.
    """
    load_mapped(model, state, strip_prefix("image_encoder."), source="SAM checkpoint")
