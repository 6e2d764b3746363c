"""The one training loop: stages of epochs of steps, validation after every epoch, the best epoch kept, early
stopping. A method gives its recipe (stages, a batch sampler, the loss, validation and the metric that picks
the best epoch); the loop owns the optimiser, autocast, progress, epoch records and the adapter snapshots.
Under torchrun the processes share each batch (ddp.py); rank 0 reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from backend.context import JobContext
from backend.training import ddp

Batch = tuple[torch.Tensor, ...]


@dataclass
class Stage:
    """A run of epochs over the parameters that train after `enter()` (requires_grad)."""

    id: str
    title: str  # for the analyst, e.g. "stage 1/2: local priors"; "" for a single-stage recipe
    epochs: int
    lr: float
    enter: Callable[[], None] = lambda: None
    # Made per stage from its optimiser and stepped after every step (None: constant learning rate).
    schedule: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None
    # The stage's optimiser over its trainable parameters at `lr` (None: Adam).
    optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer] | None = None


@dataclass
class Recipe:
    stages: list[Stage]
    sample: Callable[[int], tuple[np.ndarray, ...]]  # a batch of the given size (a sampler's `sample`)
    loss: Callable[[nn.Module, Batch], torch.Tensor]  # forward + loss (the loop autocasts it on CUDA)
    validate: Callable[[nn.Module], dict[str, float]]  # scores on the held-out part (the loop sets eval())
    metric: str  # key of `validate`'s result that picks the best epoch (higher is better)
    describe: Callable[[dict[str, float]], str]  # validation scores in words, e.g. "F1 0.512"
    steps_per_epoch: int
    batch_size: int
    patience: int
    device: str = "cpu"
    seed: int = 0
    # Later stages start from the best state so far (PanAdapter's stage 2 refines stage 1's best epoch).
    resume_best: bool = False


def loop_settings(p: dict[str, Any]) -> dict[str, Any]:
    """The loop's settings from a fine-tuning job's parameters of the same names (declared in backend.params)."""
    return {k: p[k] for k in ("steps_per_epoch", "batch_size", "patience")}


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_stage: str
    best_epoch: int
    val_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def fit(model: nn.Module, recipe: Recipe, ctx: JobContext) -> FitResult:
    """Train `model` (which has `adapter_state_dict`/`load_adapter_state`) by `recipe`; the model ends in the
    best epoch's adapter state, which the result also holds."""
    torch.manual_seed(recipe.seed + ddp.world()[0])  # under torchrun each process draws its own dropout and noise
    device = torch.device(recipe.device)
    model.to(device)
    ddp.check_batch(recipe.batch_size)
    autocast = device.type == "cuda"
    stages = [s for s in recipe.stages if s.epochs > 0]
    total = max(sum(s.epochs for s in stages), 1)
    several = len(recipe.stages) > 1
    history: list[dict[str, Any]] = []
    best: FitResult | None = None
    done = 0
    for stage in stages:
        stage.enter()
        if best is not None and recipe.resume_best:
            model.load_adapter_state(best.best_state)  # type: ignore[operator]
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = (stage.optimizer or (lambda ps, lr: torch.optim.Adam(ps, lr=lr)))(trainable, stage.lr)
        step_loss = None  # the previous stage's DistributedDataParallel goes before the next is made
        step_loss = ddp.loss_of(model, recipe.loss, device)
        schedule = stage.schedule(optimizer) if stage.schedule else None
        prefix = f"{stage.title}, " if stage.title else ""
        stale = 0
        for epoch in range(stage.epochs):
            model.train()
            losses = []
            for step in range(recipe.steps_per_epoch):
                arrays = ddp.share(recipe.sample(recipe.batch_size))  # all of it on one process
                batch = tuple(torch.from_numpy(a).to(device) for a in arrays)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = step_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                losses.append(float(loss.detach()))
                ctx.progress(
                    (done + epoch + (step + 1) / recipe.steps_per_epoch) / total,
                    stage.title or "fine-tuning",
                    f"epoch {epoch + 1}/{stage.epochs}, step {step + 1}/{recipe.steps_per_epoch}, "
                    f"loss {losses[-1]:.5g}",
                )
            model.eval()
            metrics = ddp.on_rank_0(lambda: recipe.validate(model))
            record: dict[str, Any] = {"stage": stage.id} if several else {}
            record |= {"epoch": epoch + 1, "loss": ddp.mean_over_ranks(float(np.mean(losses)), device)}
            record |= {f"val_{k}": v for k, v in metrics.items()}
            history.append(record)
            message = (
                f"{prefix}epoch {epoch + 1}/{stage.epochs}: loss {record['loss']:.5g}, "
                f"validation {recipe.describe(metrics)}"
            )
            ctx.log(message, "epoch", record)
            ctx.progress((done + epoch + 1) / total, stage.title or "fine-tuning", message, force=True)
            if best is None or metrics[recipe.metric] > best.val_metrics[recipe.metric]:
                state = {k: v.detach().cpu().clone() for k, v in model.adapter_state_dict().items()}  # type: ignore[operator]
                best = FitResult(state, stage.id, epoch + 1, metrics)
                stale = 0
            else:
                stale += 1
                if stale >= recipe.patience:
                    ctx.log(f"{prefix}early stop: no better validation {recipe.metric} for {recipe.patience} epochs")
                    break
        done += stage.epochs
    if best is None:
        raise ValueError("At least one stage needs one epoch or more.")
    model.load_adapter_state(best.best_state)  # type: ignore[operator]
    best.history = history
    return best
