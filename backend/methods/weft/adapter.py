"""The expert-guided conditional adapter (WEFT's "Module2", methods.md §1.2(b)): per interaction an injector
(deformable attention from the wavelet features into the ViT tokens, refined by ECTR, gated by a zero-initialised
γ) and an extractor (an FFN around TEW that refines the wavelet features). As in the released code, the
extractor does not attend to the ViT tokens (methods.md §1.6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backend.models.backbones.vit import drop_path

from .deform_attn import MSDeformAttn

ECTR_HEADS = 4


class ECTR(nn.Module):
    """Edge-aware cross-token refine: cosine-similarity attention over all tokens (4 heads, temperature 1, the
    un-normalised tokens as values), scaled up where a token's channel variance is high (an edge mask computed
    without gradient over the batch), added through a gate on each sample's mean. Its only weights: the 1→1 gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(1, 1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        b, n, d = a.shape
        heads = a.reshape(b, n, ECTR_HEADS, d // ECTR_HEADS).transpose(1, 2)
        unit = F.normalize(a, dim=-1).reshape(b, n, ECTR_HEADS, d // ECTR_HEADS).transpose(1, 2)
        refined = F.scaled_dot_product_attention(unit, unit, heads).transpose(1, 2).reshape(b, n, d)
        with torch.no_grad():
            v = a.var(dim=-1, keepdim=True)
            edge = torch.sigmoid((v - v.mean()) / (v.std() + 1e-6))
        refined = (1 + 0.5 * edge) * refined
        g = torch.sigmoid(self.gate(a.mean(dim=(1, 2))[:, None]))[:, :, None]
        return a + g * refined


class HierarchicalDWConv(nn.Module):
    """D_k: 4 channel groups, y0 = h(s0), y_i = h(y_{i-1} + s_i) with one depthwise k×k conv + BN + ReLU shared
    by the groups, then ReLU(BN(Conv1×1(concat(y) + x))) (the same form as a wavelet expert)."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        group = channels // 4
        self.h = nn.Sequential(
            nn.Conv2d(group, group, kernel_size, padding=kernel_size // 2, groups=group),
            nn.BatchNorm2d(group),
            nn.ReLU(inplace=True),
        )
        self.fuse = nn.Conv2d(channels, channels, 1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys: list[torch.Tensor] = []
        for s in x.chunk(4, dim=1):
            ys.append(self.h(s if not ys else ys[-1] + s))
        return F.relu(self.norm(self.fuse(torch.cat(ys, dim=1) + x)))


class TEW(nn.Module):
    """Token enhancer, weighted: on each of the three scales' maps, GELU(x + Σ w_i · branch_i(x)) with the
    branches (i) a learnable depthwise 3×3 "LoG" filter (reflect padding, every row initialised to [1, -2, 1]),
    (ii) the identity (the code's adaptive max-pool to the same size), (iii) D3 + D5 + D7. The branches are
    shared by the scales; each scale has its own softmax mixing weights, initialised equal."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log = nn.Conv2d(channels, channels, 3, groups=channels)
        with torch.no_grad():
            self.log.weight.copy_(torch.tensor([1.0, -2.0, 1.0]).repeat(channels, 1, 3, 1))
            self.log.bias.zero_()
        self.multi = nn.ModuleList(HierarchicalDWConv(channels, k) for k in (3, 5, 7))
        self.mix = nn.Parameter(torch.zeros(3, 3))  # (scale, branch)

    def forward(self, tokens: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        b, _, c = tokens.shape
        out = []
        for scale, part in enumerate(tokens.split([h * w for h, w in grids], dim=1)):
            x = part.transpose(1, 2).reshape(b, c, *grids[scale])
            w = self.mix[scale].softmax(0)
            branches = (self.log(F.pad(x, (1, 1, 1, 1), mode="reflect")), x, sum(d(x) for d in self.multi))
            y = F.gelu(x + sum(wi * br for wi, br in zip(w, branches, strict=True)))
            out.append(y.flatten(2).transpose(1, 2))
        return torch.cat(out, dim=1)


class Injector(nn.Module):
    """x ← x + γ ⊙ ECTR(MSDeformAttn(LN(x), LN(c))), γ initialised to 0: the adapter starts as an exact no-op."""

    def __init__(
        self, dim: int, heads: int, points: int = 4, value_ratio: float = 0.5, feat_dim: int | None = None
    ) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(feat_dim or dim)
        self.attn = MSDeformAttn(dim, heads, levels=3, points=points, value_ratio=value_ratio, value_dim=feat_dim)
        self.ectr = ECTR()
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(
        self, x: torch.Tensor, reference: torch.Tensor, c: torch.Tensor, grids: list[tuple[int, int]]
    ) -> torch.Tensor:
        a = self.attn(self.query_norm(x), reference, self.feat_norm(c), grids)
        return x + self.gamma * self.ectr(a)


class Extractor(nn.Module):
    """c ← c + DropPath(FFN(LN(c))), FFN = Linear(dim → dim/4), TEW, GELU, dropout, Linear(dim/4 → dim), dropout."""

    def __init__(self, dim: int, hidden_ratio: float = 0.25, drop: float = 0.0, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * hidden_ratio)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.tew = TEW(hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.drop_path_rate = drop_path_rate

    def forward(self, c: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        h = self.drop(F.gelu(self.tew(self.fc1(self.norm(c)), grids)))
        return c + drop_path(self.drop(self.fc2(h)), self.drop_path_rate, self.training)


class Interaction(nn.Module):
    """One injector (into the backbone tokens of width `dim`) and extractor (on the wavelet tokens of width
    `feat_dim`) around a group of frozen blocks; the last interaction has two extra extractors."""

    def __init__(
        self, dim: int, heads: int, feat_dim: int, extra_extractors: int = 0, drop_path_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.injector = Injector(dim, heads, feat_dim=feat_dim)
        self.extractor = Extractor(feat_dim, drop_path_rate=drop_path_rate)
        self.extra = nn.ModuleList(Extractor(feat_dim, drop_path_rate=drop_path_rate) for _ in range(extra_extractors))

    def inject(
        self, x: torch.Tensor, reference: torch.Tensor, c: torch.Tensor, grids: list[tuple[int, int]]
    ) -> torch.Tensor:
        return self.injector(x, reference, c, grids)

    def extract(self, c: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        c = self.extractor(c, grids)
        for extractor in self.extra:
            c = extractor(c, grids)
        return c
