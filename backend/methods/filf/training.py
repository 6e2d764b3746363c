"""FILF's fine-tuning recipe (methods.md §4.3) on the shared training loop.

Adam without weight decay over the trainable parameters only, BCE-with-logits on the two-channel output
against one-hot labels (IGNORE pixels excluded), validation F1/IoU of the change class after every epoch, the
best epoch by change IoU (as the official code selects), early stopping. Where the paper's recipe (lr 2.8e-4,
a cosine restarted every 2·(epochs // 3) steps, Fourier units starting at all-ones weights, plain BCE, a 0.5
threshold) learns too slowly for a few hundred CPU steps, the job's defaults depart from it, each switchable
and measured in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from backend.io.rasterize import IGNORE
from backend.metrics.change import BinaryConfusion, SemanticChangeConfusion
from backend.metrics.segmentation import THRESHOLDS
from backend.models.peft.checkpointing import wants_checkpointing
from backend.training.areas import TrainingArea, train_val_parts, val_patches
from backend.training.loop import Recipe, Stage, loop_settings
from backend.training.normalize import Normalize, normalizer
from backend.training.normalize import normalization as shared_normalization
from backend.training.samplers import LabelledPatchSampler

from .decoder import FourierUnit, SCDOutput

SEED = 32767  # the official seed


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


def _class_ce(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the pixels with a class (0 = unchanged or unknown is ignored); 0 where none has."""
    if not bool((classes > 0).any()):
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits, classes.long(), ignore_index=0)


def scd_loss(out: SCDOutput, label: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The official semantic change loss (methods.md §4.3): ½·CE(sem1) + ½·CE(sem2) over changed pixels, a
    weighted BCE of the change logit (0.25 on changed, 0.75 on unchanged pixels, each a mean) and the
    change-similarity loss (cosine embedding of the class probabilities without class 0: alike where unchanged,
    not alike where changed, margin 0). IGNORE pixels count nowhere."""
    known = label != IGNORE
    changed, unchanged = known & (label == 1), known & (label == 0)
    logit = out.change[:, 0].float()
    per_px = nn.functional.binary_cross_entropy_with_logits(logit, changed.to(logit.dtype), reduction="none")
    bce = sum(w * per_px[m].mean() for w, m in ((0.25, changed), (0.75, unchanged)) if m.any())
    semantic = 0.5 * (_class_ce(out.sem1.float(), classes[:, 0]) + _class_ce(out.sem2.float(), classes[:, 1]))
    p1, p2 = (torch.softmax(s.float(), dim=1)[:, 1:] for s in (out.sem1, out.sem2))
    cos = nn.functional.cosine_similarity(p1, p2, dim=1)
    similarity = torch.where(changed, cos.clamp(min=0), 1 - cos)[known].mean() if known.any() else cos.sum() * 0
    return bce + semantic + similarity


def semantic_maps(out: SCDOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(change probability, date-1 classes, date-2 classes), (B, H, W) each: the most likely class 1..K of each
    date (class 0 never trains, see scd_loss); a threshold on the probability says where they apply."""
    prob = torch.sigmoid(out.change[:, 0].float())
    c1, c2 = (s[:, 1:].argmax(1) + 1 for s in (out.sem1, out.sem2))
    return prob, c1, c2


def normalization(areas: list[TrainingArea], backbone: str, dtype: np.dtype) -> dict[str, list[float]]:
    """The normalisation over both dates' labelled pixels (backend/training/normalize.py)."""
    pixels = np.concatenate([x[:, a.label != IGNORE] for a in areas for x in a.images], axis=1)
    return shared_normalization(pixels, backbone, dtype)


@torch.no_grad()
def evaluate_patches(
    model: nn.Module,
    patches: list[tuple[np.ndarray, ...]],
    normalize: Normalize,
    batch_size: int,
    device: torch.device,
    num_classes: int = 0,
    choose_threshold: bool = True,
) -> dict[str, Any]:
    """Change scores on validation patches (images, label[, from/to classes]): precision, recall, F1, IoU … of
    the change class at the threshold with the best F1 (0.5 without `choose_threshold`, the paper's), which is
    reported as `threshold`; with `num_classes`, also the semantic change scores (mIoU, SeK, Fscd …)."""
    model.eval()
    thresholds = THRESHOLDS if choose_threshold else (0.5,)
    binary = {t: BinaryConfusion() for t in thresholds}
    semantic = {t: SemanticChangeConfusion(num_classes) for t in thresholds} if num_classes else {}
    for i in range(0, len(patches), batch_size):
        chunk = patches[i : i + batch_size]
        x1, x2 = (normalize(torch.from_numpy(np.stack([c[j] for c in chunk])).to(device)) for j in (0, 1))
        y = np.stack([c[2] for c in chunk])
        known = y != IGNORE
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x1, x2)
        if num_classes:
            prob, c1, c2 = (a.cpu().numpy() for a in semantic_maps(out))
            ref = np.stack([c[3] for c in chunk])
        else:
            prob = torch.sigmoid(out[:, 1].float()).cpu().numpy()
        for t in thresholds:
            changed = prob > t
            binary[t].update(changed, y == 1, valid=known)
            if num_classes:
                semantic[t].update(c1 * changed, c2 * changed, ref[:, 0], ref[:, 1], valid=known)
    # Ties go to the threshold nearest 0.5.
    best = max(thresholds, key=lambda t: (binary[t].metrics()["f1"], -abs(t - 0.5)))
    scores = binary[best].metrics() | {"threshold": best}
    if num_classes:
        scores |= {k: v for k, v in semantic[best].metrics().items() if k not in scores}
    return scores


def recipe(
    model: nn.Module,
    areas: list[TrainingArea],
    norm: dict[str, list[float]],
    p: dict[str, Any],
    device: str,
    num_classes: int = 0,
) -> Recipe:
    """FILF's recipe on labelled areas (`p`: change.finetune's parameters); one area is split by area,
    several hold whole areas out for validation. Semantic change (`num_classes` land-cover classes) trains with
    the official SCD loss and keeps the epoch with the best binary mIoU, as the official code does."""
    if wants_checkpointing(p["checkpointing"], device):
        model.enable_activation_checkpointing()  # type: ignore[operator]
    patch, epochs = p["patch_size"], p["epochs"]
    train_parts, val_parts = train_val_parts(areas, patch, p["val_fraction"])
    sampler = LabelledPatchSampler(train_parts, patch, seed=SEED)
    val = [x for part in val_parts for x in val_patches(part, patch)]
    dev = torch.device(device)
    normalize = normalizer(norm, dev)

    def loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x1, x2, y, *classes = batch
        out = model(normalize(x1), normalize(x2))
        if num_classes:
            return scd_loss(out, y, classes[0])
        return change_loss(out.float(), y, p["balance_classes"])

    if p["fourier_init"] == "kaiming":
        for unit in (m for m in model.decoder.modules() if isinstance(m, FourierUnit)):
            nn.init.kaiming_uniform_(unit.spectral.weight, a=math.sqrt(5))  # nn.Conv2d's own initialisation
    # The official code steps a CosineAnnealing(T_max = epochs // 3) every iteration, so the rate restarts
    # every 2·(epochs // 3) steps; "cosine" decays once over the whole run instead.
    t_max = max(epochs // 3, 1) if p["schedule"] == "official" else max(epochs * p["steps_per_epoch"], 1)
    stage = Stage(
        "adapter",
        "",
        epochs,
        p["lr"],
        schedule=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max),
    )

    def describe(m: dict[str, float]) -> str:
        words = f"F1 {m['f1']:.3f}, IoU {m['iou']:.3f} at threshold {m['threshold']:.2f}"
        return words + (f"; mIoU {m['miou']:.3f}, SeK {m['sek']:.3f}, Fscd {m['fscd']:.3f}" if num_classes else "")

    return Recipe(
        [stage],
        sample=sampler.sample,
        loss=loss,
        validate=lambda m: evaluate_patches(
            m, val, normalize, p["batch_size"], dev, num_classes, p["choose_threshold"]
        ),
        metric="miou" if num_classes else "iou",
        describe=describe,
        device=device,
        **loop_settings(p),
        seed=SEED,
    )
