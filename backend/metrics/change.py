"""Change detection metrics from dataset-level confusion matrices: binary and semantic (methods.md §6)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Fewer scored pixels than this (a 10 × 10 patch), out of a larger result, give scores that mean nothing.
MIN_SCORED_PIXELS = 100


def too_few_scored(scored: int, total: int) -> str:
    """A plain sentence when `scored` of `total` result pixels are too few to score, else "".

    A small result scored whole (a hand-made test raster) is fine; a few pixels of a large one are not.
    """
    if scored >= MIN_SCORED_PIXELS or scored * 2 >= total:
        return ""
    return (
        f"Only {scored} of the result's {total} pixels lie in both the result and the reference "
        f"(at least {MIN_SCORED_PIXELS} are needed for meaningful scores)"
    )


@dataclass
class BinaryConfusion:
    """Counts accumulated over many windows; metrics are computed once over the whole set."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def update(self, pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None) -> None:
        p, r = pred.astype(bool), ref.astype(bool)
        if valid is not None:
            p, r = p[valid], r[valid]
        self.tp += int(np.count_nonzero(p & r))
        self.fp += int(np.count_nonzero(p & ~r))
        self.fn += int(np.count_nonzero(~p & r))
        self.tn += int(np.count_nonzero(~p & ~r))

    def metrics(self) -> dict[str, float]:
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        n = tp + fp + fn + tn
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        iou = tp / (tp + fp + fn) if tp + fp + fn else 0.0
        oa = (tp + tn) / n if n else 0.0
        # Cohen's kappa: agreement beyond chance.
        pe = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (n * n) if n else 0.0
        kappa = (oa - pe) / (1 - pe) if pe < 1 else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "iou": iou, "oa": oa, "kappa": kappa}


def _kappa(h: np.ndarray) -> float:
    """Cohen's kappa of a confusion matrix; 0 where it is undefined (empty, or chance agreement is total)."""
    n = h.sum()
    if n == 0:
        return 0.0
    po = np.trace(h) / n
    pe = float(h.sum(axis=1) @ h.sum(axis=0)) / (n * n)
    return float((po - pe) / (1 - pe)) if pe < 1 else 0.0


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


class SemanticChangeConfusion:
    """Semantic change confusion matrix H over both dates (methods.md §6, SECOND conventions).

    H is (K+1)x(K+1) with rows = reference class and columns = predicted class; class 0 is
    "no change" and 1..K are the land-cover classes of changed pixels. Every scored pixel adds
    one count per date. Undefined ratios (nothing to divide by) are reported as 0.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError("There must be at least one land-cover class.")
        self.num_classes = num_classes
        self.hist = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)

    def update(
        self,
        pred1: np.ndarray,
        pred2: np.ndarray,
        ref1: np.ndarray,
        ref2: np.ndarray,
        valid: np.ndarray | None = None,
    ) -> None:
        """Add one window: per-date class maps (0 = unchanged) of the prediction and the reference."""
        shape = np.shape(pred1)
        if any(np.shape(a) != shape for a in (pred2, ref1, ref2)):
            raise ValueError("The prediction and reference class maps must have the same size.")
        n = self.num_classes + 1
        counts = np.zeros(n * n, dtype=np.int64)
        for pred, ref in ((pred1, ref1), (pred2, ref2)):
            p, r = np.asarray(pred), np.asarray(ref)
            if valid is not None:
                p, r = p[valid], r[valid]
            p, r = p.astype(np.int64).ravel(), r.astype(np.int64).ravel()
            for what, a in (("prediction", p), ("reference", r)):
                if a.size and (a.min() < 0 or a.max() >= n):
                    bad = int(a.min()) if a.min() < 0 else int(a.max())
                    raise ValueError(
                        f"The {what} holds class {bad}, but classes must be 0 (no change) to {self.num_classes}."
                    )
            counts += np.bincount(r * n + p, minlength=n * n)
        self.hist += counts.reshape(n, n)

    def metrics(self) -> dict[str, float]:
        h = self.hist
        total = int(h.sum())
        rows, cols = h.sum(axis=1), h.sum(axis=0)
        # 2x2 collapse: no change vs change (any class >= 1).
        nochange = int(h[0, 0])
        ref_changed, pred_changed = total - int(rows[0]), total - int(cols[0])
        both_changed = int(h[1:, 1:].sum())
        unions = (int(rows[0] + cols[0]) - nochange, ref_changed + pred_changed - both_changed)
        iou_nochange, iou_change = _ratio(nochange, unions[0]), _ratio(both_changed, unions[1])
        # The binary mIoU averages the classes present in the reference or the prediction.
        present = [iou for iou, u in zip((iou_nochange, iou_change), unions, strict=True) if u]
        miou = sum(present) / len(present) if present else 0.0
        h_n0 = h.copy()
        h_n0[0, 0] = 0
        sek = _kappa(h_n0) * math.exp(iou_change - 1.0)
        sc_tp = int(np.trace(h)) - nochange
        p_sc, r_sc = _ratio(sc_tp, pred_changed), _ratio(sc_tp, ref_changed)
        out = {
            "miou": miou,
            "sek": sek,
            "fscd": _ratio(2 * p_sc * r_sc, p_sc + r_sc),
            "oa": _ratio(int(np.trace(h)), total),
            "kappa": _kappa(h),
            "iou_nochange": iou_nochange,
            "iou_change": iou_change,
            "precision_sc": p_sc,
            "recall_sc": r_sc,
        }
        for c in range(1, self.num_classes + 1):
            out[f"iou_class_{c}"] = _ratio(int(h[c, c]), int(rows[c] + cols[c] - h[c, c]))
        return out
