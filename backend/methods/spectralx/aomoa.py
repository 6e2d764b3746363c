"""AoMoA, the attribute-oriented mixture of adapters (methods.md §2.2b), in parallel with a frozen Linear.

For W (in → out) the input's two halves (the spatial and spectral attributes) pass one shared adapter
LN(in/2) → Linear in/2 → in/8 → LN(in/8) → MoE → Linear in/8 → out/2, whose MoE routes each token to its
top 2 of 4 experts (MLPs in/8 → in/64 → in/8) by a router of its own attribute (index 0 spatial, 1 spectral:
noisy top-2 gating after Shazeer et al., gates and noise weights zero-initialised). The halves' outputs,
concatenated and scaled per output channel (initialised to 1), are added to W·x + b. It runs in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EXPERTS = 4
TOP_K = 2
NOISE_FLOOR = 0.1  # std = softplus(x W_noise) + 0.1 while training


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class MoE(nn.Module):
    """Token-level noisy top-2 mixture of 4 experts with one router per attribute (`task` 0 or 1).

    `log_space=True` combines experts as the released code does, y = log(Σ_j g_j·exp(E_j(z))) (exact zeros
    replaced by eps), inherited from a MoE written for log-probabilities; False takes the plain weighted sum."""

    def __init__(self, dim: int, hidden: int, log_space: bool = True) -> None:
        super().__init__()
        self.experts = nn.ModuleList(Expert(dim, hidden) for _ in range(EXPERTS))
        self.w_gate = nn.Parameter(torch.zeros(2, dim, EXPERTS))
        self.w_noise = nn.Parameter(torch.zeros(2, dim, EXPERTS))
        self.log_space = log_space

    def gates(self, z: torch.Tensor, task: int) -> torch.Tensor:
        """(N, EXPERTS) weights, non-zero on each token's top 2 experts (softmax over their logits)."""
        logits = z @ self.w_gate[task]
        if self.training:
            std = F.softplus(z @ self.w_noise[task]) + NOISE_FLOOR
            logits = logits + torch.randn_like(logits) * std
        top, index = logits.topk(TOP_K, dim=-1)
        return torch.zeros_like(logits).scatter(-1, index, top.softmax(-1))

    def forward(self, z: torch.Tensor, task: int) -> torch.Tensor:
        shape = z.shape
        z = z.reshape(-1, shape[-1])
        g = self.gates(z, task)
        outs = torch.stack([e(z) for e in self.experts], dim=1)  # (N, E, dim); every expert, as the code batches
        if self.log_space:
            mixed = (g[..., None] * outs.exp()).sum(1)
            y = torch.where(mixed == 0, torch.finfo(mixed.dtype).eps, mixed).log()
        else:
            y = (g[..., None] * outs).sum(1)
        return y.reshape(shape)


class AoMoAdapter(nn.Module):
    """The shared adapter of one frozen Linear (in → out), applied to each attribute half."""

    def __init__(self, in_features: int, out_features: int, log_space: bool = True) -> None:
        super().__init__()
        half, bottleneck = in_features // 2, in_features // 8
        self.norm = nn.LayerNorm(half)
        self.down = nn.Linear(half, bottleneck, bias=False)
        self.mid_norm = nn.LayerNorm(bottleneck)
        self.moe = MoE(bottleneck, in_features // 64, log_space)
        self.up = nn.Linear(bottleneck, out_features // 2, bias=False)
        self.scale = nn.Parameter(torch.ones(out_features))
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.xavier_uniform_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halves = x.chunk(2, dim=-1)
        out = [self.up(self.moe(self.mid_norm(self.down(self.norm(h))), task)) for task, h in enumerate(halves)]
        return torch.cat(out, dim=-1) * self.scale


class AoMoALinear(nn.Module):
    """A frozen Linear with AoMoA in parallel: linear(x) + moa(x), the adapter in fp32 (autocast off)."""

    def __init__(self, linear: nn.Linear, log_space: bool = True) -> None:
        super().__init__()
        self.linear = linear
        self.moa = AoMoAdapter(linear.in_features, linear.out_features, log_space)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            delta = self.moa(x.float())
        return self.linear(x) + delta.to(x.dtype)


def attach_aomoa(blocks: nn.ModuleList, indices: tuple[int, ...], log_space: bool = True) -> None:
    """Wrap fc1 and fc2 of the MLP of each block in `indices` (the frozen Linears keep their weights)."""
    for i in indices:
        mlp = blocks[i].mlp
        mlp.fc1 = AoMoALinear(mlp.fc1, log_space)
        mlp.fc2 = AoMoALinear(mlp.fc2, log_space)
