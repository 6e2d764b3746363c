"""PanAdapter's fine-tuning recipe: the analyst's own PAN + MS pair by the reduced-resolution protocol
(methods.md §3.3).

Wald's protocol turns one unlabelled pair into training data: PAN and MS are degraded by the ratio with the
sensor's MTF filters, the model fuses the degraded pair, and the original MS is the reference. Stage 1 trains
the local prior extraction (L1), stage 2 the adapters on the frozen IPT body (MSE), each for its own epochs;
the best epoch of either stage by validation Q2n on a held-out strip is kept. Stage 2 starts exactly where
stage 1 ended (the zero-initialised tail), so its epoch 0 is stage 1's best and a stage 2 that never helps
changes nothing.

Departures from the code's recipe (Adam at lr 1e-5, batch 4, thousands of epochs over PanCollection): a
single scene gets a few hundred steps, so the learning rates default to 1e-3 (stage 1) and 5e-4 (stage 2) (on
the WorldView-2 test crop with the tiny test model, stage 1 at 2e-4 left validation Q2n at 0.773 after 100 steps,
interpolation's being 0.774; at 1e-3 it reached 0.864 after 120);
inputs are scaled by per-scene percentiles instead of the fixed 2047 of 11-bit data, so any dtype and bit depth
work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from backend.methods.pansharpening_classic import upsample, wald_protocol
from backend.metrics.pansharpening import reduced_resolution_metrics
from backend.training.loop import Recipe, Stage, loop_settings
from backend.training.samplers import GridPatchSampler

from .model import PanAdapter

SCALE_PERCENTILE = 99.9  # robust peak of each input: the scale that maps it to about [0, 1]
MAX_VAL_PIXELS = 512 * 512  # reduced-resolution pixels scored per validation (its centre part when larger)
VAL_KEYS = ("q2n", "sam", "ergas", "psnr")


@dataclass
class Scales:
    """One value per input: PAN and MS are divided by these (a single MS scale keeps band ratios)."""

    pan: float
    ms: float

    @classmethod
    def of(cls, pan: np.ndarray, ms: np.ndarray) -> Scales:
        return cls(_peak(pan), _peak(ms))


def _peak(x: np.ndarray) -> float:
    peak = float(np.percentile(x, SCALE_PERCENTILE))
    return peak if peak > 0 else max(float(np.abs(x).max()), 1.0)


@dataclass
class RRSet:
    """A reduced-resolution training set on one grid: inputs (degraded PAN, interpolated degraded MS), target."""

    pan: np.ndarray  # (H, W) float32, scaled
    ms_up: np.ndarray  # (C, H, W)
    target: np.ndarray  # (C, H, W): the original MS

    @property
    def shape(self) -> tuple[int, int]:
        return self.pan.shape  # type: ignore[return-value]

    def rows(self, start: int, stop: int) -> RRSet:
        return RRSet(self.pan[start:stop], self.ms_up[:, start:stop], self.target[:, start:stop])

    def cols(self, start: int, stop: int) -> RRSet:
        return RRSet(self.pan[:, start:stop], self.ms_up[:, :, start:stop], self.target[:, :, start:stop])


def reduced_resolution_set(pan: np.ndarray, ms: np.ndarray, ratio: int, sensor: str, scales: Scales) -> RRSet:
    """Wald's protocol on a full-resolution pair (PAN (H, W), MS (C, H/r, W/r), both divisible by r)."""
    ms_lr, pan_lr = wald_protocol(ms, pan, ratio, sensor)
    return RRSet(
        (pan_lr / scales.pan).astype(np.float32),
        (upsample(ms_lr, ratio) / scales.ms).astype(np.float32),
        (ms / scales.ms).astype(np.float32),
    )


def validation_size(length: int, val_fraction: float, unit: int, patch: int) -> int:
    """Pixels of the validation strip across a side of `length`: whole `unit`s, at least one patch."""
    return max(round(length * val_fraction / unit) * unit, math.ceil(patch / unit) * unit)


def split(data: RRSet, val_fraction: float, unit: int, patch: int) -> tuple[RRSet, RRSet]:
    """A strip along the longer side for validation (whole `unit`s), the rest for training; both hold a patch."""
    h, w = data.shape
    along_rows = h >= w
    length = h if along_rows else w
    val = validation_size(length, val_fraction, unit, patch)
    if length - val < patch:
        raise ValueError(
            f"The training area ({w} x {h} pixels at reduced resolution) is too small to keep a validation strip "
            f"and still cut {patch} x {patch} training patches."
        )
    cut = length - val
    if along_rows:
        return data.rows(0, cut), data.rows(cut, length)
    return data.cols(0, cut), data.cols(cut, length)


@torch.no_grad()
def predict(model: PanAdapter, ms_up: torch.Tensor, pan: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The model's HRMS (bf16 autocast on CUDA), as float32."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(ms_up.to(device), pan.to(device)).float()


def validate(model: PanAdapter, val: RRSet, ratio: int, device: torch.device) -> dict[str, float]:
    """Reduced-resolution indices of the model on (the centre of) the validation strip."""
    model.eval()
    h, w = val.shape
    if h * w > MAX_VAL_PIXELS:  # score the strip's centre: validation time stays bounded
        ch = min(h, int(math.sqrt(MAX_VAL_PIXELS)))
        cw = min(w, MAX_VAL_PIXELS // ch)
        r0, c0 = (h - ch) // 2, (w - cw) // 2
        val = val.rows(r0, r0 + ch).cols(c0, c0 + cw)
    fused = predict(model, torch.from_numpy(val.ms_up)[None], torch.from_numpy(val.pan)[None, None], device)
    m = reduced_resolution_metrics(fused[0].cpu().numpy().astype(np.float64), val.target.astype(np.float64), ratio)
    return {k: float(m[k]) for k in VAL_KEYS}


SEED = 1  # the code's seed
STAGE_NAMES = {"prior": "local priors", "adapter": "adapters"}  # stage 1 and stage 2


def recipe(model: PanAdapter, train: RRSet, val: RRSet, p: dict[str, Any], patch: int, device: str) -> Recipe:
    """Stage 1 (local priors, L1) then stage 2 (adapters on the frozen IPT, MSE) on random patches of `train`
    at positions on whole MS pixels; the best epoch of either stage by validation Q2n is kept."""
    ratio = model.config.ratio
    sampler = GridPatchSampler((train.ms_up, train.pan[None], train.target), patch, ratio, SEED)
    dev = torch.device(device)

    def loss(model: PanAdapter, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ms_up, pan, target = batch
        return model.loss(model(ms_up, pan).float(), target)

    stages = [
        Stage(stage, f"stage {i}/2: {name}", p[f"{stage}_epochs"], p[f"lr_{stage}"], partial(model.set_stage, stage))
        for i, (stage, name) in enumerate(STAGE_NAMES.items(), start=1)
    ]
    return Recipe(
        stages,
        sample=sampler.sample,
        loss=loss,  # type: ignore[arg-type]
        validate=lambda m: validate(m, val, ratio, dev),  # type: ignore[arg-type]
        metric="q2n",
        describe=lambda m: f"Q2n {m['q2n']:.4f}, SAM {m['sam']:.3f}",
        device=device,
        **loop_settings(p),
        seed=SEED,
        resume_best=True,
    )
