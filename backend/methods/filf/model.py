"""The FILF model: a frozen SAM / MobileSAM encoder shared by both dates, BIF-LoRA in every attention, and
a binary (BCD) or semantic (SCD) change decoder (methods.md §4)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from backend import weights
from backend.models.backbones import sam_vit, tiny_vit
from backend.models.backbones.base import Backbone
from backend.models.peft.checkpointing import checkpoint_blocks
from backend.models.peft.freeze import FreezePolicy, apply_freezing
from backend.models.peft.state import AdapterState

from .decoder import BCDDecoder, SCDDecoder, SCDOutput
from .interaction import inject_bitemporal_lora

Mode = Literal["bcd", "scd"]

FAMILIES: dict[str, ModuleType] = {"tiny_vit": tiny_vit, "sam_vit": sam_vit}

# The paper's policy: the whole encoder (norms included) is frozen; LoRA and the decoder train.
POLICY = FreezePolicy(trainable=("decoder.*",))


class FILF(AdapterState, nn.Module):
    """Bi-temporal change detection on a frozen encoder with BiTemporalInteractionLoRA on every qkv.

    forward(x1, x2) with (B, 3, H, W) images of both dates: "bcd" -> (B, 2, H, W) logits (no change, change);
    "scd" -> SCDOutput (change logit (B, 1, H, W), sem1 and sem2 (B, num_seg, H, W)). Both dates pass through
    the encoder as one stacked batch, which is how the LoRA modules find them. Training needs at least 2 pairs
    per batch (the decoder's Fourier units batch-normalise pooled features).

    `encoder_scale` resizes both dates before the encoder and the decoder's output back: a departure from the
    paper (which feeds 256² tiles as they are) for encoders pretrained on larger images, whose 16-pixel
    tokens are otherwise coarser than the objects that change (measured in docs/BENCHMARKS.md).
    """

    def __init__(
        self,
        backbone: Backbone,
        rank: int = 8,
        alpha: float = 1.0,
        mode: Mode = "bcd",
        num_seg: int = 7,
        encoder_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if mode not in ("bcd", "scd"):
            raise ValueError(f"FILF mode must be 'bcd' or 'scd', got {mode!r}")
        self.mode, self.encoder_scale = mode, encoder_scale
        self.backbone = backbone
        self.lora_layers = inject_bitemporal_lora(backbone, rank, alpha)
        if not self.lora_layers:
            raise ValueError(f"{type(backbone).__name__} has no fused attn.qkv projection to adapt")
        channels = backbone.config.out_chans
        self.decoder: BCDDecoder | SCDDecoder = (
            BCDDecoder(channels, 2) if mode == "bcd" else SCDDecoder(channels, num_seg)
        )
        self.freeze()

    def freeze(self) -> None:
        """Freeze every encoder weight; train the LoRA tensors (`lora_*`) and the decoder."""
        apply_freezing(self, POLICY)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | SCDOutput:
        if x1.shape != x2.shape:
            raise ValueError(f"both dates need the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
        x = torch.cat([x1, x2])
        if self.encoder_scale != 1:
            x = F.interpolate(x, scale_factor=self.encoder_scale, mode="bilinear", align_corners=False)
        f1, f2 = self.backbone(x).chunk(2)
        return self.decoder(f1, f2, x1.shape[-2:])

    def enable_activation_checkpointing(self) -> None:
        """Recompute each encoder block in the backward pass (measured: their activations are 1.8 of 2.5 GB for
        batch 8 at 256² on MobileSAM)."""
        checkpoint_blocks(self.backbone.blocks)

    def adapter_keys(self) -> Callable[[str], bool]:
        """The adapter: the trainable tensors, plus the decoder's BatchNorm statistics that its outputs depend on
        (the frozen encoder comes from its official checkpoint)."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return lambda k: k in trainable or k.startswith("decoder.")


def build_backbone(backbone_name: str) -> Backbone:
    """A randomly initialised encoder for a weights-registry name (its family and variant come from there)."""
    info = weights.backbone_info(backbone_name)
    if info.family not in FAMILIES:
        raise ValueError(
            f"FILF cannot use the {info.family} backbone {backbone_name!r}; it needs {', '.join(FAMILIES)}"
        )
    return FAMILIES[info.family].build(info.variant)


def build_filf(
    backbone_name: str,
    rank: int = 8,
    alpha: float = 1.0,
    backbone_state: Mapping[str, torch.Tensor] | None = None,
    **options: Any,
) -> FILF:
    """FILF on the named backbone. Without `backbone_state` the encoder is randomly initialised; with it (an
    official checkpoint, e.g. from `read_checkpoint`) the family's `load_official` loads it before the LoRA
    wrapping renames the qkv projections. `options`: FILF's mode, num_seg and encoder_scale."""
    backbone = build_backbone(backbone_name)
    if backbone_state is not None:
        FAMILIES[weights.backbone_info(backbone_name).family].load_official(backbone, backbone_state)
    return FILF(backbone, rank, alpha, **options)
