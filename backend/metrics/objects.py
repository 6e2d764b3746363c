"""Object-level scores: predicted and reference objects (connected regions, or labelled instances) matched one to
one at IoU ≥ 0.5; precision = matched / predicted objects, recall = matched / reference objects."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MATCH_IOU = 0.5
EIGHT = np.ones((3, 3), dtype=bool)


def instances(mask: np.ndarray) -> np.ndarray:
    """Connected regions of a boolean mask (8-connected, as GDAL polygonizes) numbered 1 … n; 0 elsewhere."""
    labels, _ = ndimage.label(mask, structure=EIGHT)
    return labels


def match(pred: np.ndarray, ref: np.ndarray, scored: np.ndarray | None = None, iou: float = MATCH_IOU) -> dict:
    """Match instance rasters (0 = none) at IoU ≥ `iou`, greedily by IoU; `scored` limits the pixels counted.

    Objects with no pixel in `scored` do not count. Returns matched, predicted and reference counts and the
    object precision, recall and F1."""
    if scored is not None:
        pred, ref = np.where(scored, pred, 0), np.where(scored, ref, 0)
    p_ids, p_area = np.unique(pred[pred > 0], return_counts=True)
    r_ids, r_area = np.unique(ref[ref > 0], return_counts=True)
    both = (pred > 0) & (ref > 0)
    pairs, inter = np.unique(np.stack([pred[both], ref[both]]), axis=1, return_counts=True)
    matched = 0
    if pairs.size:
        areas_p = dict(zip(p_ids.tolist(), p_area.tolist(), strict=True))
        areas_r = dict(zip(r_ids.tolist(), r_area.tolist(), strict=True))
        scores = [
            (n / (areas_p[p] + areas_r[r] - n), p, r)
            for (p, r), n in zip(pairs.T.tolist(), inter.tolist(), strict=True)
        ]
        used_p: set[int] = set()
        used_r: set[int] = set()
        for score, p, r in sorted(scores, reverse=True):
            if score < iou:
                break
            if p not in used_p and r not in used_r:
                used_p.add(p)
                used_r.add(r)
                matched += 1
    n_pred, n_ref = len(p_ids), len(r_ids)
    precision = matched / n_pred if n_pred else 0.0
    recall = matched / n_ref if n_ref else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "objects_matched": matched,
        "objects_predicted": n_pred,
        "objects_reference": n_ref,
        "object_precision": precision,
        "object_recall": recall,
        "object_f1": f1,
    }
