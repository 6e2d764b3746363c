"""Run by test_ddp.py, alone or under torchrun: the one training loop on a small regression (no BatchNorm, no
dropout, so data parallelism must reproduce one process exactly), printing rank 0's history and weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from backend.context import JobContext
from backend.distributed import torchrun
from backend.training.loop import Recipe, Stage, fit


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)  # no gradient to exchange until stage 2
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.frozen(x)))

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)


def main() -> None:
    if torchrun.launched():
        torchrun.start("cpu")
    rng = np.random.default_rng(0)  # the same stream on every rank: each draws the global batch
    w = np.linspace(-1, 1, 8).astype(np.float32)

    def sample(n: int) -> tuple[np.ndarray, ...]:
        x = rng.normal(size=(n, 8)).astype(np.float32)
        return x, (np.tanh(x) @ w + 0.5)[:, None].astype(np.float32)

    model = Regression()
    val = tuple(torch.from_numpy(a) for a in sample(16))
    seen: list[int] = []  # the batch of each step of this process

    def loss(m: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        seen.append(len(batch[0]))
        return nn.functional.mse_loss(m(batch[0]), batch[1])

    def validate(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"score": -float(nn.functional.mse_loss(m(val[0]), val[1]))}

    recipe = Recipe(
        # A second stage trains another set of parameters: DistributedDataParallel is made again for it.
        [Stage("fit", "", 3, 0.05), Stage("more", "", 2, 0.01, enter=lambda: model.frozen.requires_grad_(True))],
        sample=sample,
        loss=loss,
        validate=validate,
        metric="score",
        describe=str,
        steps_per_epoch=5,
        batch_size=int(sys.argv[1]) if len(sys.argv) > 1 else 8,
        patience=5,
    )
    result = fit(model, recipe, JobContext())
    if torchrun.rank() == 0:
        weights = {k: v.flatten().tolist() for k, v in model.adapter_state_dict().items()}
        print(json.dumps({"losses": [h["loss"] for h in result.history], "weights": weights, "batches": seen}))
    torchrun.stop(succeeded=True)


if __name__ == "__main__":
    main()
