"""PanAdapter fine-tuning on the analyst's own PAN + MS pair by the reduced-resolution protocol (methods.md §3.3).

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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from backend.methods.panadapter import PanAdapter
from backend.methods.pansharpening_classic import upsample, wald_protocol
from backend.metrics.pansharpening import reduced_resolution_metrics

if TYPE_CHECKING:  # the jobs package imports this module
    from backend.jobs.base import JobContext

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


class PatchSampler:
    """Random patch x patch crops (positions on multiples of `unit`), with random flips and 90-degree turns."""

    def __init__(self, data: RRSet, patch: int, unit: int, seed: int) -> None:
        h, w = data.shape
        if h < patch or w < patch:
            raise ValueError(f"The training part ({w} x {h}) is smaller than one {patch} x {patch} patch.")
        self.data, self.patch = data, patch
        self.rows = np.arange(0, h - patch + 1, unit)
        self.cols = np.arange(0, w - patch + 1, unit)
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ms_up (B, C, P, P), pan (B, 1, P, P), target (B, C, P, P))."""
        p, d = self.patch, self.data
        out: list[list[np.ndarray]] = [[], [], []]
        for _ in range(batch):
            r, c = self.rng.choice(self.rows), self.rng.choice(self.cols)
            k, flip = int(self.rng.integers(4)), bool(self.rng.integers(2))
            for i, x in enumerate((d.ms_up[:, r : r + p, c : c + p], d.pan[None, r : r + p, c : c + p])):
                out[i].append(_augment(x, k, flip))
            out[2].append(_augment(d.target[:, r : r + p, c : c + p], k, flip))
        return tuple(torch.from_numpy(np.stack(x)) for x in out)  # type: ignore[return-value]


def _augment(x: np.ndarray, k: int, flip: bool) -> np.ndarray:
    x = np.rot90(x, k, axes=(1, 2))
    return np.ascontiguousarray(x[:, :, ::-1] if flip else x)


@dataclass
class PanTrainConfig:
    prior_epochs: int = 10
    adapter_epochs: int = 10
    steps_per_epoch: int = 50
    batch_size: int = 4  # the code's batch
    patch: int = 64  # PAN pixels at reduced resolution (the code's 64 x 64 PAN / 16 x 16 MS)
    lr_prior: float = 1e-3
    lr_adapter: float = 5e-4
    patience: int = 4
    device: str = "cpu"
    seed: int = 1  # the code's seed


@dataclass
class PanTrainResult:
    best_state: dict[str, torch.Tensor]
    best_stage: str
    best_epoch: int
    val_metrics: dict[str, float]
    start_metrics: dict[str, float]  # the untrained model's: exactly the interpolated MS (zero-initialised heads)
    history: list[dict[str, float | str]] = field(default_factory=list)


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


def fit_panadapter(
    model: PanAdapter,
    train: RRSet,
    val: RRSet,
    cfg: PanTrainConfig,
    ctx: JobContext,
    unit: int,
) -> PanTrainResult:
    """Stage 1 then stage 2 on random patches of `train`; the model ends in the best epoch of either stage
    (validation Q2n), which the result also holds."""
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device)
    ratio = model.config.ratio
    sampler = PatchSampler(train, cfg.patch, unit, cfg.seed)
    history: list[dict[str, float | str]] = []
    model.set_stage("prior")
    start = validate(model, val, ratio, device)
    ctx.log(f"Before training (the interpolated MS): validation Q2n {start['q2n']:.4f}, SAM {start['sam']:.3f}.")
    total = max(cfg.prior_epochs + cfg.adapter_epochs, 1)
    best: PanTrainResult | None = None
    stages = (("prior", cfg.prior_epochs, cfg.lr_prior), ("adapter", cfg.adapter_epochs, cfg.lr_adapter))
    done_epochs = 0
    for number, (stage, epochs, lr) in enumerate(stages, start=1):
        if epochs == 0:
            continue
        model.set_stage(stage)  # type: ignore[arg-type]
        title = f"stage {number}/2: {'local priors' if stage == 'prior' else 'adapters'}"
        if best is not None:
            model.load_adapter_state(best.best_state)  # stage 2 refines stage 1's best epoch
        optimizer = torch.optim.Adam(model.trainable_parameters(), lr=lr)
        stale = 0
        for epoch in range(epochs):
            on_step = functools.partial(
                _report_step, ctx, title, done_epochs + epoch, total, epoch + 1, epochs, cfg.steps_per_epoch
            )
            loss = _train_epoch(model, sampler, optimizer, cfg, device, on_step)
            metrics = validate(model, val, ratio, device)
            record: dict[str, float | str] = {"stage": stage, "epoch": epoch + 1, "loss": loss}
            record |= {f"val_{k}": v for k, v in metrics.items()}
            history.append(record)
            message = (
                f"{title}, epoch {epoch + 1}/{epochs}: loss {loss:.5f}, validation Q2n {metrics['q2n']:.4f}, "
                f"SAM {metrics['sam']:.3f}"
            )
            ctx.log(message, "epoch", record)
            ctx.progress((done_epochs + epoch + 1) / total, title, message, force=True)
            if best is None or metrics["q2n"] > best.val_metrics["q2n"]:
                state = {k: v.detach().cpu().clone() for k, v in model.adapter_state_dict().items()}
                best = PanTrainResult(state, stage, epoch + 1, metrics, start)
                stale = 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    ctx.log(f"{title}: early stop, no better validation Q2n for {cfg.patience} epochs")
                    break
        done_epochs += epochs
    if best is None:
        raise ValueError("At least one stage needs one epoch or more.")
    model.load_adapter_state(best.best_state)
    best.history = history
    return best


def _report_step(
    ctx: JobContext, title: str, at: int, total: int, epoch: int, epochs: int, steps: int, step: int, loss: float
) -> None:
    ctx.progress(
        (at + (step + 1) / steps) / total, title, f"epoch {epoch}/{epochs}, step {step + 1}/{steps}, loss {loss:.5f}"
    )


def _train_epoch(
    model: PanAdapter,
    sampler: PatchSampler,
    optimizer: torch.optim.Optimizer,
    cfg: PanTrainConfig,
    device: torch.device,
    on_step: Callable[[int, float], None],
) -> float:
    model.train()
    losses = []
    for step in range(cfg.steps_per_epoch):
        ms_up, pan, target = (x.to(device) for x in sampler.sample(cfg.batch_size))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(ms_up, pan)
        loss = model.loss(out.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        on_step(step, losses[-1])
    return float(np.mean(losses))
