"""PanAdapter (Wu et al., AAAI 2025): two-stage fine-tuning of a frozen image-restoration ViT (the IPT body)
with spatial-spectral priors for pansharpening (methods.md §3).

Stage "prior" (stage 1) trains `LocalPriorExtraction` (see prior.py) to a preliminary HRMS. Stage "adapter"
(stage 2) freezes it and trains, on the frozen IPT body, six cascaded `PanAdapterLayer`s (CTF + CTI with
zero-initialised gates, adapters.py), the prior-token projections and the output tail:

  Q = [ms_up, pan] -> stem (SE, Conv3x3, two 5x5 ResBlocks, Conv4x4 stride 4) -> IPT tokens X (d = 576);
  spectral prior A (MS scale) and spatial prior B (PAN scale) -> tokens of width k = 96 aligned with X
  (B cut into 4x4 patches -> Linear 1024->k; A, at ratio 4 already on the token grid, -> Linear 64->k);
  one adapter after every 4th of the 24 encoder+decoder blocks (blocks 3, 7, ..., 23), the priors cascading;
  tail: [final prior maps, ViT output map, (x, y)] bilinearly up-sampled to PAN scale -> SIREN-style
  Conv1x1-sin-Conv1x1-sin-Conv1x1 (w0 = 1) -> residual added to the stage-1 preliminary HRMS.

Decisions where methods.md is silent or uncertain (§3.6), each configurable in `PanAdapterConfig`:
* Stem width (`stem_channels`, 64): the code's stem is 576 wide (two 5x5 ResBlocks: 33M random frozen
  weights, ~136 GMAC per 64x64 tile, 5x the IPT body). 64 is IPT's own task-head width (Conv3x3 -> 64 and
  two 5x5 ResBlocks); the Conv4x4 stride 4 then maps 64 -> 576 channels.
* Stem training (`train_stem`, False): the code keeps the random stem frozen in stage 2 and the paper
  trains "only LPE modules and adapters"; it is random, so it is saved with the adapter. True trains it.
* The SE layer pools per 64x64 PAN window (a training patch) instead of over the whole input, so a tile's
  result does not depend on the size of the scene tile it is applied to.
* ViT output (`use_vit_output`, True): the code discards it, which leaves the last adapter's injector with
  no path to the output (its gate could never move). Here the final ViT tokens, projected d->k, join the
  tail's input, so every adapter weight trains; False gives the code's prior-only tail and omits that dead
  injector.
* Residual base (`residual_base`, "prior"): the tail's output is added to the frozen stage-1 preliminary
  HRMS (itself the up-sampled MS plus a residual), and the tail's last conv starts at zero, so stage 2
  starts exactly where stage 1 ended and can only refine it; "ms_up" adds it to the up-sampled MS as the
  code does (the tail then starts at exactly the up-sampled MS).
* (x, y) in the tail are each pixel's offset from its token's centre in [-1, 1] (LIIF-style local
  coordinates), not positions in the tile, so the result does not depend on where a tile starts.
* Adapter placement: after blocks 3, 7, 11, 15, 19, 23 (t = 4 over encoder and decoder, 6 layers, as
  inferred in methods.md); the adapter after block 11 also changes the decoder's memory.
* IPT's learned positions fix its input to 16x16 tokens (a 64x64 PAN tile): larger inputs are cut into
  such windows that run through the body (and adapters) as a batch, as IPT itself chops images; every
  convolution runs on the whole image. Inputs are padded (right/bottom, reflect, replicate when too small)
  to a multiple of lcm(64, ratio) PAN pixels and the output is cropped back.
* The LRMS M for the spectral branch is `ms` when given, else the up-sampled MS resampled by 1/ratio
  (antialiased bicubic; the code bicubic-downsamples the up-sampled MS too).
* When the ratio does not make A land on the token grid (A is at PAN/ratio, tokens at PAN/4), A is cut into
  ceil(4/ratio)^2 patches (ratio 2: 2x2 -> Linear 256->k), bilinearly resampled first when that is not exact.
* Losses: L1 in stage 1 (designed), MSE in stage 2 (the code's training script).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from backend.models.backbones import edsr, ipt
from backend.models.backbones.base import BackboneFeatures
from backend.models.backbones.edsr import ResBlock
from backend.models.backbones.ipt import IPTBody
from backend.models.peft.state import AdapterState

from .adapters import PanAdapterLayer
from .prior import LocalPriorExtraction, PriorOutput, build_local_prior_extraction

Stage = Literal["prior", "adapter"]
STAGES: tuple[str, ...] = ("prior", "adapter")
STEM_STRIDE = 4  # the code's Conv4x4 stride 4: PAN 64x64 -> the 16x16 map of IPT tokens

IPT_ALIASES = {"base": "ipt"}


@dataclass(frozen=True)
class PanAdapterConfig:
    ms_bands: int
    ratio: int = 4
    token_dim: int = 96  # k
    num_heads: int = 4
    adapter_interval: int = 4  # t: one adapter after every t-th IPT block
    stem_channels: int = 64
    tail_hidden: int = 576
    tail_w0: float = 1.0
    use_vit_output: bool = True
    train_stem: bool = False
    finetune_cnn: bool = False
    residual_base: Literal["prior", "ms_up"] = "prior"


# Defaults that follow the IPT variant (the tiny IPT is 32 wide with 4 blocks, for CPU tests).
VARIANT_DEFAULTS: dict[str, dict[str, int]] = {
    "ipt": {"token_dim": 96, "adapter_interval": 4, "stem_channels": 64, "tail_hidden": 576},
    "tiny": {"token_dim": 16, "adapter_interval": 2, "stem_channels": 8, "tail_hidden": 32},
}


class WindowSE(nn.Module):
    """Squeeze-and-excitation whose squeeze pools each `window` x `window` tile separately."""

    def __init__(self, channels: int, window: int, reduction: int = 4) -> None:
        super().__init__()
        self.window = window
        hidden = max(2, channels // reduction)
        self.excite = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.window
        scale = self.excite(F.avg_pool2d(x, w))
        return x * scale.repeat_interleave(w, dim=-2).repeat_interleave(w, dim=-1)


class ViTStem(nn.Module):
    """The ViT input: Q -> SE -> Conv3x3 -> two 5x5 ResBlocks -> Conv4x4 stride 4 to IPT's input channels."""

    def __init__(self, in_channels: int, channels: int, out_channels: int, window: int) -> None:
        super().__init__()
        self.se = WindowSE(in_channels, window)
        self.body = nn.Sequential(
            edsr.conv(in_channels, channels, 3),
            ResBlock(channels, 5, 1.0),
            ResBlock(channels, 5, 1.0),
            nn.Conv2d(channels, out_channels, STEM_STRIDE, stride=STEM_STRIDE),
        )

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.body(self.se(q))


class PriorTokens(nn.Module):
    """Stage-1 priors -> token maps of width k on the ViT token grid (stride `token_stride` PAN pixels)."""

    def __init__(self, prior_dim: int, dim: int, token_stride: int, ratio: int) -> None:
        super().__init__()
        self.token_stride = token_stride
        self.spectral_patch = max(1, math.ceil(token_stride / ratio))
        self.spectral = nn.Linear(prior_dim * self.spectral_patch**2, dim)
        self.spatial = nn.Linear(prior_dim * token_stride**2, dim)

    def forward(self, spectral: torch.Tensor, spatial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) -> (spatial tokens, spectral tokens), each a (N, k, H/stride, W/stride) map."""
        grid = (spatial.shape[-2] // self.token_stride, spatial.shape[-1] // self.token_stride)
        p = self.spectral_patch
        size = (grid[0] * p, grid[1] * p)
        if spectral.shape[-2:] != size:
            spectral = F.interpolate(spectral, size=size, mode="bilinear", align_corners=False)
        return (
            _linear_map(self.spatial, F.pixel_unshuffle(spatial, self.token_stride)),
            _linear_map(self.spectral, F.pixel_unshuffle(spectral, p)),
        )


class SirenTail(nn.Module):
    """Conv1x1 -> sin(w0 .) -> Conv1x1 -> sin(w0 .) -> Conv1x1, SIREN-initialised, last layer at zero."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int, w0: float = 1.0) -> None:
        super().__init__()
        self.w0 = w0
        self.first = nn.Conv2d(in_channels, hidden, 1)
        self.hidden = nn.Conv2d(hidden, hidden, 1)
        self.out = nn.Conv2d(hidden, out_channels, 1)
        with torch.no_grad():  # Sitzmann et al.'s initialisation, which keeps sin activations well spread
            self.first.weight.uniform_(-1 / in_channels, 1 / in_channels)
            bound = math.sqrt(6 / hidden) / w0
            self.hidden.weight.uniform_(-bound, bound)
        # Zero start: stage 2 begins exactly at its residual base (see the module docstring).
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sin(self.w0 * self.first(x))
        return self.out(torch.sin(self.w0 * self.hidden(x)))


@dataclass
class PanAdapterOutput:
    hrms: torch.Tensor  # (B, C, H, W), cropped to the input size
    prior: PriorOutput  # stage-1 outputs on the padded input
    vit: BackboneFeatures | None  # IPT features per window with the adapters (None in stage "prior")


class PanAdapter(AdapterState, nn.Module):
    """forward(ms_up, pan, ms=None) -> HRMS (B, C, H, W); ms_up (B, C, H, W) and pan (B, 1, H, W).

    In stage "prior" the output is stage 1's preliminary HRMS (the ViT is not run); in stage "adapter" it is
    the full model's. `set_stage` decides what trains; the official IPT and EDSR weights never do (EDSR's
    blocks do in stage 1 with `finetune_cnn`).
    """

    def __init__(self, config: PanAdapterConfig, prior: LocalPriorExtraction, vit: IPTBody) -> None:
        super().__init__()
        if config.ratio < 1:
            raise ValueError(f"ratio must be a positive integer, got {config.ratio}")
        if config.residual_base not in ("prior", "ms_up"):
            raise ValueError(f"residual_base must be 'prior' or 'ms_up', got {config.residual_base!r}")
        if prior.ms_bands != config.ms_bands:
            raise ValueError(f"the prior extractor has {prior.ms_bands} bands, the config {config.ms_bands}")
        self.config = config
        vcfg = vit.config
        self.token_stride = STEM_STRIDE * vcfg.patch_dim  # PAN pixels per ViT token
        self.window = STEM_STRIDE * vcfg.img_dim  # PAN pixels per IPT window (64 for the real IPT)
        self.prior = prior
        self.vit = vit
        self.stem = ViTStem(config.ms_bands + 1, config.stem_channels, vcfg.num_channels, self.window)
        self.tokens = PriorTokens(prior.prior_dim, config.token_dim, self.token_stride, config.ratio)
        n_blocks = len(vit.blocks)
        self.adapter_blocks = tuple(range(config.adapter_interval - 1, n_blocks, config.adapter_interval))
        if not self.adapter_blocks:
            raise ValueError(f"adapter_interval {config.adapter_interval} leaves no adapter in {n_blocks} blocks")
        last = self.adapter_blocks[-1]
        self.layers = nn.ModuleList(
            PanAdapterLayer(
                vcfg.embedding_dim,
                config.token_dim,
                config.num_heads,
                # Without the ViT output in the tail, an injection after the last adapter reaches nothing.
                inject=config.use_vit_output or i != last,
            )
            for i in self.adapter_blocks
        )
        self.vit_proj = nn.Linear(vcfg.flatten_dim, config.token_dim) if config.use_vit_output else None
        maps = 3 if config.use_vit_output else 2
        self.tail = SirenTail(maps * config.token_dim + 2, config.tail_hidden, config.ms_bands, config.tail_w0)
        self._stage: Stage = "adapter"
        self.set_stage("adapter")

    # ------------------------------------------------------------------ stages and parameters

    @property
    def stage(self) -> Stage:
        return self._stage

    @stage.setter
    def stage(self, stage: Stage) -> None:
        self.set_stage(stage)

    def set_stage(self, stage: Stage) -> None:
        """Stage "prior": stage-1 modules train; stage "adapter": adapters, prior tokens and tail train."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self._stage = stage
        for name, p in self.named_parameters():
            p.requires_grad = self.trains(name, stage)

    def trains(self, name: str, stage: Stage) -> bool:
        """Whether the parameter `name` trains in `stage`."""
        if name.startswith("vit."):
            return False
        if name.startswith("prior."):
            return stage == "prior" and self.prior.stage1_trainable(name[len("prior.") :])
        if name.startswith("stem."):
            return stage == "adapter" and self.config.train_stem
        return stage == "adapter"

    def is_official(self, name: str) -> bool:
        """Whether a parameter/buffer fills an official checkpoint slot (IPT body, EDSR trunk blocks)."""
        return name.startswith("vit.") or (name.startswith("prior.") and self.prior.is_official(name[6:]))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_keys(self) -> Callable[[str], bool]:
        """Everything not taken from the official checkpoints: stage-1 heads, LPE and decoder, the (random)
        stem, adapters, prior tokens and tail; EDSR's blocks too when `finetune_cnn` changed them.

        Without official checkpoints the frozen IPT/EDSR weights are random: rebuild with the same `seed`.
        """
        finetuned = self.config.finetune_cnn
        return lambda k: not self.is_official(k) or (finetuned and ".trunk.blocks." in k)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """L1 in stage "prior" (designed), MSE in stage "adapter" (the code's training script)."""
        return self.prior.loss(pred, target) if self._stage == "prior" else F.mse_loss(pred, target)

    # ------------------------------------------------------------------ forward

    def forward(self, ms_up: torch.Tensor, pan: torch.Tensor, ms: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(ms_up, pan, ms).hrms

    def forward_features(
        self, ms_up: torch.Tensor, pan: torch.Tensor, ms: torch.Tensor | None = None
    ) -> PanAdapterOutput:
        h, w = pan.shape[-2:]
        ms_up, pan, ms = self.prepare(ms_up, pan, ms)
        frozen_prior = not any(p.requires_grad for p in self.prior.parameters())
        with torch.no_grad() if frozen_prior else nullcontext():  # stage 2: nothing in stage 1 needs gradients
            prior = self.prior(ms, ms_up, pan)
        if self._stage == "prior":
            return PanAdapterOutput(prior.hrms[..., :h, :w], prior, None)

        batch = pan.shape[0]
        grid = (pan.shape[-2] // self.token_stride, pan.shape[-1] // self.token_stride)
        g = self.vit.config.grid
        spatial, spectral = (_map_to_tokens(m, g) for m in self.tokens(prior.spectral, prior.spatial))
        windows = _partition(self.stem(torch.cat([ms_up, pan], dim=1)), self.vit.config.img_dim)
        adapters = dict(zip(self.adapter_blocks, self.layers, strict=True))

        def inject(index: int, tokens: torch.Tensor) -> torch.Tensor:
            nonlocal spatial, spectral
            layer = adapters.get(index)
            if layer is None:
                return tokens
            tokens, spatial, spectral = layer(tokens, spatial, spectral)
            return tokens

        vit = self.vit.forward_features(windows, after_block=inject)
        maps = [spatial, spectral]
        if self.vit_proj is not None:
            p = self.vit.config.patch_dim
            maps.append(self.vit_proj(F.unfold(vit.out, p, stride=p).transpose(1, 2)))  # exact inverse of fold
        feats = torch.cat([_tokens_to_map(t, g, batch, grid) for t in maps], dim=1)
        feats = F.interpolate(feats, scale_factor=self.token_stride, mode="bilinear", align_corners=False)
        coords = _cell_coordinates(feats, self.token_stride)
        base = prior.hrms if self.config.residual_base == "prior" else ms_up
        hrms = base + self.tail(torch.cat([feats, coords], dim=1))
        return PanAdapterOutput(hrms[..., :h, :w], prior, vit)

    def prepare(
        self, ms_up: torch.Tensor, pan: torch.Tensor, ms: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Check shapes, pad to a multiple of lcm(IPT window, ratio) and derive M = ms when not given."""
        c, r = self.config.ms_bands, self.config.ratio
        if ms_up.ndim != 4 or pan.ndim != 4 or pan.shape[1] != 1 or ms_up.shape[1] != c:
            raise ValueError(
                f"expected ms_up (B, {c}, H, W) and pan (B, 1, H, W), got {tuple(ms_up.shape)} and {tuple(pan.shape)}"
            )
        if ms_up.shape[0] != pan.shape[0] or ms_up.shape[-2:] != pan.shape[-2:]:
            raise ValueError(f"ms_up {tuple(ms_up.shape)} and pan {tuple(pan.shape)} must share batch and size")
        h, w = pan.shape[-2:]
        if ms is not None and (ms.shape[:2] != ms_up.shape[:2] or (ms.shape[-2] * r, ms.shape[-1] * r) != (h, w)):
            raise ValueError(f"ms {tuple(ms.shape)} must be ms_up {tuple(ms_up.shape)} at 1/{r} scale")
        unit = math.lcm(self.window, r)
        ph, pw = -h % unit, -w % unit
        ms_up, pan = _pad(ms_up, ph, pw), _pad(pan, ph, pw)
        if ms is None:
            ms = F.interpolate(ms_up, size=(ms_up.shape[-2] // r, ms_up.shape[-1] // r), mode="bicubic", antialias=True)
        else:
            ms = _pad(ms, ph // r, pw // r)
        return ms_up, pan, ms

    def vit_input(self, ms_up: torch.Tensor, pan: torch.Tensor, ms: torch.Tensor | None = None) -> torch.Tensor:
        """The IPT windows (N, C_ipt, img_dim, img_dim) the frozen body receives, without any adapter."""
        ms_up, pan, _ = self.prepare(ms_up, pan, ms)
        return _partition(self.stem(torch.cat([ms_up, pan], dim=1)), self.vit.config.img_dim)


# ---------------------------------------------------------------------- helpers


def _pad(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"  # reflect needs pad < size
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _linear_map(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear over the channels of a (N, C, H, W) map."""
    return linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * H/size * W/size, C, size, size), windows in row-major order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // size, size, w // size, size).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c, size, size)


def _merge(x: torch.Tensor, batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `_partition`: (B * nh * nw, C, s, s) -> (B, C, H, W) with (H, W) = `grid`."""
    _, c, s, _ = x.shape
    x = x.reshape(batch, grid[0] // s, grid[1] // s, c, s, s).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, c, grid[0], grid[1])


def _map_to_tokens(x: torch.Tensor, g: int) -> torch.Tensor:
    """A token-grid map (B, k, gh, gw) -> per-window tokens (N, g*g, k), row-major like IPT's unfold."""
    return _partition(x, g).flatten(2).transpose(1, 2)


def _tokens_to_map(t: torch.Tensor, g: int, batch: int, grid: tuple[int, int]) -> torch.Tensor:
    return _merge(t.transpose(1, 2).reshape(t.shape[0], t.shape[2], g, g), batch, grid)


def _cell_coordinates(like: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, 2, H, W): each pixel's (x, y) offset from its token cell's centre, in [-1, 1]."""
    h, w = like.shape[-2:]
    offsets = (torch.arange(stride, device=like.device, dtype=like.dtype) + 0.5) * (2 / stride) - 1
    ys = offsets.repeat(h // stride).view(1, 1, h, 1).expand(like.shape[0], 1, h, w)
    xs = offsets.repeat(w // stride).view(1, 1, 1, w).expand(like.shape[0], 1, h, w)
    return torch.cat([xs, ys], dim=1)


def build_panadapter(
    ms_bands: int,
    ipt_variant: str = "base",
    edsr_variant: str = "edsr_baseline",
    ipt_state: Mapping[str, torch.Tensor] | None = None,
    edsr_state: Mapping[str, torch.Tensor] | None = None,
    ratio: int = 4,
    seed: int = 0,
    **options: object,
) -> PanAdapter:
    """PanAdapter for `ms_bands` bands at `ratio`. ipt_variant "base" (= "ipt") or "tiny"; edsr_variant
    "edsr_baseline" (= "base") or "tiny". `ipt_state` / `edsr_state` are the official checkpoints
    (`IPT_pretrain.pt`, `edsr_baseline_x2-1bc95232.pt`); without them those weights stay random, drawn from
    `seed` (the global RNG is left untouched), so the same seed rebuilds the same frozen model. `options`
    override `PanAdapterConfig` fields; defaults follow the IPT variant (VARIANT_DEFAULTS).
    """
    variant = IPT_ALIASES.get(ipt_variant, ipt_variant)
    if variant not in VARIANT_DEFAULTS:
        raise ValueError(f"unknown IPT variant {ipt_variant!r}; known: base, {', '.join(VARIANT_DEFAULTS)}")
    fields = {f.name for f in dataclasses.fields(PanAdapterConfig)}
    unknown = set(options) - fields
    if unknown:
        raise TypeError(f"unknown PanAdapter options: {', '.join(sorted(unknown))}")
    config = PanAdapterConfig(ms_bands=ms_bands, ratio=ratio, **{**VARIANT_DEFAULTS[variant], **options})  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = ipt.build(variant)
        if ipt_state is not None:
            ipt.load_official(vit, ipt_state)
        prior = build_local_prior_extraction(ms_bands, edsr_variant, edsr_state, config.finetune_cnn)
        return PanAdapter(config, prior, vit)
