"""How WEFT's interactions sit in a frozen backbone: the tokens entering each interaction and the frozen blocks
that run between them.

A plain ViT (the paper's): four interactions over equal groups of blocks, all at the ViT's width and 1/16 grid.
MobileSAM's TinyViT (offered so that an analyst without downloads gets real pretrained features): one interaction
before each of its three transformer stages (1/8, 1/16, 1/16 at widths 128, 160, 320), the convolutional first
stage being part of the embedding — a departure from the paper, which has no hierarchical backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from backend.models.backbones.tiny_vit import TinyViTEncoder
from backend.models.backbones.vit import UniPerceiverViT

INTERACTIONS = 4
Grid = tuple[int, int]


def block_groups(depth: int, groups: int = INTERACTIONS) -> list[range]:
    """Equal consecutive groups of block indexes (24 blocks: 0-5, 6-11, 12-17, 18-23); fewer for shallow ViTs."""
    n = min(groups, depth)
    bounds = [round(i * depth / n) for i in range(n + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(n)]


class ViTStages:
    """A plain ViT: tokens (B, N, D) on the patch grid throughout."""

    def __init__(self, backbone: UniPerceiverViT) -> None:
        self.backbone = backbone
        self.groups = block_groups(backbone.config.depth)
        self.dims = [backbone.config.embed_dim] * len(self.groups)
        self.heads = [backbone.config.num_heads] * len(self.groups)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        patch = self.backbone.config.patch_size
        return self.backbone.embed(x), (x.shape[-2] // patch, x.shape[-1] // patch)

    def run(self, i: int, tokens: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, Grid]:
        """Interaction i's blocks: (its output as a map (B, D, h, w), the tokens for the next, their grid)."""
        for j in self.groups[i]:
            tokens = self.backbone.blocks[j](tokens)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid), tokens, grid


class TinyViTStages:
    """MobileSAM's TinyViT: the patch embedding and the MBConv stage are the embedding; each transformer stage
    (with the patch merging after it) is one interaction's blocks."""

    def __init__(self, backbone: TinyViTEncoder) -> None:
        self.backbone = backbone
        config = backbone.config
        self.stages = list(range(1, len(config.depths)))
        self.dims = [config.embed_dims[s] for s in self.stages]
        self.heads = [config.num_heads[s] for s in self.stages]

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = self.backbone.patch_embed(x)
        first = self.backbone.layers[0]
        for block in first.blocks:
            x = block(x)
        x = first.downsample(x)  # (B, h, w, C)
        return x.flatten(1, 2), (x.shape[1], x.shape[2])

    def run(self, i: int, tokens: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, Grid]:
        stage = self.backbone.layers[self.stages[i]]
        x = tokens.reshape(tokens.shape[0], *grid, -1)
        for block in stage.blocks:
            x = block(x)
        out = x.permute(0, 3, 1, 2)
        if stage.downsample is not None:
            x = stage.downsample(out)
        return out, x.flatten(1, 2), (x.shape[1], x.shape[2])


Stages = ViTStages | TinyViTStages


def stages_of(backbone: nn.Module) -> Stages:
    if isinstance(backbone, UniPerceiverViT):
        return ViTStages(backbone)
    if isinstance(backbone, TinyViTEncoder):
        return TinyViTStages(backbone)
    raise ValueError(f"WEFT cannot adapt a {type(backbone).__name__}; it needs a plain ViT or MobileSAM's TinyViT")
