"""MobileSAM's image encoder (TinyViT-5M with a SAM neck), loadable from the official `mobile_sam.pt`.

The architecture is the one of `mobile_sam.modeling.tiny_vit_sam.TinyViT`: a two-conv patch embedding to
1/4 resolution, a stage of MBConv blocks, three stages of TinyViT blocks (windowed attention with learned
per-offset attention biases, a depthwise 3x3 conv, an MLP), patch merging between stages, and SAM's conv
neck to 256 channels. MobileSAM's change to TinyViT: the last patch merging has stride 1, so the output
stride is 16 (a 64x64 grid for a 1024 input), as for SAM's ViT encoders. Module and parameter names mirror
the official ones, so a checkpoint loads by stripping `image_encoder.` from its keys.

Beyond the official encoder, inputs of any size work (e.g. FILF's 256x256 tiles -> a 16x16 grid): every
block takes its resolution from its input, where the official code fixes it at construction and even
hard-codes the 64x64 output grid. At the official size the output is the official one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, BackboneFeatures
from .loading import load_mapped, strip_prefix
from .sam_vit import LayerNorm2d, window_partition, window_unpartition


@dataclass(frozen=True)
class TinyViTConfig:
    """Hyper-parameters of one TinyViT encoder (those `mobile_sam.build_sam.build_sam_vit_t` passes)."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    # Heads of stages 2-4; the first stage is convolutional (the official config lists a value it ignores).
    num_heads: tuple[int, int, int, int]
    window_sizes: tuple[int, int, int, int]
    img_size: int = 1024
    in_chans: int = 3
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    # Strides of the patch mergings after stages 1-3. The official code picks stride 1 when the merge's
    # out_dim is 320, 448 or 576, i.e. for the merge into the last stage of its 5M/11M/21M models.
    merge_strides: tuple[int, int, int] = (2, 2, 1)
    out_chans: int = 256
    # Size of the ImageNet classification head the official class keeps but never uses (see `head`).
    num_classes: int = 1000


VARIANTS: dict[str, TinyViTConfig] = {
    "vit_t": TinyViTConfig(
        embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7)
    ),
    # For CPU tests and the demo: a 64x64 input gives 8x8 and 4x4 grids. Window 3 pads the 8x8 grid to 9x9
    # and the 4x4 grids to 6x6, so the padding path runs as it does for the real 16x16 grid with window 14.
    "tiny": TinyViTConfig(
        embed_dims=(16, 32, 48, 64),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 3, 4),
        window_sizes=(3, 3, 3, 3),
        img_size=64,
        out_chans=32,
        num_classes=10,
    ),
}


class ConvBN(nn.Sequential):
    """The official `Conv2d_BN`: bias-free convolution, then BatchNorm (checkpoint keys `c.*`, `bn.*`)."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module(
            "c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        )
        self.add_module("bn", nn.BatchNorm2d(out_chans))


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 conv-BN layers with a GELU between them: (B, C, H, W) -> (B, D, H/4, W/4)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        # Index 1 is the (parameter-free) GELU, so the official keys seq.0.* and seq.2.* line up.
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, 3, 2), nn.GELU(), ConvBN(embed_dim // 2, embed_dim, 3, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (1x1 expand, depthwise 3x3, 1x1 project) on (B, C, H, W) maps."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        # The activation comes after the residual sum, as in the official block.
        return F.gelu(x + y)


class PatchMerging(nn.Module):
    """1x1 conv, depthwise 3x3 conv with `stride`, 1x1 conv: (B, C, H, W) -> (B, H/stride, W/stride, C')."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))
        return x.permute(0, 2, 3, 1)


class Mlp(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear, GELU, Linear (the norm is inside, as in the official module)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def attention_bias_index(window_size: int) -> torch.Tensor:
    """(N, N) index into the per-offset bias table for the N = window_size² tokens of a window.

    Tokens (y, x) and (y', x') share a bias when |y - y'| and |x - x'| agree; the official code numbers the
    offsets in order of first appearance, which (row-major from token (0, 0)) is |dy| * window_size + |dx|.
    """
    coords = torch.arange(window_size)
    ys, xs = coords.repeat_interleave(window_size), coords.repeat(window_size)
    return (ys[:, None] - ys[None, :]).abs() * window_size + (xs[:, None] - xs[None, :]).abs()


class Attention(nn.Module):
    """Pre-norm multi-head self-attention over windows (B, N, C) with learned per-offset attention biases.

    The fused `qkv` output is laid out per head, [q_h, k_h, v_h] for each head h in turn (the official
    layout), not [q, k, v] over all heads as in SAM's ViT: slicing it into q, k and v needs that order.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv_heads_interleaved = True  # read by peft.lora.lora_on_qkv to slice q/k/v correctly
        self.norm = nn.LayerNorm(dim)
        # One fused projection, named like the official one: LoRA wraps `attn.qkv`.
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        # Derived from the window size, so not in the checkpoint (non-persistent, as officially).
        self.register_buffer("attention_bias_idxs", attention_bias_index(window_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        # Indexed on every call: the official eval-mode cache of this gather goes stale when weights change.
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        # softmax(q k^T / sqrt(head_dim) + bias): the official scores, so the fused kernels can be used.
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class TinyViTBlock(nn.Module):
    """Windowed attention, a depthwise conv (no residual), an MLP; on (B, H, W, C) grids of any size."""

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        # Padding happens before the attention's own LayerNorm, so padded tokens are keys too, as officially.
        windows, padded = window_partition(x, self.window_size)
        y = self.attn(windows.flatten(1, 2))
        x = x + window_unpartition(y, self.window_size, padded, (h, w))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class Stage(nn.Module):
    """One official layer (`ConvLayer` or `BasicLayer`): `blocks`, then an optional `downsample` merge."""

    def __init__(self, blocks: list[nn.Module], downsample: PatchMerging | None, channels_last: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        # MBConv blocks work on (B, C, H, W), TinyViT blocks on (B, H, W, C); the merge takes the former.
        self.channels_last = channels_last


class TinyViTEncoder(Backbone):
    """MobileSAM's image encoder: (B, 3, H, W) normalised image -> (B, 256, H/16, W/16) embedding.

    `blocks` are all blocks in forward order (for vit_t 2 MBConv, then 2 + 6 + 2 TinyViT blocks), so
    adapters can attach between any two of them. It is a view built on access, since the blocks must stay
    registered under the official names `layers.<stage>.blocks.<i>`: register hooks on its entries or wrap
    their submodules (as LoRA does with `attn.qkv`); assigning into the list does not change the model.

    `forward_features(x).blocks` holds every block's output: (B, C, H/4, W/4) maps for the MBConv blocks and
    (B, h, w, C) grids for the TinyViT blocks — the official (B, h*w, C) tokens laid out on their grid, which
    keeps the resolution with the tensor. For vit_t on a 1024 input the grids are 128, 64 and 64 wide.

    A frozen backbone: `train()` leaves BatchNorm in eval mode, so fine-tuning adapters neither normalises
    with batch statistics nor overwrites the pretrained running statistics.
    """

    def __init__(self, config: TinyViTConfig) -> None:
        super().__init__()
        self.config = config
        # The size the official encoder is built for (MobileSAM pads inputs to it); any size runs.
        self.img_size = config.img_size
        dims = config.embed_dims
        self.patch_embed = PatchEmbed(config.in_chans, dims[0])
        stages = []
        for i, depth in enumerate(config.depths):
            downsample = PatchMerging(dims[i], dims[i + 1], config.merge_strides[i]) if i < len(dims) - 1 else None
            if i == 0:
                blocks: list[nn.Module] = [MBConv(dims[0], config.mbconv_expand_ratio) for _ in range(depth)]
            else:
                blocks = [
                    TinyViTBlock(
                        dims[i], config.num_heads[i], config.window_sizes[i], config.mlp_ratio, config.local_conv_size
                    )
                    for _ in range(depth)
                ]
            stages.append(Stage(blocks, downsample, channels_last=i > 0))
        self.layers = nn.ModuleList(stages)
        # The official TinyViT keeps its ImageNet classifier, and mobile_sam.pt carries its weights; the
        # encoder's forward never uses them. Kept as parameters so the checkpoint loads strictly.
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], config.num_classes)
        # Indexes 0..3 are the official names (neck.0.weight, neck.1.weight, ...): keep them a Sequential.
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )

    @property
    def blocks(self) -> nn.ModuleList:
        return nn.ModuleList(block for stage in self.layers for block in stage.blocks)

    def train(self, mode: bool = True) -> TinyViTEncoder:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> BackboneFeatures:
        x = self.patch_embed(x)
        blocks = []
        for stage in self.layers:
            for block in stage.blocks:
                x = block(x)
                blocks.append(x)
            if stage.downsample is not None:
                x = stage.downsample(x.permute(0, 3, 1, 2) if stage.channels_last else x)
        return BackboneFeatures(out=self.neck(x.permute(0, 3, 1, 2)), blocks=blocks)


def build(variant: str, img_size: int | None = None) -> TinyViTEncoder:
    """A randomly initialised encoder of one of `VARIANTS` ("vit_t", "tiny"); `img_size` overrides the
    nominal input size (the weights do not depend on it)."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown TinyViT variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    config = VARIANTS[variant]
    return TinyViTEncoder(config if img_size is None else replace(config, img_size=img_size))


def load_official(model: TinyViTEncoder, state: Mapping[str, torch.Tensor]) -> None:
    """Load the image encoder of a full official MobileSAM checkpoint (keys `image_encoder.*`; others ignored).

    BatchNorm running statistics are included. Raises CheckpointMismatch naming the missing, unexpected and
    mis-shaped keys, before changing any weight.
    """
    load_mapped(model, state, strip_prefix("image_encoder."), source="MobileSAM checkpoint")
