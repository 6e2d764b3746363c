"""Semantic segmentation scores from a confusion matrix accumulated over a whole dataset (methods.md §6):
per-class IoU, Dice, F-score (β = 1), precision and recall, their unweighted means over classes (mmseg's mIoU,
mDice, mFscore), and overall accuracy. For a binary mask the classes are {background, foreground}; the
foreground-only terms are those of class 1."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Probability thresholds a fine-tune tries on its validation patches; the best is kept in the adapter.
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.05, 1.0, 0.05))


@dataclass
class ConfusionMatrix:
    """Rows: reference class, columns: predicted class; classes 0 … num_classes - 1."""

    num_classes: int
    matrix: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add pixels: predicted and reference class numbers of the same shape; `valid` selects the scored ones."""
        p, r = np.asarray(pred).ravel(), np.asarray(ref).ravel()
        if valid is not None:
            keep = np.asarray(valid).ravel()
            p, r = p[keep], r[keep]
        k = self.num_classes
        if p.size and (p.max() >= k or r.max() >= k or p.min() < 0 or r.min() < 0):
            raise ValueError(f"class numbers must lie in 0 … {k - 1}")
        self.matrix += np.bincount(r.astype(np.int64) * k + p.astype(np.int64), minlength=k * k).reshape(k, k)

    def per_class(self) -> dict[str, np.ndarray]:
        tp = np.diag(self.matrix).astype(np.float64)
        ref, pred = self.matrix.sum(1), self.matrix.sum(0)
        fp, fn = pred - tp, ref - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
            recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
            return {
                "iou": np.where(tp + fp + fn > 0, tp / (tp + fp + fn), 0.0),
                "dice": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
                "precision": precision,
                "recall": recall,
                "fscore": np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0),
            }

    def metrics(self) -> dict[str, float]:
        """Means over classes (mIoU, mDice, mFscore), overall accuracy, and per-class IoU as `iou_<k>`.

        With two classes, also the foreground terms (class 1): iou, f1, precision, recall."""
        per = self.per_class()
        total = self.matrix.sum()
        out = {
            "miou": float(per["iou"].mean()),
            "mdice": float(per["dice"].mean()),
            "mfscore": float(per["fscore"].mean()),
            "oa": float(np.trace(self.matrix) / total) if total else 0.0,
        }
        out |= {f"iou_{k}": float(v) for k, v in enumerate(per["iou"])}
        if self.num_classes == 2:
            out |= {
                "iou": float(per["iou"][1]),
                "f1": float(per["fscore"][1]),
                "precision": float(per["precision"][1]),
                "recall": float(per["recall"][1]),
            }
        return out
