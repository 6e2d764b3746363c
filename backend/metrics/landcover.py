"""Land-cover scores from a dataset-level confusion matrix (methods.md §6, SpectralX's `calculate_index`).

Rows are the reference, columns the prediction, classes 0 … K − 1. Class 0 (unlabelled) is dropped from both
axes; of the rest, classes without reference pixels are left out of the means and the per-class table (their
predicted pixels still count against the classes they were taken from)."""

from __future__ import annotations

from typing import Any

import numpy as np


def landcover_scores(matrix: np.ndarray, names: list[str] | None = None) -> dict[str, Any]:
    """OA, mIoU, mean F1 and κ, and per class (present in the reference) IoU, F1, producer's and user's
    accuracy; `names[k]` names class k (k ≥ 1)."""
    m = np.asarray(matrix, dtype=np.float64)[1:, 1:]
    total = m.sum()
    if total == 0:
        raise ValueError("no labelled pixel was scored")
    tp, ref, pred = np.diag(m), m.sum(1), m.sum(0)
    present = ref > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(ref + pred - tp > 0, tp / (ref + pred - tp), 0.0)
        pa = np.where(ref > 0, tp / ref, 0.0)
        ua = np.where(pred > 0, tp / pred, 0.0)
        f1 = np.where(pa + ua > 0, 2 * pa * ua / (pa + ua), 0.0)
    oa = tp.sum() / total
    expected = (ref * pred).sum() / total**2
    kappa = (oa - expected) / (1 - expected) if expected < 1 else 1.0
    per_class = [
        {
            "class": int(k + 1),
            "name": names[k + 1] if names and k + 1 < len(names) else f"class {k + 1}",
            "iou": float(iou[k]),
            "f1": float(f1[k]),
            "producer_accuracy": float(pa[k]),
            "user_accuracy": float(ua[k]),
            "reference_pixels": int(ref[k]),
        }
        for k in np.flatnonzero(present)
    ]
    return {
        "oa": float(oa),
        "miou": float(iou[present].mean()),
        "mf1": float(f1[present].mean()),
        "kappa": float(kappa),
        "classes_scored": int(present.sum()),
        "per_class": per_class,
    }
