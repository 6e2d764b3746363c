"""Z-PNN with the authors' real pretrained WorldView-2 weights, on a real WorldView-2 crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backend.methods.pansharpening_classic import upsample, wald_protocol
from backend.methods.zpnn import PNN, load_zpnn, zpnn_fuse
from backend.metrics.pansharpening import reduced_resolution_metrics

DATA = Path(__file__).resolve().parents[1] / "data"
WEIGHTS = DATA / "weights" / "z_pnn"
# Measured on this crop (Wald's protocol): Z-PNN Q2n 0.865, 23-tap interpolation 0.661.
Q2N_MARGIN = 0.15


@pytest.fixture(scope="module")
def model() -> PNN:
    return load_zpnn("WV2", WEIGHTS)


@pytest.fixture(scope="module")
def crop() -> tuple[np.ndarray, np.ndarray, int]:
    with np.load(DATA / "pansharpening" / "wv2_crop.npz") as z:
        return z["ms"].astype(np.float64), z["pan"].astype(np.float64), int(z["ratio"])


def test_loads_every_key_and_shape_of_the_real_weights(model: PNN) -> None:
    state = torch.load(WEIGHTS / "WV2_Z-PNN_model.tar", map_location="cpu", weights_only=True)
    mine = model.state_dict()
    assert set(state) == set(mine)
    for key, value in state.items():
        assert value.shape == mine[key].shape
        assert torch.equal(value.float(), mine[key])
    assert tuple(mine["conv1.weight"].shape) == (48, 9, 9, 9)
    assert tuple(mine["conv3.weight"].shape) == (8, 32, 5, 5)
    assert not model.training


def test_missing_weights_and_unknown_sensor(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"GE1_Z-PNN_model\.tar"):
        load_zpnn("GE1", tmp_path)
    with pytest.raises(ValueError, match="WV2, WV3, GE1"):
        load_zpnn("QB", WEIGHTS)


def test_output_on_the_pan_grid_in_input_units(model: PNN, crop: tuple[np.ndarray, np.ndarray, int]) -> None:
    ms, pan, ratio = crop
    fused = zpnn_fuse(pan[:128, :96], ms[:, :32, :24], ratio, model)
    assert fused.shape == (8, 128, 96) and fused.dtype == np.float64
    assert fused.min() >= 0
    # A residual network: the output stays close to the interpolated MS, in its (11-bit) units.
    up = upsample(ms[:, :32, :24], ratio)
    assert abs(fused.mean() - up.mean()) < 0.05 * up.mean()


def test_band_count_must_match_the_weights(model: PNN, crop: tuple[np.ndarray, np.ndarray, int]) -> None:
    ms, pan, ratio = crop
    with pytest.raises(ValueError, match="take 8 MS bands; the MS has 4"):
        zpnn_fuse(pan, ms[:4], ratio, model)
    with pytest.raises(ValueError, match="needs it x4"):
        zpnn_fuse(pan[:-4], ms, ratio, model)


def test_reduced_resolution_q2n_clearly_above_interpolation(
    model: PNN, crop: tuple[np.ndarray, np.ndarray, int]
) -> None:
    ms, pan, ratio = crop
    ms_lr, pan_lr = wald_protocol(ms, pan, ratio, "WV2")
    q_interp = reduced_resolution_metrics(upsample(ms_lr, ratio), ms, ratio)["q2n"]
    q_zpnn = reduced_resolution_metrics(zpnn_fuse(pan_lr, ms_lr, ratio, model), ms, ratio)["q2n"]
    assert q_zpnn > q_interp + Q2N_MARGIN


def test_target_adaptation_runs_on_a_copy(model: PNN, crop: tuple[np.ndarray, np.ndarray, int]) -> None:
    ms, pan, ratio = crop
    ms_lr, pan_lr = wald_protocol(ms, pan, ratio, "WV2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = zpnn_fuse(pan_lr, ms_lr, ratio, model, adapt_iterations=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fused.shape == (8, 64, 64)
    q_interp = reduced_resolution_metrics(upsample(ms_lr, ratio), ms, ratio)["q2n"]
    assert reduced_resolution_metrics(fused, ms, ratio)["q2n"] > q_interp + Q2N_MARGIN
