"""The WEFT model (methods.md §1): a frozen backbone, the wavelet expert extractor, the expert-guided conditional
adapter's interactions around the backbone's block groups (backend/methods/weft/stages.py), the output assembly
into four levels, and a segmentation head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from backend.io.rasterize import IGNORE
from backend.models.peft.checkpointing import checkpoint_blocks
from backend.models.peft.freeze import FreezePolicy, apply_freezing
from backend.models.peft.state import AdapterState

from .adapter import Interaction
from .deform_attn import token_centres
from .extractor import WaveletExpertExtractor
from .head import make_head
from .stages import stages_of

EXTRA_EXTRACTORS = 2  # after the last interaction
MULTIPLE = 32  # TEW splits the wavelet tokens into 1/8, 1/16 and 1/32 maps: sides must divide by 32
HIERARCHICAL_WIDTH = 256  # the wavelet tokens' width on a hierarchical backbone (MobileSAM's neck width)

# Everything of WEFT trains; the backbone (its norms included) stays frozen, as in the code's base class.
POLICY = FreezePolicy(
    adapters=False, trainable=("extractor.*", "interactions.*", "out_proj.*", "fusion_norms.*", "head.*")
)


def pad_to_multiple(x: torch.Tensor) -> torch.Tensor:
    """Edge-replicate x (B, C, H, W) to sides divisible by MULTIPLE."""
    pad_h, pad_w = -x.shape[-2] % MULTIPLE, -x.shape[-1] % MULTIPLE
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x


class WEFT(AdapterState, nn.Module):
    """forward(image (B, C, H, W), any size) -> per-pixel logits (B, num_classes, H, W), class 0 = background.

    The image is padded (edge replication) to sides divisible by 32 and the logits cropped back. At
    initialisation every γ is 0, so the backbone's tokens are exactly those of the frozen backbone alone. On a
    plain ViT the wavelet tokens have the ViT's width (the paper); on MobileSAM's TinyViT they are 256 wide and
    each stage's output is projected to it (`out_proj`, identities on a ViT).
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int = 2, drop_path_rate: float = 0.0, head: str = "mask2former"
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.stages = stages_of(backbone)
        dims = self.stages.dims
        dim = dims[0] if len(set(dims)) == 1 else HIERARCHICAL_WIDTH
        self.extractor = WaveletExpertExtractor(dim, in_chans=backbone.config.in_chans)
        last = len(dims) - 1
        self.interactions = nn.ModuleList(
            Interaction(d, heads, dim, EXTRA_EXTRACTORS if i == last else 0, drop_path_rate)
            for i, (d, heads) in enumerate(zip(dims, self.stages.heads, strict=True))
        )
        self.out_proj = nn.ModuleList(nn.Identity() if d == dim else nn.Conv2d(d, dim, 1) for d in dims)
        self.fusion_norms = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(4))
        self.head = make_head(head, dim, num_classes)
        apply_freezing(self, POLICY)

    def interact(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """The interactions: the backbone's output after each block group as a map (B, width, h, w), and the
        wavelet features (c1 map, c tokens, the grids of c's three levels)."""
        c1, c, grids = self.extractor(x)
        tokens, grid = self.stages.embed(x)
        outs = []
        for i, interaction in enumerate(self.interactions):
            reference = token_centres(grid, x.device, tokens.dtype).expand(tokens.shape[0], -1, -1)
            tokens = interaction.inject(tokens, reference, c, grids)
            out, tokens, grid = self.stages.run(i, tokens, grid)
            c = interaction.extract(c, grids)
            outs.append(out)
        return outs, c1, c, grids

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four fused levels f1 … f4 (1/4, 1/8, 1/16, 1/32), each (B, width, h, w); sides divisible by 32.

        f1 = c1 + up(c2) + up(x1), f2 = c2 + up(x2), f3 = c3 + x3, f4 = c4 + down(x4) (bilinear resizing of the
        backbone's maps, which sit at 1/16 for a patch-16 ViT), each through its own BatchNorm; a backbone with
        fewer interactions lends its last output to the remaining levels."""
        outs, c1, c, grids = self.interact(x)
        outs = [proj(out) for proj, out in zip(self.out_proj, outs, strict=True)]
        b, _, dim = c.shape
        outs += [outs[-1]] * (4 - len(outs))
        c2, c3, c4 = (
            part.transpose(1, 2).reshape(b, dim, *grid)
            for part, grid in zip(c.split([h * w for h, w in grids], dim=1), grids, strict=True)
        )
        fused = []
        for i, (level, out) in enumerate(zip((c1, c2, c3, c4), outs, strict=True)):
            f = level + F.interpolate(out, size=level.shape[-2:], mode="bilinear", align_corners=False)
            if i == 0:
                f = f + F.interpolate(c2, size=level.shape[-2:], mode="bilinear", align_corners=False)
            fused.append(self.fusion_norms[i](f))
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = pad_to_multiple(x)
        logits = self.head(self.features(x))
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]

    def loss(self, x: torch.Tensor, label: torch.Tensor, balance: bool = True) -> torch.Tensor:
        """The head's training loss on normalised images x (B, C, H, W) and class labels (B, H, W), IGNORE where
        unknown (the padding too); `balance` weighs classes equally where the head's loss does not already."""
        x = pad_to_multiple(x)
        pad = (0, x.shape[-1] - label.shape[-1], 0, x.shape[-2] - label.shape[-2])
        return self.head.loss(self.features(x), F.pad(label, pad, value=IGNORE), balance)

    def enable_activation_checkpointing(self) -> None:
        """Recompute in the backward pass the frozen backbone's blocks and WEFT's own heavy modules — the wavelet
        experts, each injector and extractor, the Mask2Former pixel decoder's layers — whose activations are most
        of PEFT's memory (measured in docs/BENCHMARKS.md); backend/models/peft/checkpointing.py."""
        layers = getattr(self.backbone, "layers", None)  # TinyViT's stages, else a plain ViT's blocks
        frozen = [b for layer in layers for b in layer.blocks] if layers is not None else list(self.backbone.blocks)
        adapter = [self.extractor.experts]
        for interaction in self.interactions:
            adapter += [interaction.injector, interaction.extractor, *interaction.extra]
        pixel_decoder = getattr(self.head, "pixel_decoder", None)  # Mask2Former's; the FPN head has none
        checkpoint_blocks(frozen + adapter + (list(pixel_decoder.layers) if pixel_decoder is not None else []))

    def adapter_keys(self) -> Callable[[str], bool]:
        """The adapter: everything but the frozen backbone (trainable tensors and BatchNorm statistics)."""
        return lambda k: not k.startswith("backbone.")
