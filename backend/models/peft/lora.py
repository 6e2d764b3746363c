"""LoRA (Hu et al. 2021): a trainable low-rank update beside a frozen linear layer.

y = W x + b + (alpha / r) · B A dropout(x), with A Kaiming-uniform and B zero-initialised so a fresh
adapter is an exact no-op. `merge()` folds the update into W for inference; `unmerge()` undoes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

QKV = "qkv"


class LinearWrapper(nn.Module):
    """An adapter around a frozen nn.Linear `base` that stands in for it (same in/out features)."""

    base: nn.Linear

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


class _LoRABase(LinearWrapper):
    """What both LoRA layers share: the wrapped frozen `base` and folding `delta_weight()` into it."""

    merged: bool

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


class LoRALinear(_LoRABase):
    """LoRA on any nn.Linear. On a fused qkv projection this is one update for all of q, k and v
    (FILF's layout: A is r x d, B is 3d x r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("LoRA rank must be at least 1")
        self.base = base
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y if self.merged else y + self.lora_update(x)


def qkv_rows(dim: int, slice_: int, num_heads: int | None = None) -> torch.Tensor:
    """Output rows of q (0), k (1) or v (2) in a fused qkv projection of width 3 * dim.

    Layout [q | k | v] (SAM's ViT) by default; with `num_heads`, per head [q_h, k_h, v_h] (TinyViT).
    """
    if num_heads is None:
        return torch.arange(slice_ * dim, (slice_ + 1) * dim)
    hd = dim // num_heads
    return torch.cat([torch.arange(h * 3 * hd + slice_ * hd, h * 3 * hd + (slice_ + 1) * hd) for h in range(num_heads)])


class LoRAQKV(_LoRABase):
    """LoRA on a fused qkv projection (d -> 3d) with a separate low-rank update per chosen slice.

    `targets` picks the slices, e.g. "qv" as in the LoRA paper's attention recipe; `num_heads` is given
    when the projection interleaves q, k, v head by head.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        targets: str = QKV,
        num_heads: int | None = None,
    ) -> None:
        super().__init__()
        if base.out_features % 3:
            raise ValueError("a fused qkv projection has 3 x d outputs")
        if rank < 1 or not targets or set(targets) - set(QKV) or len(set(targets)) != len(targets):
            raise ValueError("rank must be >= 1 and targets a non-empty subset of 'qkv'")
        self.base = base
        self.rank = rank
        self.scaling = (alpha if alpha is not None else rank) / rank
        d = base.out_features // 3
        rows = torch.stack([qkv_rows(d, QKV.index(t), num_heads) for t in targets])
        self.register_buffer("rows", rows, persistent=False)
        n = len(targets)
        self.lora_A = nn.Parameter(torch.empty(n, rank, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(n, d, rank, dtype=base.weight.dtype))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        delta = torch.zeros_like(self.base.weight)
        for i, rows in enumerate(self.rows):
            delta[rows] = (self.lora_B[i] @ self.lora_A[i]).to(delta.dtype) * self.scaling
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = self.dropout(x)
        update = torch.zeros_like(y)
        for i, rows in enumerate(self.rows):
            update[..., rows] = ((h @ self.lora_A[i].T @ self.lora_B[i].T) * self.scaling).to(y.dtype)
        return y + update


def inject_lora(
    model: nn.Module,
    select: Callable[[str, nn.Linear], bool],
    make: Callable[[str, nn.Linear], nn.Module],
) -> list[str]:
    """Replace every nn.Linear for which select(name, layer) is true by make(name, layer); returns the names."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and select(n, m)]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, layer))
    return [n for n, _ in targets]


def lora_on_qkv(
    model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0, targets: str = QKV
) -> list[str]:
    """LoRA on every fused `attn.qkv` projection: one pair for all of q, k, v when targets == 'qkv'
    (LoRALinear, FILF's layout), else a pair per chosen slice (LoRAQKV; an attention module whose
    `qkv_heads_interleaved` is true gets the head-by-head slicing)."""

    def make(name: str, layer: nn.Linear) -> nn.Module:
        if targets == QKV:
            return LoRALinear(layer, rank, alpha, dropout)
        attn = model.get_submodule(name.rpartition(".")[0])
        heads = attn.num_heads if getattr(attn, "qkv_heads_interleaved", False) else None
        return LoRAQKV(layer, rank, alpha, dropout, targets, heads)

    return inject_lora(model, lambda n, _: n.endswith("attn.qkv"), make)
