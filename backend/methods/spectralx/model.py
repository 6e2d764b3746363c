"""The SpectralX model (methods.md §2): HyperT in place of the frozen Scale-MAE ViT's patch embedding, AoMoA on
the MLPs of four blocks, and per stage either the masked-reconstruction decoder (stage 1, "adapt") or the
Are-adapter after those blocks with MultiLevelNeck + UPerHead (stage 2, "segment")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from backend.io.rasterize import IGNORE
from backend.models.backbones.vit import ScaleMAEViT, sincos_positions_with_resolution
from backend.models.peft.checkpointing import checkpoint_blocks
from backend.models.peft.state import AdapterState

from .aomoa import attach_aomoa
from .are import AttributeRefinedAdapter
from .decoder import UPerNet
from .hypert import HyperTokenizer
from .reconstruction import MASK_RATIO, MaskedReconstruction, laplacian_targets, masked_loss, random_keep

Stage = Literal["adapt", "segment"]
STAGES: tuple[Stage, ...] = ("adapt", "segment")
# HyperT's core is frozen at its random initialisation (as released): drawn from this seed, it is the same every
# time the model is built, so adapters need not store it (only its BatchNorm statistics, which do change).
HYPERT_SEED = 1234


def adapted_blocks(depth: int) -> tuple[int, ...]:
    """The blocks after each quarter of the ViT: 5, 11, 17, 23 of ViT-L's 24 (`adp_indices`)."""
    return tuple(depth // 4 * (k + 1) - 1 for k in range(4))


class SpectralX(AdapterState, nn.Module):
    """Stage "segment": forward(x (B, C, S, S) normalised bands) -> logits (B, num_classes, S, S), S the ViT's
    pretraining size (224). Stage "adapt": `loss(x)` is the masked-reconstruction loss.

    `wavelengths` (nm) are those of the C input bands. `hypert_trainable` trains HyperT's core (the paper's
    figure) instead of keeping it frozen (the released code); `log_space` combines AoMoA's experts in log space as
    released; `compact_decoder` narrows UPerNet (see decoder.UPerNet).
    """

    def __init__(
        self,
        backbone: ScaleMAEViT,
        wavelengths: Sequence[float],
        stage: Stage = "segment",
        num_classes: int = 2,
        hypert_trainable: bool = False,
        log_space: bool = True,
        mask_ratio: float = MASK_RATIO,
        compact_decoder: bool = False,
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        cfg = backbone.config
        dim, self.size, self.patch = cfg.embed_dim, cfg.pretrain_size, cfg.patch_size
        self.stage, self.hypert_trainable, self.mask_ratio = stage, hypert_trainable, mask_ratio
        self.tokens_grid = self.size // self.patch
        bands = len(wavelengths)
        self.register_buffer("wavelengths", torch.tensor(list(wavelengths), dtype=torch.float32), persistent=False)
        backbone.patch_embed = None  # HyperT replaces the pretrained RGB patch embedding
        self.backbone = backbone
        self.indices = adapted_blocks(cfg.depth)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(HYPERT_SEED)
            self.hypert = HyperTokenizer(bands, dim, self.size, cfg.input_res)
        attach_aomoa(backbone.blocks, self.indices, log_space)
        if stage == "adapt":
            self.reconstruction = MaskedReconstruction(dim, bands, self.patch, self.tokens_grid, cfg.input_res)
        else:
            self.are = AttributeRefinedAdapter(dim, self.size // 8)
            self.decoder = UPerNet(dim, num_classes, compact_decoder)
        self._norms = {
            f"backbone.{name}.{kind}"
            for name, m in backbone.named_modules()
            if isinstance(m, nn.LayerNorm)
            for kind in ("weight", "bias")
        }
        for name, p in self.named_parameters():
            p.requires_grad = self.trains(name)

    def trains(self, name: str) -> bool:
        """Whether parameter `name` trains in this model's stage (methods.md §2.1, §2.3): HyperT's low-rank
        branch and scale, every LayerNorm of the ViT and AoMoA in both; the cls token and the reconstruction
        decoder in stage 1; the Are-adapter and the decoder in stage 2."""
        if name.startswith("hypert."):
            return self.hypert_trainable or name.startswith(("hypert.low_rank.", "hypert.scale"))
        if name.startswith("backbone."):
            return ".moa." in name or name in self._norms or (self.stage == "adapt" and name == "backbone.cls_token")
        return True  # the stage's own modules

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """HyperT's tokens with the ViT's GSD-aware positions (B, n, D), and its low-level features."""
        tokens, s_spa, s_spe = self.hypert(x, self.wavelengths)
        res = torch.tensor(self.backbone.config.input_res, device=x.device)
        grid = (self.tokens_grid, self.tokens_grid)
        pos = sincos_positions_with_resolution(tokens.shape[-1], grid, res).to(tokens.dtype)
        return tokens + pos, s_spa, s_spe

    def with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.backbone.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage 2: the Are-refined tokens after each adapted block, as maps (B, D, S/16, S/16)."""
        tokens, s_spa, s_spe = self.embed(x)
        h = self.with_cls(tokens)
        feats = []
        for i, block in enumerate(self.backbone.blocks):
            h = block(h)
            if i in self.indices:
                patches = self.are(h[:, 1:], s_spa, s_spe)
                h = torch.cat([h[:, :1], patches], dim=1)
                feats.append(patches.transpose(1, 2).reshape(h.shape[0], -1, self.tokens_grid, self.tokens_grid))
            if i == self.indices[-1]:
                break  # later blocks feed nothing
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage != "segment":
            raise RuntimeError("A stage-1 SpectralX model reconstructs (loss); segment with a stage-2 adapter.")
        logits = self.decoder(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def segmentation_loss(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on labels (B, S, S); class 0 (unlabelled) and IGNORE count nothing."""
        target = torch.where(label == 0, IGNORE, label.long())
        return F.cross_entropy(self(x).float(), target, ignore_index=IGNORE)

    def reconstruction_loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Masked reconstruction of x (B, C, S, S): masked patches are zeroed in the input too, so HyperT's
        attention over the whole image cannot see them (the encoder drops their tokens, as in MAE)."""
        b, n = x.shape[0], self.tokens_grid**2
        keep, mask = random_keep(b, n, self.mask_ratio, x.device, generator)
        pixel_mask = mask.reshape(b, 1, self.tokens_grid, self.tokens_grid)
        pixel_mask = F.interpolate(pixel_mask, scale_factor=self.patch, mode="nearest")
        tokens, _, _ = self.embed(x * (1 - pixel_mask).to(x.dtype))
        h = self.with_cls(tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1])))
        for block in self.backbone.blocks:
            h = block(h)
        low, high = self.reconstruction(self.backbone.norm(h), keep)
        target_low, target_high = laplacian_targets(x.float(), self.patch)
        return masked_loss(low, target_low, mask) + masked_loss(high, target_high, mask)

    def enable_activation_checkpointing(self) -> None:
        """Recompute in the backward pass the ViT's blocks, HyperT's attribute blocks and, per stage, the
        reconstruction decoder's blocks or the Are-adapter and UPerNet's convolutions (each its own segment, so
        that one recomputation at a time is alive): backend/models/peft/checkpointing.py."""
        h = self.hypert
        modules = [*self.backbone.blocks, h.spatial_block, h.spectral_block]
        if self.stage == "adapt":
            modules += list(self.reconstruction.blocks)
        else:
            neck, head = self.decoder.neck, self.decoder.decode_head
            modules += [self.are, *neck.lateral_convs, *neck.convs, *head.psp, head.bottleneck]
            modules += [*head.lateral_convs, *head.fpn_convs, head.fpn_bottleneck]
        checkpoint_blocks(modules)

    def adapter_keys(self) -> Callable[[str], bool]:
        """What the ViT checkpoint and HYPERT_SEED do not give: the trained parameters, the cls token and every
        BatchNorm statistic (HyperT's frozen BatchNorms update their statistics in training, as released)."""
        # The cls token trains in stage 1 only, and stage 2 keeps what stage 1 made of it.
        trained = {n for n, p in self.named_parameters() if p.requires_grad} | {"backbone.cls_token"}
        return lambda k: k in trained or k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
