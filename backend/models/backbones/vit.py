"""Plain ViT-L/16 encoders in two official checkpoint layouts.

* Uni-Perceiver-L as released by ViT-Adapter (`uni-perceiver-large-L24-H1024-224size-pretrained_converted.pth`,
  WEFT's backbone). Architecture and key names read in czczup/ViT-Adapter
  `segmentation/mmseg_custom/models/backbones/base/uniperceiver.py` (`UnifiedBertEncoder`; WEFT ships the
  same file as CSYSI/WEFT `WEFT_AAAI_2026/mmseg_custom/models/backbones/base/uniperceiver.py`):
  conv patch embedding, a learned 14x14 spatial position table bicubically resized to the token grid, plus
  temporal position 0 of an 8-entry table, then LayerNorm; 24 pre-norm blocks with LayerScale gammas and
  no final norm. nn.LayerNorm default eps (1e-5) everywhere.
* Scale-MAE ViT-L (`scalemae-vitlarge-800.pth`, SpectralX's backbone). Architecture and key names read in
  bair-climate-initiative/scale-mae `scalemae/models_mae.py` (`MaskedAutoencoderViT.forward_encoder`),
  `scalemae/models_vit.py` and `scalemae/util/pos_embed.py` (`get_2d_sincos_pos_embed_with_resolution`):
  timm `PatchEmbed`/`Block` names, a cls token, a fixed GSD-aware 2-D sin-cos position code computed from
  `input_res` (not a learned table), final LayerNorm; LayerNorm eps 1e-6.

Both share one block implementation with timm-style names (`norm1`, `attn.qkv`, `attn.proj`, `norm2`,
`mlp.fc1`, `mlp.fc2`, plus `gamma_1`/`gamma_2` for Uni-Perceiver), so the Scale-MAE map is a prefix
drop and the Uni-Perceiver map a per-name rename (tables below).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, BackboneFeatures
from .loading import load_mapped

Layout = Literal["uniperceiver", "scalemae"]

# uniperceiver.py PatchEmbed: `temporal_pos_embed = nn.Embedding(8, embed_dim)`; images use index 0.
TEMPORAL_POSITIONS = 8


@dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of a plain ViT; `layout` picks the official architecture and checkpoint names."""

    layout: Layout
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 16
    in_chans: int = 3
    pretrain_size: int = 224  # Uni-Perceiver: the learned position table covers pretrain_size / patch_size per side
    input_res: float = 1.0  # Scale-MAE: ground sample distance of an input pixel, scales the sin-cos positions
    drop_path_rate: float = 0.0  # stochastic depth, linear over depth (WEFT keeps 0.4 on the frozen blocks)

    @property
    def norm_eps(self) -> float:
        # uniperceiver.py uses bare nn.LayerNorm; scale-mae's vit_large_patch16 passes eps=1e-6.
        return 1e-5 if self.layout == "uniperceiver" else 1e-6

    @property
    def pretrain_grid(self) -> int:
        return self.pretrain_size // self.patch_size


VARIANTS: dict[str, ViTConfig] = {
    "uniperceiver_vit_l": ViTConfig(layout="uniperceiver"),
    # SpectralX feeds Scale-MAE with input_res 10 (reference/methods.md §2.1); callers may pass another GSD.
    "scalemae_vit_l": ViTConfig(layout="scalemae", input_res=10.0),
    "tiny": ViTConfig(layout="uniperceiver", embed_dim=32, depth=2, num_heads=4, patch_size=4, pretrain_size=32),
    # SpectralX's miniature: HyperT needs the 16-pixel patch and a pretraining size divisible by 32.
    "scalemae_tiny": ViTConfig(layout="scalemae", embed_dim=64, depth=4, num_heads=4, pretrain_size=64, input_res=10.0),
    # WEFT's miniature keeps the real 16-pixel patch (its adapter assembles 1/4 … 1/32 maps around the ViT's 1/16).
    "tiny16": ViTConfig(layout="uniperceiver", embed_dim=32, depth=4, num_heads=4, pretrain_size=64),
}


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample, rescaling survivors (timm's DropPath)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Attention(nn.Module):
    """Global multi-head self-attention with a fused qkv projection (q, k, v stacked in that order)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; with `layer_scale` each branch is multiplied by a learned gamma."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, eps: float, layer_scale: bool, drop_path_rate: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # The checkpoint overwrites the gammas; ones keep an unloaded (test) model non-degenerate, whereas the
        # official zeros would turn every block into the identity.
        self.gamma_1 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.gamma_2 = nn.Parameter(torch.ones(dim)) if layer_scale else None
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(x))
        if self.gamma_1 is not None:
            a = self.gamma_1 * a
        x = x + drop_path(a, self.drop_path_rate, self.training)
        m = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            m = self.gamma_2 * m
        return x + drop_path(m, self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection to tokens (B, h*w, d), row-major over the patch grid."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


class PlainViT(Backbone):
    """Patch embedding, then `blocks` in sequence; subclasses add the layout's embeddings and final step."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if config.embed_dim % config.num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        self.config = config
        self.patch_embed = PatchEmbed(config.in_chans, config.embed_dim, config.patch_size)
        # Linear 0 -> drop_path_rate over depth (torch.linspace in the official code; plain floats stay meta-safe).
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            Block(
                config.embed_dim,
                config.num_heads,
                config.mlp_ratio,
                config.norm_eps,
                layer_scale=config.layout == "uniperceiver",
                drop_path_rate=rate,
            )
            for rate in rates
        )

    def run_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every block in order: the last output and the output of each block."""
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return x, outputs


class UniPerceiverViT(PlainViT):
    """Uni-Perceiver encoder (`UnifiedBertEncoder`): returns tokens (B, h*w, d), no cls token, no final norm."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        d = config.embed_dim
        self.spatial_pos_embed = nn.Parameter(torch.zeros(config.pretrain_grid**2, d))
        self.temporal_pos_embed = nn.Parameter(torch.zeros(TEMPORAL_POSITIONS, d))
        self.embed_norm = nn.LayerNorm(d, eps=config.norm_eps)
        nn.init.trunc_normal_(self.spatial_pos_embed, std=0.02)
        nn.init.trunc_normal_(self.temporal_pos_embed, std=0.02)

    def spatial_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The pretraining position table resized bicubically (align_corners=False) to `grid`: (h*w, d).

        Applied even at the pretraining grid, as the official code does (an exact identity there).
        """
        g = self.config.pretrain_grid
        table = self.spatial_pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        return table.flatten(2).transpose(1, 2)[0]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        tokens, grid = self.patch_embed(x)
        tokens = tokens + self.spatial_positions(grid) + self.temporal_pos_embed[0]
        return self.embed_norm(tokens)

    def forward_features(self, x: torch.Tensor) -> BackboneFeatures:
        out, outputs = self.run_blocks(self.embed(x))
        return BackboneFeatures(out, outputs)


def sincos_positions_with_resolution(dim: int, grid: tuple[int, int], res: torch.Tensor) -> torch.Tensor:
    """Scale-MAE's GSD-aware 2-D sin-cos code: (n, h*w, dim) for n resolutions `res` (metres per pixel).

    Token (row i, column j) sits at (j * res, i * res); the first half of the channels encodes the column
    coordinate and the second half the row (the official meshgrid puts w first), each half being
    [sin(p * w_k), cos(p * w_k)] with w_k = 10000^(-k / (dim / 4)), k < dim / 4. Official code is square-only;
    rectangular grids follow the same convention.
    """
    if dim % 4:
        raise ValueError("the sin-cos position code needs a dimension divisible by 4")
    h, w = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=res.device) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=res.device),
        torch.arange(w, dtype=torch.float32, device=res.device),
        indexing="ij",
    )
    res = res.to(torch.float32).reshape(-1, 1, 1)  # one resolution per sample: (n, 1, 1)

    def encode(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.reshape(1, -1, 1) * res * omega  # (n, h*w, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    return torch.cat([encode(cols), encode(rows)], dim=-1)


class ScaleMAEViT(PlainViT):
    """Scale-MAE encoder: returns normed tokens (B, 1 + h*w, d), cls token first.

    Equals `forward_encoder` of the official `MaskedAutoencoderViT` at mask_ratio 0 with the token order
    restored (the official random masking permutes tokens even when nothing is masked), i.e. `models_vit`'s
    path before its pooling and head.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, x: torch.Tensor, input_res: float | torch.Tensor | None = None) -> torch.Tensor:
        """Tokens with the cls token prepended; `input_res` is a scalar or one GSD per sample."""
        tokens, grid = self.patch_embed(x)
        res = torch.as_tensor(self.config.input_res if input_res is None else input_res, device=tokens.device)
        pos = sincos_positions_with_resolution(tokens.shape[-1], grid, res).to(tokens.dtype)
        # The cls token gets a zero position code in the official code, so it is added unchanged.
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens + pos], dim=1)

    def forward_features(self, x: torch.Tensor, input_res: float | torch.Tensor | None = None) -> BackboneFeatures:
        out, outputs = self.run_blocks(self.embed(x, input_res))
        return BackboneFeatures(self.norm(out), outputs)


VisionTransformer = UniPerceiverViT | ScaleMAEViT


def build(variant: str, **overrides: object) -> VisionTransformer:
    """A ViT of a named variant (see VARIANTS); keyword overrides replace config fields (e.g. layout, depth)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; known: {', '.join(VARIANTS)}")
    config = dataclasses.replace(VARIANTS[variant], **overrides)
    return UniPerceiverViT(config) if config.layout == "uniperceiver" else ScaleMAEViT(config)


# Uni-Perceiver: official name (uniperceiver.py) -> ours. Block-level names are under `layers.N.` there and
# `blocks.N.` here; anything not listed is passed through unchanged and so reported as unexpected.
_UNIPERCEIVER_EMBED = {
    "visual_embed.patch_embed.proj.weight": "patch_embed.proj.weight",
    "visual_embed.patch_embed.proj.bias": "patch_embed.proj.bias",
    "visual_embed.patch_embed.spatial_pos_embed.weight": "spatial_pos_embed",
    "visual_embed.patch_embed.temporal_pos_embed.weight": "temporal_pos_embed",
    "visual_embed.embeddings_norm.weight": "embed_norm.weight",
    "visual_embed.embeddings_norm.bias": "embed_norm.bias",
}
_UNIPERCEIVER_BLOCK = {
    "self_attn.in_proj": "attn.qkv",
    "self_attn.out_proj": "attn.proj",
    "linear1": "mlp.fc1",
    "linear2": "mlp.fc2",
}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")


def uniperceiver_key(key: str) -> str:
    """Map one key of the ViT-Adapter Uni-Perceiver checkpoint to this module's name."""
    if key in _UNIPERCEIVER_EMBED:
        return _UNIPERCEIVER_EMBED[key]
    if key.startswith("layers.") and key.endswith((".gamma_1", ".gamma_2")):
        return "blocks." + key[len("layers.") :]
    match = _LAYER.fullmatch(key)
    if match:
        index, module, kind = match.groups()
        return f"blocks.{index}.{_UNIPERCEIVER_BLOCK.get(module, module)}.{kind}"  # norm1/norm2 keep their names
    return key


# Scale-MAE pretraining checkpoint entries that are not part of the encoder (models_mae.py): the MAE decoder
# (`decoder_embed`, `decoder_pos_embed`, `decoder_blocks`, `decoder_norm`, `mask_token`, `mask_token_decoder`,
# `pos_emb_projection`), the FPN and the Laplacian reconstruction heads (`fpn`, `fcn`, `fcn_high`, `fcn_low`).
# `pos_embed` is the fixed non-GSD sin-cos table (requires_grad=False); the encoder recomputes its code from
# input_res instead.
_SCALEMAE_DROPPED = ("decoder_", "mask_token", "pos_emb_projection.", "fpn.", "fcn.", "fcn_high.", "fcn_low.")


def scalemae_key(key: str) -> str | None:
    """Map one key of the Scale-MAE pretraining checkpoint to this module's name; None drops it."""
    if key == "pos_embed" or key.startswith(_SCALEMAE_DROPPED):
        return None
    return key  # patch_embed.proj.*, cls_token, blocks.N.*, norm.* are named identically


def load_official(model: VisionTransformer, state: Mapping[str, torch.Tensor]) -> None:
    """Load the full official checkpoint state dict of the model's layout; raises CheckpointMismatch."""
    if model.config.layout == "uniperceiver":
        load_mapped(model, state, uniperceiver_key, source="Uni-Perceiver-L checkpoint")
    else:
        load_mapped(model, state, scalemae_key, source="Scale-MAE checkpoint")
