"""SpectralX's two recipes on the shared training loop (methods.md §2.3).

Both use the paper's AdamW (betas 0.9/0.95, weight decay 1e-4) at a constant learning rate, patches of the
ViT's pretraining size (224 on ViT-L) with flips and 90° turns, and a validation part held out by area.
* Stage 1, "adapt": masked reconstruction of unlabelled imagery; the best epoch has the lowest validation loss
  (the paper's ReduceLROnPlateau is left out: a few hundred steps on one scene).
* Stage 2, "segment": cross-entropy with class 0 (unlabelled) ignored; the best epoch by validation mIoU,
  scored as methods.md §2.4 (class 0 and classes absent from the validation part left out).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from backend.io.rasterize import IGNORE
from backend.metrics.landcover import landcover_scores
from backend.metrics.segmentation import ConfusionMatrix
from backend.models.peft.checkpointing import wants_checkpointing
from backend.protocol import INVALID_INPUT, JobError
from backend.training import ddp
from backend.training.areas import (
    TrainingArea,
    can_split_by_area,
    grow_to_patches,
    split_by_area,
    train_val_parts,
    val_patches,
)
from backend.training.loop import Recipe, Stage, loop_settings
from backend.training.normalize import normalizer
from backend.training.samplers import GridPatchSampler, LabelledPatchSampler

SEED = 0
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 1e-4


def adamw(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)


def scores_on(
    model: nn.Module, patches: list[tuple[np.ndarray, ...]], normalize: Any, batch: int, device: torch.device, k: int
) -> dict[str, float]:
    """OA, mIoU and mean F1 of the validation patches (one confusion matrix over all of them)."""
    confusion = ConfusionMatrix(k)
    for i in range(0, len(patches), batch):
        chunk = patches[i : i + batch]
        x = normalize(torch.from_numpy(np.stack([c[0] for c in chunk])).to(device))
        y = np.stack([c[1] for c in chunk])
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(x).float()[:, 1:].argmax(1).cpu().numpy() + 1  # class 0 is never predicted
        known = (y != IGNORE) & (y > 0)
        confusion.update(pred, np.where(known, y, 0), valid=known)
    if confusion.matrix[1:, 1:].sum() == 0:
        return {"oa": 0.0, "miou": 0.0, "mf1": 0.0}
    s = landcover_scores(confusion.matrix)
    return {"oa": s["oa"], "miou": s["miou"], "mf1": s["mf1"]}


def segment_recipe(
    model: nn.Module, area: TrainingArea, norm: dict[str, list[float]], p: dict[str, Any], device: str, k: int
) -> Recipe:
    """Stage 2 on one labelled area (`p`: landcover.finetune's parameters; k classes with class 0)."""
    if wants_checkpointing(p["checkpointing"], device):
        model.enable_activation_checkpointing()  # type: ignore[operator]
    patch = model.size  # type: ignore[attr-defined]
    train_parts, val_parts = train_val_parts([area], patch, p["val_fraction"], small="pixels")
    sampler = LabelledPatchSampler(train_parts, patch, seed=SEED)
    val = [x for part in val_parts for x in val_patches(part, patch)]
    if not val:
        raise JobError(
            INVALID_INPUT,
            "None of the labels is left to validate on: they all lie in one strip of the labelled area, or each "
            "class has a single labelled pixel.",
            "Draw labels across the area, and more than one pixel of each class.",
        )
    dev = torch.device(device)
    normalize = normalizer(norm, dev)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return model.segmentation_loss(normalize(x), y)  # type: ignore[operator]

    return Recipe(
        [Stage("segment", "", p["epochs"], p["lr"], optimizer=adamw)],
        sample=sampler.sample,
        loss=loss,
        validate=lambda m: scores_on(m, val, normalize, p["batch_size"], dev, k),
        metric="miou",
        describe=lambda m: f"mIoU {m['miou']:.3f}, OA {m['oa']:.3f}, mean F1 {m['mf1']:.3f}",
        device=device,
        **loop_settings(p),
        seed=SEED,
    )


def adapt_recipe(
    model: nn.Module, image: np.ndarray, norm: dict[str, list[float]], p: dict[str, Any], device: str
) -> Recipe:
    """Stage 1 on unlabelled imagery (C, H, W) (`p`: landcover.adapt's parameters)."""
    if wants_checkpointing(p["checkpointing"], device):
        model.enable_activation_checkpointing()  # type: ignore[operator]
    patch = model.size  # type: ignore[attr-defined]
    if can_split_by_area(image.shape[-2:], patch, p["val_fraction"]):
        split = split_by_area(image.shape[-2:], patch, p["val_fraction"])
        train_part, val_part = image[:, split.train[0], split.train[1]], image[:, split.val[0], split.val[1]]
    else:  # too small to hold a part back (prepare_adapt warns): validated on fixed masks of the same image
        train_part = val_part = grow_to_patches(image, patch)
    sampler = GridPatchSampler([train_part], patch, 1, SEED)
    rows = range(0, val_part.shape[1] - patch + 1, patch)
    cols = range(0, val_part.shape[2] - patch + 1, patch)
    val = [val_part[:, r : r + patch, c : c + patch] for r in rows for c in cols]
    dev = torch.device(device)
    normalize = normalizer(norm, dev)
    generator = torch.Generator().manual_seed(SEED + ddp.world()[0])  # each torchrun process masks its own patches

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return model.reconstruction_loss(normalize(batch[0]), generator)  # type: ignore[operator]

    def validate(model: nn.Module) -> dict[str, float]:
        masks = torch.Generator().manual_seed(SEED + 1)  # the same masks every epoch
        losses = []
        for i in range(0, len(val), p["batch_size"]):
            x = normalize(torch.from_numpy(np.stack(val[i : i + p["batch_size"]])).to(dev))
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                losses.append(float(model.reconstruction_loss(x, masks)) * len(x))  # type: ignore[operator]
        mean = sum(losses) / len(val)
        return {"reconstruction_loss": mean, "score": -mean}

    return Recipe(
        [Stage("adapt", "", p["epochs"], p["lr"], optimizer=adamw)],
        sample=sampler.sample,
        loss=loss,
        validate=validate,
        metric="score",
        describe=lambda m: f"reconstruction loss {m['reconstruction_loss']:.4f}",
        device=device,
        **loop_settings(p),
        seed=SEED,
    )
