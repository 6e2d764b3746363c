"""WEFT's fine-tuning recipe on the shared training loop (methods.md §1.3, departures below).

The encoder's own normalisation for 8-bit RGB, else the labelled area's own statistics (the paper normalises
per dataset), patches sampled inside the labelled area with every other one holding an object, flips and 90°
turns plus a photometric jitter (brightness and contrast per patch, in the spirit of PhotoMetricDistortion),
validation on a held-out part of the area, the best epoch by mIoU as the official configs keep it; the head's own
loss (Mask2Former's deep-supervised set loss, or the FPN head's cross-entropy). Departures for a few hundred steps
on the analyst's labels, each a parameter: the loop's Adam at lr 2e-4 instead of AdamW at 5e-5 with layer decay,
class-balanced cross-entropy for the FPN head (objects are rare in a scene), the object threshold chosen on the
validation patches, activation checkpointing of the frozen blocks on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from backend.io.rasterize import IGNORE
from backend.metrics.segmentation import THRESHOLDS, ConfusionMatrix
from backend.models.peft.checkpointing import wants_checkpointing
from backend.training.areas import TrainingArea, train_val_parts, val_patches
from backend.training.loop import Recipe, Stage, loop_settings
from backend.training.normalize import Normalize, normalizer
from backend.training.normalize import normalization as shared_normalization
from backend.training.samplers import LabelledPatchSampler

SEED = 2024  # the official seed
WARMUP_SHARE = 0.02  # the configs' 1,500 warm-up iterations of 80,000
JITTER = 0.2  # photometric jitter: contrast × U(1 ± 0.2), brightness + U(± 0.2) in normalised units


def normalization(areas: list[TrainingArea], backbone: str | None, dtype: np.dtype) -> dict[str, list[float]]:
    """The normalisation over the labelled pixels (backend/training/normalize.py)."""
    pixels = np.concatenate([a.images[0][:, a.label != IGNORE] for a in areas], axis=1)
    return shared_normalization(pixels, backbone, dtype)


def jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-patch contrast and brightness changes of normalised images (B, C, H, W)."""
    b = x.shape[0]
    contrast = 1 + JITTER * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    brightness = JITTER * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
    return x * contrast.to(x.device) + brightness.to(x.device)


def evaluate_patches(
    model: nn.Module,
    patches: list[tuple[np.ndarray, ...]],
    normalize: Normalize,
    batch_size: int,
    device: torch.device,
    num_classes: int,
    choose_threshold: bool = True,
) -> dict[str, float]:
    """mmseg-style scores (mIoU, mDice …; object IoU/F1 for one object class) on validation patches, at the
    object-probability threshold (1 − p(background)) with the best mIoU, reported as `threshold` (0.5 without
    `choose_threshold`): the class-balanced loss leaves the model calibrated for balanced classes, so the 0.5 of
    a softmax over-segments rare objects."""
    thresholds = THRESHOLDS if choose_threshold else (0.5,)
    confusion = {t: ConfusionMatrix(num_classes) for t in thresholds}
    for i in range(0, len(patches), batch_size):
        chunk = patches[i : i + batch_size]
        x = normalize(torch.from_numpy(np.stack([c[0] for c in chunk])).to(device))
        y = np.stack([c[1] for c in chunk])
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            probs = model(x).float().softmax(1).cpu().numpy()
        obj, cls = 1 - probs[:, 0], probs[:, 1:].argmax(1) + 1
        known = y != IGNORE
        for t in thresholds:
            confusion[t].update(np.where(obj > t, cls, 0), np.where(known, y, 0), valid=known)
    # Ties go to the threshold nearest 0.5.
    best = max(thresholds, key=lambda t: (confusion[t].metrics()["miou"], -abs(t - 0.5)))
    return confusion[best].metrics() | {"threshold": best}


def poly_with_warmup(total: int) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
    """The configs' schedule: linear warm-up, then poly decay (power 1) to 0 over `total` steps."""
    warmup = max(1, round(WARMUP_SHARE * total))

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * max(0.0, 1 - step / total)

    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)


def recipe(
    model: nn.Module,
    areas: list[TrainingArea],
    norm: dict[str, list[float]],
    p: dict[str, Any],
    device: str,
    num_classes: int,
) -> Recipe:
    """WEFT's recipe on labelled areas (`p`: objects.finetune's parameters)."""
    if wants_checkpointing(p["checkpointing"], device):
        model.enable_activation_checkpointing()  # type: ignore[operator]
    patch = p["patch_size"]
    train_parts, val_parts = train_val_parts(areas, patch, p["val_fraction"])
    sampler = LabelledPatchSampler(train_parts, patch, seed=SEED)
    val = [x for part in val_parts for x in val_patches(part, patch)]
    dev = torch.device(device)
    normalize = normalizer(norm, dev)
    generator = torch.Generator().manual_seed(SEED)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return model.loss(jitter(normalize(x), generator), y, p["balance_classes"])

    def describe(m: dict[str, Any]) -> str:
        words = f"mIoU {m['miou']:.3f}"
        words += f", object IoU {m['iou']:.3f}, F1 {m['f1']:.3f}" if "iou" in m else ""
        return words + f" at threshold {m['threshold']:.2f}"

    stage = Stage("adapter", "", p["epochs"], p["lr"], schedule=poly_with_warmup(p["epochs"] * p["steps_per_epoch"]))
    return Recipe(
        [stage],
        sample=sampler.sample,
        loss=loss,
        validate=lambda m: evaluate_patches(
            m, val, normalize, p["batch_size"], dev, num_classes, p["choose_threshold"]
        ),
        metric="miou",
        describe=describe,
        device=device,
        **loop_settings(p),
        seed=SEED,
    )
