"""Classical pansharpening: MTF filters, interpolation, baselines, and Wald's protocol on real WV2 / IKONOS crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.methods.pansharpening_classic import (
    SENSORS,
    band_gains,
    bicubic_downsample,
    brovey,
    degrade,
    gsa,
    mtf_filter,
    mtf_glp_hpm,
    mtf_kernel,
    upsample,
    wald_protocol,
)
from backend.metrics.pansharpening import full_resolution_metrics, reduced_resolution_metrics

DATA = Path(__file__).resolve().parents[1] / "data" / "pansharpening"


def _load(name: str) -> tuple[np.ndarray, np.ndarray, str, int]:
    with np.load(DATA / f"{name}.npz") as z:
        return z["ms"].astype(np.float64), z["pan"].astype(np.float64), str(z["sensor"]), int(z["ratio"])


def _response(kernel: np.ndarray, fx: float, fy: float = 0.0) -> float:
    """Frequency response of a centred 2-D kernel at (fx, fy) cycles/pixel (DTFT, evaluated directly)."""
    half = kernel.shape[0] // 2
    n = np.arange(kernel.shape[0]) - half
    phase = np.exp(-2j * np.pi * (fy * n[:, None] + fx * n[None, :]))
    return float(np.real((kernel * phase).sum()))


# --- MTF filters --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sensor", sorted(SENSORS))
@pytest.mark.parametrize("ratio", [2, 3, 4])
def test_mtf_gain_at_nyquist_matches_the_sensor(sensor: str, ratio: int) -> None:
    mtf = SENSORS[sensor]
    for gain in {*mtf.ms, mtf.pan}:
        kernel = mtf_kernel(gain, ratio)
        assert kernel.shape == (10 * ratio + 1,) * 2
        assert kernel.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(kernel, kernel.T)
        nyquist = 1 / (2 * ratio)
        # Measured two ways: the DTFT, and an FFT on a grid that holds the Nyquist frequency exactly.
        assert _response(kernel, nyquist) == pytest.approx(gain, abs=1e-3)
        assert _response(kernel, 0.0, nyquist) == pytest.approx(gain, abs=1e-3)
        n_fft = 64 * ratio
        spectrum = np.abs(np.fft.fft2(kernel, s=(n_fft, n_fft)))
        assert spectrum[0, n_fft // (2 * ratio)] == pytest.approx(gain, abs=1e-3)
        assert spectrum[0, 0] == pytest.approx(1.0)


def test_mtf_filter_scales_a_nyquist_sinusoid_by_the_gain() -> None:
    ratio = 4
    cols = np.arange(256)
    wave = 1000 + 100 * np.cos(2 * np.pi * cols / (2 * ratio))
    image = np.repeat(np.repeat(wave[None, None], 64, axis=1), 4, axis=0)
    out = mtf_filter(image, "QB", ratio)
    for b, gain in enumerate(SENSORS["QB"].ms):
        inner = out[b, 32, 40:-40]  # away from the replicated edges
        amplitude = (inner.max() - inner.min()) / 2
        assert amplitude / 100 == pytest.approx(gain, abs=1e-3)
        assert inner.mean() == pytest.approx(1000, abs=1.0)


def test_sensor_names_and_gain_errors() -> None:
    assert band_gains("WorldView-3", 8).tolist() == list(SENSORS["WV3"].ms)
    assert band_gains("quickbird", 4).tolist() == [0.34, 0.32, 0.30, 0.22]
    assert band_gains("GeoEye-1", 3).tolist() == [0.23] * 3  # one gain for all bands fits any subset
    assert band_gains(0.3, 5).tolist() == [0.3] * 5
    with pytest.raises(ValueError, match="Unknown sensor"):
        band_gains("Landsat-42", 4)
    with pytest.raises(ValueError, match="one MTF gain per band"):
        band_gains("WV2", 4)
    with pytest.raises(ValueError, match="3 MTF gains"):
        band_gains([0.3, 0.3, 0.3], 4)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        band_gains([0.3, 1.2], 2)
    with pytest.raises(ValueError, match="whole number"):
        mtf_kernel(0.3, 2.5)
    with pytest.raises(ValueError, match="odd"):
        mtf_kernel(0.3, 4, size=40)


# --- resampling ---------------------------------------------------------------------------------------


def test_23_tap_interpolator_is_the_published_filter() -> None:
    """A x2 step of upsample on a unit impulse returns the 23-tap half-band filter of Aiazzi et al. (2002)."""
    impulse = np.zeros((1, 1, 40))
    impulse[0, 0, 20] = 1.0
    taps = upsample(np.repeat(impulse, 40, axis=1), 2)[0, 41, 30:53]  # LR sample 20 sits on HR pixel 41
    published = [0.5, 0.305334091185, 0, -0.072698593239, 0, 0.021809577942, 0]
    published += [-0.005192756653, 0, 0.000807762146, 0, -0.000060081482]
    half = 2 * np.array(published)
    np.testing.assert_allclose(taps, np.concatenate([half[:0:-1], half]), atol=1e-11)


@pytest.mark.parametrize("ratio", [2, 3, 4, 6, 8])
def test_upsample_keeps_samples_and_reproduces_smooth_images(ratio: int) -> None:
    rng = np.random.default_rng(ratio)
    ms = rng.uniform(0, 2047, size=(3, 24, 20))
    up = upsample(ms, ratio)
    assert up.shape == (3, 24 * ratio, 20 * ratio)
    start = ratio // 2
    np.testing.assert_allclose(up[:, start::ratio, start::ratio], ms, atol=1e-9)  # interpolating
    assert upsample(ms[0], ratio).shape == (24 * ratio, 20 * ratio)
    # A linear ramp on the LR grid is reproduced exactly on the HR grid away from the mirrored edges.
    rows, cols = np.mgrid[0:24, 0:20].astype(np.float64)
    ramp_up = upsample(3 * rows + 2 * cols + 10, ratio)
    hr_rows, hr_cols = np.mgrid[0 : 24 * ratio, 0 : 20 * ratio].astype(np.float64)
    truth = 3 * (hr_rows - start) / ratio + 2 * (hr_cols - start) / ratio + 10
    m = 8 * ratio
    np.testing.assert_allclose(ramp_up[m:-m, m:-m], truth[m:-m, m:-m], atol=1e-8)


def test_degrade_then_upsample_is_shift_free() -> None:
    ratio = 4
    rows, cols = np.mgrid[0:128, 0:128].astype(np.float64)
    plane = 5 * rows + 7 * cols + 100  # band-limited: the MTF filter leaves it unchanged inside
    low = degrade(plane[None], ratio, "generic")
    assert low.shape == (1, 32, 32)
    back = upsample(low, ratio)[0]
    np.testing.assert_allclose(back[40:-40, 40:-40], plane[40:-40, 40:-40], atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of the ratio"):
        degrade(plane[:126], ratio, "generic")


def test_bicubic_downsample_matches_block_centres() -> None:
    rows, cols = np.mgrid[0:64, 0:64].astype(np.float64)
    small = bicubic_downsample(rows + 2 * cols, 4)
    # Output pixel i is centred on input coordinate 4i + 1.5; cubic weights reproduce a plane.
    centres = 4 * np.arange(16) + 1.5
    truth = centres[:, None] + 2 * centres[None, :]
    np.testing.assert_allclose(small[3:-3, 3:-3], truth[3:-3, 3:-3], atol=1e-9)


# --- baselines ----------------------------------------------------------------------------------------


def test_brovey_follows_gdal_formula() -> None:
    pan = np.array([[6.0, 0.0], [4.0, 5.0]])
    ms_up = np.array([[[1.0, 0.0], [2.0, 1.0]], [[3.0, 0.0], [2.0, 4.0]]])
    out = brovey(pan, ms_up)  # GDAL's default weights: 1/n
    # Pixel (0, 0): pseudo-PAN (1 + 3)/2 = 2, factor 6/2 = 3.
    assert out[:, 0, 0].tolist() == [3.0, 9.0]
    # Pixel (0, 1): pseudo-PAN 0, so GDAL writes 0.
    assert out[:, 0, 1].tolist() == [0.0, 0.0]
    weighted = brovey(pan, ms_up, weights=[0.25, 0.75])
    # Pixel (1, 1): pseudo-PAN 0.25 * 1 + 0.75 * 4 = 3.25, factor 5 / 3.25.
    np.testing.assert_allclose(weighted[:, 1, 1], np.array([1.0, 4.0]) * 5 / 3.25)
    # The weighted sum of the output bands is the PAN wherever the pseudo-PAN is not 0.
    np.testing.assert_allclose(np.tensordot([0.25, 0.75], weighted, axes=1)[pan > 0], pan[pan > 0])
    with pytest.raises(ValueError, match="one weight per band"):
        brovey(pan, ms_up, weights=[1.0])


def test_baselines_keep_shape_and_check_inputs() -> None:
    ms, pan, sensor, ratio = _load("ikonos_crop")
    ms_up = upsample(ms, ratio)
    for fused in (brovey(pan, ms_up), gsa(pan, ms_up, ms, ratio), mtf_glp_hpm(pan, ms_up, ratio, sensor)):
        assert fused.shape == ms_up.shape and fused.dtype == np.float64
        assert np.isfinite(fused).all()
    with pytest.raises(ValueError, match="same grid"):
        brovey(pan[:128], ms_up)
    with pytest.raises(ValueError, match="must be 32x32"):
        gsa(pan[:128, :128], ms_up[:, :128, :128], ms, ratio)
    with pytest.raises(ValueError, match="whole number"):
        mtf_glp_hpm(pan, ms_up, 4.5, sensor)
    with pytest.raises(ValueError, match="single band"):
        gsa(ms_up, ms_up, ms, ratio)


def test_hpm_and_gsa_inject_nothing_from_a_flat_pan() -> None:
    ms, _, sensor, ratio = _load("ikonos_crop")
    ms_up = upsample(ms, ratio)
    flat = np.full(ms_up.shape[1:], 900.0)
    np.testing.assert_allclose(mtf_glp_hpm(flat, ms_up, ratio, sensor), ms_up)
    np.testing.assert_allclose(gsa(flat, ms_up, ms, ratio), ms_up)


# --- real scenes: Wald's reduced-resolution protocol --------------------------------------------------


@pytest.mark.parametrize("name", ["wv2_crop", "ikonos_crop"])
def test_classical_methods_beat_plain_upsampling_at_reduced_resolution(name: str) -> None:
    ms, pan, sensor, ratio = _load(name)
    ms_lr, pan_lr = wald_protocol(ms, pan, ratio, sensor)
    assert ms_lr.shape == (ms.shape[0], 16, 16) and pan_lr.shape == (64, 64)
    ms_up = upsample(ms_lr, ratio)

    def score(fused: np.ndarray) -> dict[str, float]:
        return reduced_resolution_metrics(fused, ms, ratio, data_range=2047)

    exp = score(ms_up)
    hpm = score(mtf_glp_hpm(pan_lr, ms_up, ratio, sensor))
    gs = score(gsa(pan_lr, ms_up, ms_lr, ratio))
    bt = score(brovey(pan_lr, ms_up))
    for fused in (hpm, gs):
        assert fused["q2n"] > exp["q2n"] + 0.05
        assert fused["ergas"] < exp["ergas"]
        assert fused["scc"] > exp["scc"]
    assert bt["q2n"] > exp["q2n"]
    # Brovey rescales each pixel's spectrum, so its spectral angles are exactly those of the input.
    assert bt["sam"] == pytest.approx(exp["sam"], abs=1e-9)


def test_full_resolution_indices_on_a_real_scene() -> None:
    ms, pan, sensor, ratio = _load("wv2_crop")
    ms_up = upsample(ms, ratio)
    exp = full_resolution_metrics(ms_up, ms, pan, ratio, sensor)
    hpm = full_resolution_metrics(mtf_glp_hpm(pan, ms_up, ratio, sensor), ms, pan, ratio, sensor)
    for m in (exp, hpm):
        assert 0 <= m["d_lambda"] < 0.2 and 0 <= m["d_s"] < 0.3
    # Injecting PAN detail lowers the spatial distortion without a large spectral cost.
    assert hpm["d_s"] < exp["d_s"]
    assert hpm["hqnr"] > exp["hqnr"]
