"""Pansharpening quality indices: identities, hand-computed cases, invariances and an independent Q4."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backend.methods.pansharpening_classic import mtf_filter, upsample
from backend.metrics.pansharpening import (
    d_lambda_khan,
    d_s,
    ergas,
    full_resolution_metrics,
    psnr,
    q2n,
    reduced_resolution_metrics,
    sam,
    scc,
)


def _image(bands: int, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """Positive, spatially correlated bands that share structure, like a real MS image in digital numbers."""
    rng = np.random.default_rng(seed)
    base = np.cumsum(np.cumsum(rng.normal(size=(h, w)), axis=0), axis=1)
    base = (base - base.min()) / np.ptp(base)
    mix = rng.uniform(0.5, 1.5, size=(bands, 1, 1))
    return 200 + 800 * base * mix + rng.normal(0, 20, size=(bands, h, w))


# --- reduced resolution -------------------------------------------------------------------------------


@pytest.mark.parametrize("bands", [1, 3, 4, 5, 8])
def test_identical_images_are_perfect(bands: int) -> None:
    x = _image(bands, 70, 64)  # 70 rows: the last block row is mirror-padded
    m = reduced_resolution_metrics(x, x, 4, data_range=2047)
    assert m["q2n"] == pytest.approx(1.0, abs=1e-12)
    assert m["sam"] == pytest.approx(0.0, abs=1e-5)
    assert m["ergas"] == 0.0
    assert m["scc"] == pytest.approx(1.0, abs=1e-12)
    assert m["psnr"] == math.inf


@pytest.mark.parametrize("bands", [1, 4, 8])
def test_q2n_penalises_gain_bias_and_noise(bands: int) -> None:
    x = _image(bands)
    noise = np.random.default_rng(1).normal(0, 60, x.shape)
    for distorted in (1.2 * x, x + 80, x + noise):
        assert 0 < q2n(x, distorted) < 0.999
    # More noise, lower quality.
    assert q2n(x, x + 2 * noise) < q2n(x, x + noise)


def test_q2n_flat_blocks_are_stable() -> None:
    # 0.1 is not exact in binary: a flat block's std is rounding noise that must not be divided by.
    flat = np.full((4, 64, 64), 0.1) * np.arange(1, 5)[:, None, None]
    flat[:, :, 32:] *= 7
    assert q2n(flat, flat) == pytest.approx(1.0, abs=1e-9)
    assert q2n(flat, flat * 1.01) == pytest.approx(1.0, abs=1e-3)
    assert q2n(flat, flat[::-1]) < 0.95  # flat blocks still compare their means


def _hamilton(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    a1, b1, c1, d1 = np.moveaxis(p, -1, 0)
    a2, b2, c2, d2 = np.moveaxis(q, -1, 0)
    return np.stack(
        [
            a1 * a2 - b1 * b2 - c1 * c2 - d1 * d2,
            a1 * b2 + b1 * a2 + c1 * d2 - d1 * c2,
            a1 * c2 - b1 * d2 + c1 * a2 + d1 * b2,
            a1 * d2 + b1 * c2 - c1 * b2 + d1 * a2,
        ],
        axis=-1,
    )


def _q4_hamilton(ref: np.ndarray, fus: np.ndarray, size: int) -> float:
    """Q4 of Alparone et al. (2004) written directly with Hamilton quaternions, block by block."""
    conj = np.array([1.0, -1.0, -1.0, -1.0])
    values = []
    for r in range(0, ref.shape[1], size):
        for c in range(0, ref.shape[2], size):
            x = ref[:, r : r + size, c : c + size].reshape(4, -1).T
            y = fus[:, r : r + size, c : c + size].reshape(4, -1).T
            mean, std = x.mean(0), x.std(0, ddof=1)
            x, y = (x - mean) / std + 1, (y - mean) / std + 1
            mx, my = x.mean(0), y.mean(0)
            n = x.shape[0]
            cov = (_hamilton(x, y * conj).sum(0) - n * _hamilton(mx, my * conj)) / (n - 1)
            var_x = ((x - mx) ** 2).sum() / (n - 1)
            var_y = ((y - my) ** 2).sum() / (n - 1)
            norm_mx, norm_my = np.linalg.norm(mx), np.linalg.norm(my)
            q = 4 * np.linalg.norm(cov) * norm_mx * norm_my / ((var_x + var_y) * (norm_mx**2 + norm_my**2))
            values.append(q)
    return float(np.mean(values))


def test_q4_matches_an_independent_quaternion_implementation() -> None:
    x = _image(4, 64, 96, seed=3)
    y = 0.9 * x[[1, 0, 2, 3]] + np.random.default_rng(4).normal(0, 40, x.shape) + 30
    assert q2n(x, y) == pytest.approx(_q4_hamilton(x, y, 32), rel=1e-10)


def test_q2n_complex_case_matches_complex_arithmetic() -> None:
    """With 2 bands each pixel is a complex number: Q is the modulus of the complex UIQI."""
    x = _image(2, 32, 32, seed=5)
    y = x[::-1] * 1.1 + 5
    mean, std = x.reshape(2, -1).mean(1), x.reshape(2, -1).std(1, ddof=1)
    xn = (x.reshape(2, -1) - mean[:, None]) / std[:, None] + 1
    yn = (y.reshape(2, -1) - mean[:, None]) / std[:, None] + 1
    zx, zy = xn[0] + 1j * xn[1], yn[0] + 1j * yn[1]
    mx, my = zx.mean(), zy.mean()
    cov = ((zx - mx) * np.conj(zy - my)).mean()
    q = 4 * abs(cov) * abs(mx) * abs(my) / ((np.var(zx) + np.var(zy)) * (abs(mx) ** 2 + abs(my) ** 2))
    assert q2n(x, y) == pytest.approx(q, rel=1e-10)


def test_sam_hand_computed() -> None:
    ref = np.array([1.0, 0.0]).reshape(2, 1, 1)
    fused = np.array([1.0, 1.0]).reshape(2, 1, 1)
    assert sam(ref, fused) == pytest.approx(45.0)
    # Two pixels at 0 and 90 degrees average to 45; a zero pixel is left out.
    ref = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).reshape(2, 1, 3)
    fused = np.array([[3.0, 0.0, 1.0], [0.0, 2.0, 1.0]]).reshape(2, 1, 3)
    assert sam(ref, fused) == pytest.approx(45.0)
    # Angles ignore brightness.
    x = _image(4)
    assert sam(x, 3.7 * x) == pytest.approx(0.0, abs=1e-5)


def test_ergas_of_a_constant_offset_by_hand() -> None:
    ref = np.stack([np.full((8, 8), 100.0), np.full((8, 8), 200.0)])
    # ERGAS = 100/4 * sqrt(((10/100)^2 + (10/200)^2) / 2)
    assert ergas(ref, ref + 10, 4) == pytest.approx(25 * math.sqrt((0.01 + 0.0025) / 2))
    assert ergas(ref, ref - 10, 2) == pytest.approx(50 * math.sqrt((0.01 + 0.0025) / 2))


def test_psnr_by_hand() -> None:
    ref = np.zeros((2, 4, 4))
    fused = np.stack([np.ones((4, 4)), np.full((4, 4), 2.0)])
    expected = (10 * math.log10(255**2 / 1) + 10 * math.log10(255**2 / 4)) / 2
    assert psnr(ref, fused, 255) == pytest.approx(expected)
    assert psnr(ref, fused / 255, 1.0) == pytest.approx(expected)  # the same images on a [0, 1] scale
    with pytest.raises(ValueError, match="data range"):
        psnr(ref, fused, 0)


def test_scc_sees_gradients_only() -> None:
    x = _image(4)
    # Uncentred correlation of gradient magnitudes: blind to a gain, not to blur. (Not quite blind to an
    # offset: like the toolbox, the Sobel filter pads with zeros, so the border sees the offset as an edge.)
    assert scc(x, 2.5 * x) == pytest.approx(1.0)
    assert 0.999 > scc(x, mtf_filter(x, 0.6, 4)) > scc(x, mtf_filter(x, 0.2, 4))


def test_reduced_resolution_border_and_shape_checks() -> None:
    x = _image(3, 64, 64)
    y = x + np.random.default_rng(2).normal(0, 30, x.shape)
    cut = reduced_resolution_metrics(y, x, 4, border=8)
    assert cut["ergas"] == pytest.approx(ergas(x[:, 8:-8, 8:-8], y[:, 8:-8, 8:-8], 4))
    assert set(cut) == {"q2n", "sam", "ergas", "scc", "psnr"}
    with pytest.raises(ValueError, match="must match"):
        reduced_resolution_metrics(y[:, :32], x, 4)
    with pytest.raises(ValueError, match="whole number"):
        reduced_resolution_metrics(y, x, 2.5)
    with pytest.raises(ValueError, match="bands, height, width"):
        q2n(x[None], y[None])


# --- full resolution ----------------------------------------------------------------------------------


def _plane(bands: int, h: int, w: int) -> np.ndarray:
    rows, cols = np.mgrid[0:h, 0:w]
    return np.stack([300 + 50 * b + 2.0 * rows + 1.5 * cols for b in range(bands)]).astype(np.float64)


def test_d_lambda_vanishes_without_spectral_change() -> None:
    # A flat field: the MTF filter changes nothing and every block matches exactly.
    flat = np.full((4, 64, 64), 700.0)
    assert d_lambda_khan(flat, flat, 4, "IKONOS") == pytest.approx(0.0, abs=1e-12)
    # A plane is band-limited: the filter leaves it unchanged away from the edges, so D_lambda ~ 0.
    plane = _plane(4, 128, 128)
    assert d_lambda_khan(plane, plane, 4, "IKONOS") < 1e-3
    # Swapping bands is a spectral distortion.
    assert d_lambda_khan(plane[::-1], plane, 4, "IKONOS") > 0.05


def test_d_s_and_hqnr_by_definition() -> None:
    rng = np.random.default_rng(7)
    ms = _image(4, 32, 32, seed=8)
    pan = upsample(ms.mean(0), 4) + rng.normal(0, 15, (128, 128))
    ms_up = upsample(ms, 4)
    # Injecting the PAN itself in every band makes Q(F_b, P) = 1, so D_s = mean_b (1 - Q(MS_up_b, P_LP)).
    copies = np.repeat(pan[None], 4, axis=0)
    d_copies = d_s(copies, ms_up, pan, 4)
    assert d_s(copies, copies, pan, 4) < d_copies <= 1
    m = full_resolution_metrics(copies, ms, pan, 4, "IKONOS")
    assert m["d_s"] == pytest.approx(d_copies)
    assert m["hqnr"] == pytest.approx((1 - m["d_lambda"]) * (1 - m["d_s"]))
    # q = 2 is a power mean of the same per-band differences, so it is at least the q = 1 value.
    assert d_s(copies, ms_up, pan, 4, q=2) >= d_copies
    with pytest.raises(ValueError, match="on the PAN grid"):
        full_resolution_metrics(copies[:, :64, :64], ms, pan, 4, "IKONOS")


def test_d_s_accepts_sizes_that_are_not_a_block_multiple() -> None:
    ms = _image(4, 25, 25, seed=9)
    pan = upsample(ms.mean(0), 4)
    value = d_s(upsample(ms, 4), upsample(ms, 4), pan, 4)  # 100x100 PAN: edge blocks are partial
    assert 0 <= value < 1
