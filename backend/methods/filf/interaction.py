"""FILF's bi-temporal interaction LoRA (BIF-LoRA) with frequency-domain feature interaction (methods.md §4.2a).

The two dates go through the frozen encoder in lock-step as one batch, `torch.cat([x1, x2])`. Every fused
qkv projection then sees date-1 items in the first half of its leading dimension and the date-2 items at
the same positions in the second half (window partitioning is batch-major in both backbones). Its LoRA
update mixes the two dates, Δ = X1 A1ᵀ B1ᵀ + X2 A2ᵀ B2ᵀ, filters Δ in the frequency domain along the token
axis, and adds the same result to both dates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from backend.models.peft.lora import LinearWrapper, inject_lora


def fft_ready(x: torch.Tensor) -> torch.Tensor:
    """x in a dtype the FFT kernels take: at least float32 (none for bf16 on CPU, only power-of-two sizes in
    half precision on CUDA). Call it with autocast disabled so nothing downcasts again."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class FrequencyFeatureInteraction(nn.Module):
    """Per-channel scaling of the real and imaginary parts of the token-axis spectrum.

    (B, L, C) -> (B, L, C): orthonormal real FFT over the L tokens, real parts times `f_re`, imaginary parts
    times `f_im` (one value per channel, the same for every frequency), inverse real FFT back to L tokens.
    Both filters start at 1, where the module is the identity.
    """

    def __init__(self, dim3: int) -> None:
        super().__init__()
        self.f_re = nn.Parameter(torch.ones(dim3))
        self.f_im = nn.Parameter(torch.ones(dim3))

    def forward(self, delta: torch.Tensor) -> torch.Tensor:
        tokens = delta.shape[1]
        with torch.autocast(delta.device.type, enabled=False):
            spectrum = torch.fft.rfft(fft_ready(delta), dim=1, norm="ortho")
            filtered = torch.complex(spectrum.real * self.f_re, spectrum.imag * self.f_im)
            out = torch.fft.irfft(filtered, n=tokens, dim=1, norm="ortho")
        return out.to(delta.dtype)


class BiTemporalInteractionLoRA(LinearWrapper):
    """A frozen fused qkv projection (d -> 3d) with FILF's cross-date LoRA update.

    The input's leading dimension holds the date-1 items, then the date-2 items; any dimensions between it
    and the channels are tokens (SAM's attention feeds (B, H, W, C) windows, TinyViT's (B, N, C)). Output:
    W X_t + b + s·FFI(X1 A1ᵀ B1ᵀ + X2 A2ᵀ B2ᵀ) for t = 1, 2. B_t start at zero, so a fresh module is exactly
    the frozen projection; s starts at alpha / rank.

    Every trainable tensor is named `lora_*` so the freezing policy's "lora_" marker selects all of them.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("LoRA rank must be at least 1")
        self.base = base
        self.rank = rank
        d, out, dtype = base.in_features, base.out_features, base.weight.dtype
        self.lora_A1 = nn.Parameter(torch.empty(rank, d, dtype=dtype))
        self.lora_A2 = nn.Parameter(torch.empty(rank, d, dtype=dtype))
        self.lora_B1 = nn.Parameter(torch.zeros(out, rank, dtype=dtype))
        self.lora_B2 = nn.Parameter(torch.zeros(out, rank, dtype=dtype))
        for a in (self.lora_A1, self.lora_A2):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_ffi = FrequencyFeatureInteraction(out)
        self.lora_scale = nn.Parameter(torch.tensor((1.0 if alpha is None else alpha) / rank))

    def interaction(self, x: torch.Tensor) -> torch.Tensor:
        """s·Δ' for the stacked input x (2B, ..., d): one (B, L, 3d) update shared by both dates."""
        if x.ndim < 3 or x.shape[0] % 2:
            raise ValueError(f"expected a stacked bi-temporal batch (2B, ..., C), got shape {tuple(x.shape)}")
        x1, x2 = x.flatten(1, -2).chunk(2)
        delta = x1 @ self.lora_A1.T @ self.lora_B1.T + x2 @ self.lora_A2.T @ self.lora_B2.T
        return self.lora_scale * self.lora_ffi(delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        update = self.interaction(x).to(y.dtype).view(y.shape[0] // 2, *y.shape[1:])
        # Broadcast over a (2, B, ...) view of y: the same update for both dates.
        return (y.unflatten(0, (2, -1)) + update).flatten(0, 1)


def inject_bitemporal_lora(backbone: nn.Module, rank: int = 8, alpha: float | None = None) -> list[str]:
    """Wrap every fused `attn.qkv` projection in a BiTemporalInteractionLoRA; returns the wrapped names.

    TinyViT (MobileSAM): the 10 attention blocks of stages 2-4; SAM ViT: every block.
    """
    return inject_lora(
        backbone,
        lambda name, _: name.endswith("attn.qkv"),
        lambda _, layer: BiTemporalInteractionLoRA(layer, rank, alpha),
    )
