"""Stage 1 of SpectralX, spectral modality adaptation (methods.md §2.3): masked reconstruction of the analyst's
unlabelled target imagery, after Scale-MAE's objective.

75 % of the patch tokens are masked; the encoder sees the rest; a light decoder (3 blocks, half the ViT's width,
Scale-MAE's GSD-aware positions) fills in mask tokens; two heads predict each patch's low-frequency part (the
image blurred by a ×4 down- and up-sampling) and its high-frequency rest (the Laplacian split of Scale-MAE's
`fcn_low`/`fcn_high`), each target normalised per patch (norm_pix_loss); the loss counts masked patches only.
Departures, since Scale-MAE's pretrained decoder is not loaded here: the decoder trains, and it reconstructs
at the input's resolution (Scale-MAE's targets are up-sampled to 448 for its super-resolution pretext).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backend.models.backbones.vit import Block, sincos_positions_with_resolution

DEPTH = 3
MASK_RATIO = 0.75
BLUR = 4  # the low-frequency target: down-sampled by 4, then up again


def random_keep(b: int, n: int, ratio: float, device: torch.device, generator: torch.Generator | None = None):
    """Per sample, the sorted indices of the n·(1 − ratio) kept tokens (B, keep) and a mask (B, n), 1 = masked."""
    keep = max(1, round(n * (1 - ratio)))
    noise = torch.rand(b, n, generator=generator, device="cpu").to(device)
    index = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    mask = torch.ones(b, n, device=device)
    mask.scatter_(1, index, 0.0)
    return index, mask


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, n, patch²·C), row-major over the patch grid."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def laplacian_targets(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The low- and high-frequency targets of x (B, C, H, W), patchified and normalised per patch."""
    low = F.interpolate(F.avg_pool2d(x, BLUR), size=x.shape[-2:], mode="bilinear", align_corners=False)
    out = []
    for part in (low, x - low):
        t = patchify(part, patch)
        out.append((t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt())
    return out[0], out[1]


class MaskedReconstruction(nn.Module):
    """The stage-1 decoder and heads: encoder tokens of the kept patches (B, 1 + keep, D) -> the low- and
    high-frequency predictions of every patch (B, n, patch²·C)."""

    def __init__(self, dim: int, bands: int, patch: int, grid: int, input_res: float) -> None:
        super().__init__()
        width = dim // 2
        self.grid, self.input_res = grid, input_res
        self.embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.blocks = nn.ModuleList(
            Block(width, max(1, width // 32), 4.0, 1e-6, layer_scale=False, drop_path_rate=0.0) for _ in range(DEPTH)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.fcn_low = nn.Linear(width, patch * patch * bands)
        self.fcn_high = nn.Linear(width, patch * patch * bands)

    def forward(self, latent: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(latent)
        b, n = x.shape[0], self.grid * self.grid
        full = self.mask_token.expand(b, n, -1).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, x.shape[-1]), x[:, 1:])
        res = torch.tensor(self.input_res, device=x.device)
        full = full + sincos_positions_with_resolution(x.shape[-1], (self.grid, self.grid), res).to(x.dtype)
        h = torch.cat([x[:, :1], full], dim=1)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)[:, 1:]
        return self.fcn_low(h), self.fcn_high(h)


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches only (mask (B, n), 1 = masked)."""
    per_patch = ((pred.float() - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1)
