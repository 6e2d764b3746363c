"""PanAdapter stage 1: local prior extraction (LPE) on two EDSR-baseline trunks (methods.md §3.2 (a)).

Two EDSR-baseline trunks (16 ResBlocks of 64 channels, official weights) act as pretrained CNN priors:
* the **spectral** trunk reads the LRMS M at MS scale and yields the spectral prior A (m channels, MS scale);
* the **spatial** trunk reads Q = [up-sampled LRMS, PAN] (C + 1 bands) at PAN scale and yields the spatial
  prior B (m channels, PAN scale).
Each trunk's RGB head is replaced by a new MS encoder (Conv3x3 C->64, two 5x5 ResBlocks, Conv1x1), the
band-count adapter that lets any MS band count (and the PAN) enter a 3-channel pretrained trunk. The outputs
of all ResBlocks are tapped, each passes an LPE block (Conv1x1 64->d', GELU, depthwise Conv3x3), and the
concatenation is projected by a Conv1x1 to m channels.

**Designed here, not in the released code** (its stage-1 forward raises NotImplementedError; a review page
says A and B "are fused and decoded into a preliminary output" for stage-1 supervision): `PriorDecoder`
upsamples A bilinearly to PAN scale, concatenates it with B, decodes with Conv3x3 2m->m, GELU, Conv3x3 m->C,
and adds the result to the up-sampled MS; the loss is L1 against the reference HRMS. The decoder's last
conv starts at zero, so the untrained preliminary HRMS is exactly the up-sampled MS.

What trains in stage 1 ("training only LPE modules and adapters"; the abstract's "fine-tune the pre-trained
CNN ... by the LPE module" is read as fine-tuning *through* the LPE modules): the new MS encoders, the LPE
blocks and projections, and the decoder. The official EDSR weights stay frozen unless `finetune_cnn` is set
(the other reading of the abstract). The trunks' final `body_conv` is never used: LPE taps the blocks only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backend.models.backbones import edsr
from backend.models.backbones.edsr import EDSRTrunk, ResBlock

EDSR_ALIASES = {"base": "edsr_baseline"}
OFFICIAL_PARTS = ("blocks", "body_conv")  # trunk submodules filled from the EDSR checkpoint (the head is replaced)


class MSEncoder(nn.Module):
    """The new trunk head: Conv3x3 C->n_feats, two 5x5 ResBlocks, Conv1x1 (replaces EDSR's RGB conv)."""

    def __init__(self, in_channels: int, n_feats: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            edsr.conv(in_channels, n_feats, 3),
            ResBlock(n_feats, 5, 1.0),
            ResBlock(n_feats, 5, 1.0),
            nn.Conv2d(n_feats, n_feats, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class LPEBlock(nn.Module):
    """One LPE tap: Conv1x1 n_feats->d', GELU, depthwise Conv3x3 (d')."""

    def __init__(self, n_feats: int, dim: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(n_feats, dim, 1)
        self.local = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local(F.gelu(self.reduce(x)))


class PriorBranch(nn.Module):
    """An EDSR trunk with a new MS encoder head, LPE blocks on every ResBlock, and the fusing Conv1x1."""

    def __init__(self, trunk: EDSRTrunk, in_channels: int, lpe_dim: int, prior_dim: int) -> None:
        super().__init__()
        n_feats = trunk.config.n_feats
        trunk.head = MSEncoder(in_channels, n_feats)  # official weights are loaded before this replacement
        self.trunk = trunk
        self.lpe = nn.ModuleList(LPEBlock(n_feats, lpe_dim) for _ in trunk.blocks)
        self.project = nn.Conv2d(lpe_dim * len(trunk.blocks), prior_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Run the blocks by hand: the trunk's forward would also evaluate body_conv, whose output LPE never reads.
        h = self.trunk.head(x)
        taps = []
        for block, lpe in zip(self.trunk.blocks, self.lpe, strict=True):
            h = block(h)
            taps.append(lpe(h))
        return self.project(torch.cat(taps, dim=1))


class PriorDecoder(nn.Module):
    """Stage-1 head (designed, see module docstring): fuse A (up-sampled) and B, decode a residual on ms_up."""

    def __init__(self, prior_dim: int, out_channels: int) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(2 * prior_dim, prior_dim, 3, padding=1)
        self.out = nn.Conv2d(prior_dim, out_channels, 3, padding=1)
        # Zero start: the preliminary HRMS begins as the up-sampled MS instead of up-sampled MS + noise.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, spectral: torch.Tensor, spatial: torch.Tensor, ms_up: torch.Tensor) -> torch.Tensor:
        a = F.interpolate(spectral, size=spatial.shape[-2:], mode="bilinear", align_corners=False)
        return ms_up + self.out(F.gelu(self.fuse(torch.cat([a, spatial], dim=1))))


@dataclass
class PriorOutput:
    spectral: torch.Tensor  # A: (B, m, H/r, W/r)
    spatial: torch.Tensor  # B: (B, m, H, W)
    hrms: torch.Tensor  # preliminary HRMS O1: (B, C, H, W)


class LocalPriorExtraction(nn.Module):
    """Stage 1 of PanAdapter: spectral prior A (MS scale), spatial prior B (PAN scale), preliminary HRMS O1.

    `spectral_trunk` and `spatial_trunk` are EDSR trunks already holding their official (or random) weights;
    their heads are replaced here. LPE width d' = n_feats / 4 and prior width m = n_feats by default
    (16 and 64 for EDSR-baseline, the code's dimensions).
    """

    def __init__(
        self,
        ms_bands: int,
        spectral_trunk: EDSRTrunk,
        spatial_trunk: EDSRTrunk,
        lpe_dim: int | None = None,
        prior_dim: int | None = None,
        finetune_cnn: bool = False,
    ) -> None:
        super().__init__()
        n_feats = spectral_trunk.config.n_feats
        self.ms_bands = ms_bands
        self.lpe_dim = lpe_dim or max(1, n_feats // 4)
        self.prior_dim = prior_dim or n_feats
        self.finetune_cnn = finetune_cnn
        self.spectral = PriorBranch(spectral_trunk, ms_bands, self.lpe_dim, self.prior_dim)
        self.spatial = PriorBranch(spatial_trunk, ms_bands + 1, self.lpe_dim, self.prior_dim)
        self.decoder = PriorDecoder(self.prior_dim, ms_bands)

    def priors(self, ms: torch.Tensor, ms_up: torch.Tensor, pan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): the spectral prior from M = ms and the spatial prior from Q = [ms_up, pan]."""
        return self.spectral(ms), self.spatial(torch.cat([ms_up, pan], dim=1))

    def forward(self, ms: torch.Tensor, ms_up: torch.Tensor, pan: torch.Tensor) -> PriorOutput:
        spectral, spatial = self.priors(ms, ms_up, pan)
        return PriorOutput(spectral, spatial, self.decoder(spectral, spatial, ms_up))

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Stage-1 loss (designed): L1 between the preliminary HRMS and the reference."""
        return F.l1_loss(pred, target)

    def is_official(self, name: str) -> bool:
        """Whether a parameter/buffer name (relative to this module) is an official EDSR weight slot."""
        return any(
            name.startswith(f"{b}.trunk.{part}") for b in ("spectral", "spatial") for part in ("blocks.", "body_conv.")
        )

    def stage1_trainable(self, name: str) -> bool:
        """Which parameters train in stage 1: all but the official EDSR weights (blocks too with finetune_cnn).

        `body_conv` never trains: LPE does not read it, so it would receive no gradient.
        """
        if ".trunk.body_conv." in name:
            return False
        if ".trunk.blocks." in name:
            return self.finetune_cnn
        return True

    def stage1_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if self.stage1_trainable(n))


def build_trunk(variant: str = "edsr_baseline", state: Mapping[str, torch.Tensor] | None = None) -> EDSRTrunk:
    """One EDSR trunk of a variant ("edsr_baseline"/"base" or "tiny"), with the official weights when given."""
    trunk = edsr.build(EDSR_ALIASES.get(variant, variant))
    if state is not None:
        edsr.load_official(trunk, state)
    return trunk


def build_local_prior_extraction(
    ms_bands: int,
    edsr_variant: str = "edsr_baseline",
    edsr_state: Mapping[str, torch.Tensor] | None = None,
    finetune_cnn: bool = False,
) -> LocalPriorExtraction:
    """Stage 1 on two trunks, both initialised from the same EDSR checkpoint (random without one)."""
    if ms_bands < 1:
        raise ValueError(f"ms_bands must be positive, got {ms_bands}")
    return LocalPriorExtraction(
        ms_bands,
        build_trunk(edsr_variant, edsr_state),
        build_trunk(edsr_variant, edsr_state),
        finetune_cnn=finetune_cnn,
    )
