"""Input normalisation of a fine-tuned model, saved in its adapter: the frozen encoder's own mean/std (from the
weights registry) for 8-bit data with its band count, else per-band statistics of the labelled pixels."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from backend import weights

Normalize = Callable[[torch.Tensor], torch.Tensor]


def normalization(pixels: np.ndarray, backbone: str | None, dtype: np.dtype) -> dict[str, list[float]]:
    """`pixels` (bands, n): the labelled pixels (of every date) the model trains on; no `backbone`: statistics."""
    spec = weights.backbone_info(backbone).input if backbone else {}
    if dtype == np.uint8 and pixels.shape[0] == len(spec.get("mean", ())):
        return {"mean": list(spec["mean"]), "std": list(spec["std"])}
    return {"mean": pixels.mean(1).tolist(), "std": np.maximum(pixels.std(1), 1e-6).tolist()}


def normalizer(norm: dict[str, list[float]], device: torch.device) -> Normalize:
    mean = torch.tensor(norm["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], device=device).view(1, -1, 1, 1)
    return lambda x: (x - mean) / std
