"""The WEFT model (methods.md §1): a frozen plain ViT, the wavelet expert extractor, four interactions of the
expert-guided conditional adapter over equal groups of ViT blocks, the output assembly into four levels, and a
segmentation head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from backend.models.backbones.vit import UniPerceiverViT
from backend.models.peft.freeze import FreezePolicy, apply_freezing
from backend.models.peft.state import AdapterState

from .adapter import Interaction
from .extractor import WaveletExpertExtractor
from .head import FPNHead

INTERACTIONS = 4
EXTRA_EXTRACTORS = 2  # after the last interaction
MULTIPLE = 32  # TEW splits the wavelet tokens into 1/8, 1/16 and 1/32 maps: sides must divide by 32

# Everything of WEFT trains; the ViT (its norms included) stays frozen, as in the code's base class.
POLICY = FreezePolicy(adapters=False, trainable=("extractor.*", "interactions.*", "fusion_norms.*", "head.*"))


def block_groups(depth: int, groups: int = INTERACTIONS) -> list[range]:
    """Equal consecutive groups of block indexes (24 blocks: 0-5, 6-11, 12-17, 18-23); fewer for shallow ViTs."""
    n = min(groups, depth)
    bounds = [round(i * depth / n) for i in range(n + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(n)]


def token_centres(grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, h*w, 2) reference points: the centres of the token grid as (x, y) in [0, 1], row-major."""
    h, w = grid
    ys, xs = torch.meshgrid(
        (torch.arange(h, device=device, dtype=dtype) + 0.5) / h,
        (torch.arange(w, device=device, dtype=dtype) + 0.5) / w,
        indexing="ij",
    )
    return torch.stack([xs.flatten(), ys.flatten()], -1)[None]


class WEFT(AdapterState, nn.Module):
    """forward(image (B, C, H, W), any size) -> per-pixel logits (B, num_classes, H, W), class 0 = background.

    The image is padded (edge replication) to sides divisible by 32 and the logits cropped back. At
    initialisation every γ is 0, so the ViT tokens are exactly those of the frozen backbone alone.
    """

    def __init__(self, backbone: UniPerceiverViT, num_classes: int = 2, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        config = backbone.config
        dim = config.embed_dim
        self.backbone = backbone
        self.extractor = WaveletExpertExtractor(dim, in_chans=config.in_chans)
        self.groups = block_groups(config.depth)
        last = len(self.groups) - 1
        self.interactions = nn.ModuleList(
            Interaction(dim, config.num_heads, EXTRA_EXTRACTORS if i == last else 0, drop_path_rate)
            for i in range(len(self.groups))
        )
        self.fusion_norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(4))
        self.head = FPNHead(dim, num_classes)
        apply_freezing(self, POLICY)

    def interact(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """The interactions: the ViT output after each block group as a map (B, dim, h, w), and the wavelet
        features (c1 map, c tokens, the grids of c's three levels)."""
        c1, c, grids = self.extractor(x)
        tokens = self.backbone.embed(x)
        b, _, dim = tokens.shape
        patch = self.backbone.config.patch_size
        vit_grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        reference = token_centres(vit_grid, x.device, tokens.dtype).expand(b, -1, -1)
        outs = []
        for interaction, group in zip(self.interactions, self.groups, strict=True):
            tokens, c = interaction(tokens, c, [self.backbone.blocks[i] for i in group], reference, grids)
            outs.append(tokens.transpose(1, 2).reshape(b, dim, *vit_grid))
        return outs, c1, c, grids

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four fused levels f1 … f4 (1/4, 1/8, 1/16, 1/32), each (B, dim, h, w); sides divisible by 32.

        f1 = c1 + up(c2) + up(x1), f2 = c2 + up(x2), f3 = c3 + x3, f4 = c4 + down(x4) (bilinear resizing of the
        ViT maps, which sit at 1/16 for a patch-16 ViT), each through its own BatchNorm."""
        outs, c1, c, grids = self.interact(x)
        b, _, dim = c.shape
        outs += [outs[-1]] * (4 - len(outs))  # a shallow test ViT: its last output stands for missing groups
        c2, c3, c4 = (
            part.transpose(1, 2).reshape(b, dim, *grid)
            for part, grid in zip(c.split([h * w for h, w in grids], dim=1), grids, strict=True)
        )
        fused = []
        for i, (level, vit) in enumerate(zip((c1, c2, c3, c4), outs, strict=True)):
            f = level + F.interpolate(vit, size=level.shape[-2:], mode="bilinear", align_corners=False)
            if i == 0:
                f = f + F.interpolate(c2, size=level.shape[-2:], mode="bilinear", align_corners=False)
            fused.append(self.fusion_norms[i](f))
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % MULTIPLE, -w % MULTIPLE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        logits = self.head(self.features(x))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    def adapter_keys(self) -> Callable[[str], bool]:
        """The adapter: everything but the frozen backbone (trainable tensors and BatchNorm statistics)."""
        return lambda k: not k.startswith("backbone.")
