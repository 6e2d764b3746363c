"""FILF's fine-tuning recipe (methods.md §4.3) on the shared training loop.

Adam at 2.8e-4 without weight decay over the trainable parameters only, the official cosine schedule
(T_max = epochs // 3, stepped every iteration, so it cycles), BCE-with-logits on the two-channel output
against one-hot labels (IGNORE pixels excluded), validation F1/IoU of the change class after every epoch, the
best epoch by change IoU (as the official code selects), early stopping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from backend import weights
from backend.io.rasterize import IGNORE
from backend.metrics.change import BinaryConfusion
from backend.training.change_data import TrainingArea, train_val_parts, val_patches
from backend.training.loop import Recipe, Stage, loop_settings
from backend.training.samplers import LabelledPatchSampler

SEED = 32767  # the official seed
Normalize = Callable[[torch.Tensor], torch.Tensor]


def change_loss(logits: torch.Tensor, label: torch.Tensor, balance: bool = False) -> torch.Tensor:
    """BCE-with-logits of the (no change, change) channels against one-hot labels, IGNORE excluded.

    With `balance`, changed and unchanged pixels weigh half each however rare change is: analysts'
    labels are sparse, and plain BCE then settles on "no change" (measured: val F1 0 on LEVIR-CD).
    """
    known = label != IGNORE
    target = torch.stack([(label == 0), (label == 1)], dim=1).to(logits.dtype)
    per_px = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
    if not balance:
        return (per_px * known).sum() / known.sum().clamp(min=1)
    changed, unchanged = known & (label == 1), known & (label == 0)
    parts = [(per_px * m).sum() / m.sum() for m in (changed, unchanged) if m.any()]
    return torch.stack(parts).mean()


def normalization(areas: list[TrainingArea], backbone: str, dtype: np.dtype) -> dict[str, list[float]]:
    """The encoder's own normalisation (from the weights registry) for 8-bit data with its band count, else
    per-band statistics of the labelled areas."""
    spec = weights.backbone_info(backbone).input
    bands = areas[0].before.shape[0]
    if dtype == np.uint8 and bands == len(spec.get("mean", ())):
        return {"mean": list(spec["mean"]), "std": list(spec["std"])}
    both = np.concatenate([x[:, a.label != IGNORE] for a in areas for x in (a.before, a.after)], axis=1)
    return {"mean": both.mean(1).tolist(), "std": np.maximum(both.std(1), 1e-6).tolist()}


def normalizer(norm: dict[str, list[float]], device: torch.device) -> Normalize:
    mean = torch.tensor(norm["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], device=device).view(1, -1, 1, 1)
    return lambda x: (x - mean) / std


@torch.no_grad()
def evaluate_patches(
    model: nn.Module,
    patches: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    normalize: Normalize,
    batch_size: int,
    device: torch.device,
) -> dict[str, Any]:
    model.eval()
    confusion = BinaryConfusion()
    for i in range(0, len(patches), batch_size):
        chunk = patches[i : i + batch_size]
        x1 = normalize(torch.from_numpy(np.stack([c[0] for c in chunk])).to(device))
        x2 = normalize(torch.from_numpy(np.stack([c[1] for c in chunk])).to(device))
        y = np.stack([c[2] for c in chunk])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            prob = torch.sigmoid(model(x1, x2)[:, 1].float()).cpu().numpy()
        confusion.update(prob > 0.5, y == 1, valid=y != IGNORE)
    return confusion.metrics()


def recipe(
    model: nn.Module, areas: list[TrainingArea], norm: dict[str, list[float]], p: dict[str, Any], device: str
) -> Recipe:
    """FILF's recipe on labelled areas (`p`: change.finetune's parameters); one area is split by area,
    several hold whole areas out for validation."""
    if p["checkpointing"] == "on" or (p["checkpointing"] == "auto" and device.startswith("cuda")):
        model.enable_activation_checkpointing()  # type: ignore[operator]
    patch, epochs = p["patch_size"], p["epochs"]
    train_parts, val_parts = train_val_parts(areas, patch, p["val_fraction"])
    sampler = LabelledPatchSampler(train_parts, patch, seed=SEED)
    val = [x for part in val_parts for x in val_patches(part, patch)]
    dev = torch.device(device)
    normalize = normalizer(norm, dev)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x1, x2, y = batch
        return change_loss(model(normalize(x1), normalize(x2)).float(), y, p["balance_classes"])

    # The official code steps a CosineAnnealing(T_max = epochs // 3) every iteration: kept as is.
    stage = Stage(
        "adapter",
        "",
        epochs,
        p["lr"],
        schedule=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs // 3, 1)),
    )
    return Recipe(
        [stage],
        sample=sampler.sample,
        loss=loss,
        validate=lambda m: evaluate_patches(m, val, normalize, p["batch_size"], dev),
        metric="iou",
        describe=lambda m: f"F1 {m['f1']:.3f}, IoU {m['iou']:.3f}",
        device=device,
        **loop_settings(p),
        seed=SEED,
    )
