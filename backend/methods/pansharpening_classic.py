"""Classical pansharpening in numpy: MTF-matched filters, Wald degradation, interpolation and three baselines.

Arrays are float (bands, H, W); a PAN is (H, W) or (1, H, W). The MS/PAN scale ratio is an integer.

Grid convention (that of the pansharpening toolbox of Vivone et al., which the public reference scenes follow):
low-resolution pixel i lies on high-resolution pixel ``ratio * i + ratio // 2``. Decimation (`degrade`) and
interpolation (`upsample`) both use it, so a degrade/upsample round trip introduces no shift.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage, optimize

from backend.params import OutputDecl, Param
from backend.protocol import INVALID_INPUT, JobError


@dataclass(frozen=True)
class SensorMTF:
    """Amplitude of the sensor MTF at the Nyquist frequency of the MS grid, per MS band and for the PAN."""

    ms: tuple[float, ...]
    pan: float


# Published toolbox values (Vivone et al., TGRS 2015 and GRSM 2020; DLPan-Toolbox `Tools/genMTF.m` for the MS
# bands and `Tools/MTF_PAN.m` for the PAN). methods.md §6 uses the MTF-matched filter but lists no values.
# Note WV3's PAN gain is 0.14 in MTF_PAN.m (a figure of 0.5 circulates but is not the toolbox's).
SENSORS: dict[str, SensorMTF] = {
    "QB": SensorMTF((0.34, 0.32, 0.30, 0.22), 0.15),  # QuickBird, bands B, G, R, NIR
    "IKONOS": SensorMTF((0.26, 0.28, 0.29, 0.28), 0.17),  # B, G, R, NIR
    "GeoEye1": SensorMTF((0.23, 0.23, 0.23, 0.23), 0.16),  # B, G, R, NIR (the toolbox uses it for WV4 too)
    "WV2": SensorMTF((0.35,) * 7 + (0.27,), 0.11),  # coastal, B, G, yellow, R, red edge, NIR1, NIR2
    "WV3": SensorMTF((0.325, 0.355, 0.360, 0.350, 0.365, 0.360, 0.335, 0.315), 0.14),
    "generic": SensorMTF((0.3,), 0.15),  # unknown sensor: the toolbox's default Gaussian
}
GENERIC_GAIN = 0.3

_ALIASES = {
    "qb": "QB",
    "quickbird": "QB",
    "ikonos": "IKONOS",
    "ik": "IKONOS",
    "geoeye1": "GeoEye1",
    "geoeye": "GeoEye1",
    "ge1": "GeoEye1",
    "wv4": "GeoEye1",
    "worldview4": "GeoEye1",
    "wv2": "WV2",
    "worldview2": "WV2",
    "wv3": "WV3",
    "worldview3": "WV3",
    "generic": "generic",
    "none": "generic",
}

GainsLike = str | float | Sequence[float] | np.ndarray


def check_ratio(ratio: float) -> int:
    """The scale ratio as an int; ValueError unless it is a whole number >= 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float | np.integer | np.floating):
        raise ValueError(f"The scale ratio must be a whole number, got {ratio!r}.")
    if not float(ratio).is_integer() or ratio < 1:
        raise ValueError(f"The scale ratio between MS and PAN must be a whole number >= 1, got {ratio}.")
    return int(ratio)


def sensor_mtf(sensor: str) -> SensorMTF:
    """MTF gains of a named sensor (QuickBird, IKONOS, GeoEye-1, WorldView-2/3, or 'generic')."""
    key = _ALIASES.get(re.sub(r"[^a-z0-9]", "", str(sensor).lower()))
    if key is None:
        known = ", ".join(sorted(SENSORS))
        raise ValueError(f"Unknown sensor {sensor!r}; use one of {known} or give the MTF gains per band.")
    return SENSORS[key]


def band_gains(sensor_or_gains: GainsLike, bands: int) -> np.ndarray:
    """Nyquist gains for `bands` bands from a sensor name, one gain, or one gain per band."""
    if isinstance(sensor_or_gains, str):
        mtf = sensor_mtf(sensor_or_gains)
        gains = np.asarray(mtf.ms, dtype=np.float64)
        # A sensor with one gain for all bands also fits a subset of its bands (e.g. a 4-band WV2 product).
        if gains.size != bands and np.all(gains == gains[0]):
            gains = np.full(bands, gains[0])
        if gains.size != bands:
            raise ValueError(
                f"Sensor {sensor_or_gains!r} has {gains.size} MS bands but the image has {bands}; "
                "give one MTF gain per band instead."
            )
    else:
        gains = np.atleast_1d(np.asarray(sensor_or_gains, dtype=np.float64)).ravel()
        if gains.size == 1:
            gains = np.full(bands, gains[0])
        if gains.size != bands:
            raise ValueError(f"Got {gains.size} MTF gains for an image with {bands} bands.")
    if np.any(gains <= 0) or np.any(gains >= 1):
        raise ValueError(f"MTF gains must lie strictly between 0 and 1, got {gains.tolist()}.")
    return gains


def default_kernel_size(ratio: int) -> int:
    """41 taps at ratio 4, as in the toolbox, scaled with the ratio (always odd)."""
    return 10 * check_ratio(ratio) + 1


@lru_cache(maxsize=128)
def _gaussian_taps(gain: float, ratio: int, size: int) -> np.ndarray:
    """1-D sampled Gaussian (sum 1) whose DTFT at 1/(2*ratio) cycles/pixel equals `gain` exactly."""
    n = np.arange(size) - size // 2
    carrier = np.cos(2 * np.pi * n / (2 * ratio))

    def taps(sigma: float) -> np.ndarray:
        h = np.exp(-0.5 * (n / sigma) ** 2)
        return h / h.sum()

    def excess(sigma: float) -> float:
        return float(taps(sigma) @ carrier) - gain

    # The continuous Gaussian exp(-2 pi^2 sigma^2 f^2) gives the starting width; sampling and truncation
    # shift the response a little, so solve for the sampled kernel instead of trusting the closed form.
    sigma0 = ratio * math.sqrt(-2.0 * math.log(gain)) / math.pi
    lo, hi = 1e-2, max(2.0 * sigma0, 1.0)
    if excess(lo) <= 0 or excess(hi) >= 0:
        raise ValueError(f"Cannot reach an MTF gain of {gain} at ratio {ratio} with a {size}-tap kernel.")
    sigma = optimize.brentq(excess, lo, hi, xtol=1e-12)
    out = taps(sigma)
    out.setflags(write=False)
    return out


def mtf_kernel(gain: float, ratio: int, size: int | None = None) -> np.ndarray:
    """2-D Gaussian low-pass (size x size, sum 1) with amplitude `gain` at the MS Nyquist, 1/(2*ratio) cyc/px.

    Separable, so the response along either frequency axis at the Nyquist is exactly `gain`.
    """
    ratio = check_ratio(ratio)
    size = _check_size(size, ratio)
    if not 0 < gain < 1:
        raise ValueError(f"The MTF gain must lie strictly between 0 and 1, got {gain}.")
    h = _gaussian_taps(float(gain), ratio, size)
    return np.outer(h, h)


def _check_size(size: int | None, ratio: int) -> int:
    size = default_kernel_size(ratio) if size is None else int(size)
    if size < 3 or size % 2 == 0:
        raise ValueError(f"The kernel size must be odd and >= 3, got {size}.")
    return size


def _as_cube(image: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """(bands, H, W) float64 view of a 2-D or 3-D array, and whether it was 2-D."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 2:
        return arr[None], True
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a (bands, height, width) array, got shape {arr.shape}.")
    return arr, False


def _as_pan(pan: np.ndarray) -> np.ndarray:
    arr = np.asarray(pan, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"The PAN must be a single band (height, width), got shape {arr.shape}.")
    return arr


def mtf_filter(image: np.ndarray, sensor_or_gains: GainsLike, ratio: int, size: int | None = None) -> np.ndarray:
    """Low-pass each band with its sensor's MTF-matched Gaussian (edges replicated, as the toolbox does)."""
    cube, flat = _as_cube(image, "The image")
    ratio = check_ratio(ratio)
    size = _check_size(size, ratio)
    gains = band_gains(sensor_or_gains, cube.shape[0])
    out = np.empty_like(cube)
    for b, gain in enumerate(gains):
        h = _gaussian_taps(float(gain), ratio, size)
        tmp = ndimage.correlate1d(cube[b], h, axis=0, mode="nearest")
        out[b] = ndimage.correlate1d(tmp, h, axis=1, mode="nearest")
    return out[0] if flat else out


def _check_divisible(shape: tuple[int, ...], ratio: int, name: str) -> None:
    if shape[-2] % ratio or shape[-1] % ratio:
        raise ValueError(f"{name} is {shape[-2]}x{shape[-1]} pixels, which is not a multiple of the ratio {ratio}.")


def degrade(image: np.ndarray, ratio: int, gains: GainsLike) -> np.ndarray:
    """MTF-filter then decimate by `ratio` (Wald's protocol), keeping pixel ratio*i + ratio//2."""
    ratio = check_ratio(ratio)
    _check_divisible(np.shape(image), ratio, "The image")
    low = mtf_filter(image, gains, ratio)
    start = ratio // 2
    return np.ascontiguousarray(low[..., start::ratio, start::ratio])  # a view would pin the full-size array


def wald_protocol(ms: np.ndarray, pan: np.ndarray, ratio: int, sensor: str) -> tuple[np.ndarray, np.ndarray]:
    """Reduced-resolution inputs: the MS degraded with the MS MTFs and the PAN with the PAN MTF.

    The original MS then serves as the reference for the fusion of the two degraded images.
    """
    ms_cube, _ = _as_cube(ms, "The MS image")
    pan2 = _as_pan(pan)
    ratio = check_ratio(ratio)
    _check_shapes(pan2, ms_cube, ratio)
    return degrade(ms_cube, ratio, sensor), degrade(pan2, ratio, sensor_mtf(sensor).pan)


_LAGRANGE_NODES = np.arange(-5, 7)  # 12 neighbours: the polynomial of the classical 23-tap interpolator


def _lagrange_weights(t: float) -> np.ndarray:
    """Weights of the degree-11 Lagrange polynomial through nodes -5..6, evaluated at t in [0, 1)."""
    nodes = _LAGRANGE_NODES.astype(np.float64)
    w = np.empty(nodes.size)
    for k, xk in enumerate(nodes):
        others = np.delete(nodes, k)
        w[k] = np.prod((t - others) / (xk - others))
    return w


def _interp_axis(x: np.ndarray, axis: int, ratio: int, offset: int) -> np.ndarray:
    """Upsample one axis: sample i lands on index ratio*i + offset; the rest by 12-point Lagrange."""
    x = np.moveaxis(x, axis, -1)
    n = x.shape[-1]
    pad = 7
    # Mirror padding: the toolbox wraps around (circular), which drags the opposite edge into the border.
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="symmetric")
    out = np.empty((*x.shape[:-1], n * ratio))
    for phase in range(ratio):
        u = (phase - offset) / ratio
        shift = math.floor(u)
        t = u - shift
        if t == 0:
            out[..., phase::ratio] = xp[..., pad + shift : pad + shift + n]
            continue
        acc = np.zeros((*x.shape[:-1], n))
        for w, node in zip(_lagrange_weights(t), _LAGRANGE_NODES, strict=True):
            start = pad + shift + node
            acc += w * xp[..., start : start + n]
        out[..., phase::ratio] = acc
    return np.moveaxis(out, -1, axis)


def upsample(ms: np.ndarray, ratio: int) -> np.ndarray:
    """Interpolate to the PAN grid with the classical 23-tap polynomial (Lagrange) interpolator.

    Powers of two: repeated x2 steps with the 23-tap half-band filter of Aiazzi et al. (2002), the toolbox's
    `interp23tap`. Other ratios: one step of the same 12-point Lagrange polynomial at each sub-pixel phase.
    Low-resolution samples are kept exactly; edges are mirrored.
    """
    cube, flat = _as_cube(ms, "The MS image")
    ratio = check_ratio(ratio)
    out = cube.copy()
    if ratio & (ratio - 1) == 0:
        offset = 1  # first x2 step lands on odd pixels, later ones on even pixels: overall ratio*i + ratio/2
        while ratio > 1:
            out = _interp_axis(_interp_axis(out, 1, 2, offset), 2, 2, offset)
            offset, ratio = 0, ratio // 2
    else:
        out = _interp_axis(_interp_axis(out, 1, ratio, ratio // 2), 2, ratio, ratio // 2)
    return out[0] if flat else out


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's and GDAL's 'cubic')."""
    ax = np.abs(x)
    return np.where(
        ax <= 1,
        1.5 * ax**3 - 2.5 * ax**2 + 1,
        np.where(ax < 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0),
    )


def bicubic_downsample(image: np.ndarray, ratio: int) -> np.ndarray:
    """Shrink by `ratio` like MATLAB's imresize(x, 1/ratio): bicubic widened by the ratio (anti-aliased).

    Output pixel i is centred on input coordinate ratio*i + (ratio-1)/2; edges are mirrored. Used by D_s.
    """
    cube, flat = _as_cube(image, "The image")
    ratio = check_ratio(ratio)
    _check_divisible(cube.shape, ratio, "The image")
    centre = (ratio - 1) / 2
    offsets = np.arange(math.ceil(centre - 2 * ratio), math.floor(centre + 2 * ratio) + 1)
    weights = _keys_cubic((offsets - centre) / ratio)
    keep = weights != 0
    offsets, weights = offsets[keep], weights[keep] / weights[keep].sum()
    pad = int(np.abs(offsets).max()) + 1
    out = cube
    for axis in (1, 2):
        x = np.moveaxis(out, axis, -1)
        n_out = x.shape[-1] // ratio
        xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="symmetric")
        acc = np.zeros((*x.shape[:-1], n_out))
        for off, w in zip(offsets, weights, strict=True):
            start = pad + off
            acc += w * xp[..., start : start + ratio * n_out : ratio]
        out = np.moveaxis(acc, -1, axis)
    return out[0] if flat else out


def _check_shapes(pan: np.ndarray, ms_up: np.ndarray, ratio: int | None = None) -> None:
    """PAN (H, W) against an MS cube, either on the PAN grid (ratio None) or on the MS grid."""
    h, w = pan.shape
    if ratio is None:
        if ms_up.shape[1:] != (h, w):
            raise ValueError(
                f"The upsampled MS is {ms_up.shape[1]}x{ms_up.shape[2]} pixels but the PAN is {h}x{w}; "
                "they must be on the same grid."
            )
        return
    _check_divisible(pan.shape, ratio, "The PAN")
    if ms_up.shape[1:] != (h // ratio, w // ratio):
        raise ValueError(
            f"The MS is {ms_up.shape[1]}x{ms_up.shape[2]} pixels; with a ratio of {ratio} it must be "
            f"{h // ratio}x{w // ratio} for a {h}x{w} PAN."
        )


def brovey(pan: np.ndarray, ms_up: np.ndarray, weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """GDAL's weighted Brovey: band * pan / pseudo_pan, pseudo_pan = sum(weights * bands), default weights 1/n.

    Where the pseudo-PAN is 0 the output is 0, as in GDAL (GDAL also clips to the bit depth; we stay float).
    """
    pan2 = _as_pan(pan)
    cube, _ = _as_cube(ms_up, "The upsampled MS")
    _check_shapes(pan2, cube)
    n = cube.shape[0]
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.size != n:
        raise ValueError(f"Brovey needs one weight per band: got {w.size} weights for {n} bands.")
    pseudo = np.tensordot(w, cube, axes=1)
    factor = np.divide(pan2, pseudo, out=np.zeros_like(pseudo), where=pseudo != 0)
    return cube * factor


def gsa(pan: np.ndarray, ms_up: np.ndarray, ms: np.ndarray, ratio: int) -> np.ndarray:
    """Gram-Schmidt adaptive (Aiazzi et al., TGRS 2007): component substitution with a regressed intensity.

    The intensity weights come from the least-squares fit of the PAN, degraded to the MS scale, on the MS
    bands plus a constant; each band receives pan - I scaled by cov(I, band) / var(I).
    """
    pan2 = _as_pan(pan)
    up, _ = _as_cube(ms_up, "The upsampled MS")
    low, _ = _as_cube(ms, "The MS image")
    ratio = check_ratio(ratio)
    _check_shapes(pan2, up)
    _check_shapes(pan2, low, ratio)
    if up.shape[0] != low.shape[0]:
        raise ValueError(f"The MS has {low.shape[0]} bands but the upsampled MS has {up.shape[0]}.")
    n = up.shape[0]
    pan0 = pan2 - pan2.mean()
    # Regress at the MS scale so that the intensity matches the PAN's low-pass content, not its details.
    pan_low = degrade(pan0, ratio, GENERIC_GAIN)
    low0 = low - low.mean(axis=(1, 2), keepdims=True)
    design = np.concatenate([low0.reshape(n, -1), np.ones((1, low0[0].size))]).T
    alpha, *_ = np.linalg.lstsq(design, pan_low.ravel(), rcond=None)
    up0 = up - up.mean(axis=(1, 2), keepdims=True)
    intensity = np.tensordot(alpha[:n], up0, axes=1) + alpha[n]
    intensity -= intensity.mean()
    var = intensity.var()
    if var <= 1e-18 * (pan0.var() + 1.0):
        return up.copy()  # flat MS: no intensity to substitute, nothing to inject
    gains = (up0.reshape(n, -1) @ intensity.ravel()) / intensity.size / var
    return up + gains[:, None, None] * (pan0 - intensity)


def mtf_glp_hpm(
    pan: np.ndarray, ms_up: np.ndarray, ratio: int, gains: GainsLike, at: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """MTF-GLP with high-pass modulation (Aiazzi et al. 2003): fused_b = ms_up_b * pan / pan_low_b.

    pan_low_b is the PAN MTF-filtered with band b's gain, decimated to the MS pixel centres and
    re-interpolated (23 taps), so it carries the MS's resolution and aliasing. The PAN is equalised to each
    band by gain only, which cancels in the modulation. The toolbox also shifts the PAN's mean to the
    band's; where a band has more relative contrast than the PAN (dark blue bands over cities) that drives
    the low-pass PAN to zero or below and the modulation explodes (SpaceNet-6 11-bit data: values from
    -878 499 to 1 695 231), so that step is left out.

    `ms_up` may be a window of the PAN grid at offset `at` inside `pan` (tiled use: `pan` then starts on an
    MS pixel corner, spans whole MS pixels and has 12 x ratio pixels of context on each side).
    """
    pan2 = _as_pan(pan)
    up, _ = _as_cube(ms_up, "The upsampled MS")
    ratio = check_ratio(ratio)
    _check_divisible(pan2.shape, ratio, "The PAN")
    h, w = up.shape[1:]
    if at == (0, 0) and (h, w) == pan2.shape:
        _check_shapes(pan2, up)
    g = band_gains(gains, up.shape[0])
    out = up.copy()
    inner = (slice(at[0], at[0] + h), slice(at[1], at[1] + w))
    pan_in = pan2[inner]
    for gain in np.unique(g):
        low = upsample(degrade(pan2, ratio, float(gain)), ratio)[inner]
        # Where the low-pass PAN is not positive the modulation has no meaning: the MS is kept there.
        modulation = np.divide(pan_in, low, out=np.ones_like(low), where=low > 1e-12)
        out[g == gain] *= modulation[None]
    return out


def sensor_gains(sensor: str, bands: int) -> np.ndarray:
    """The MS bands' MTF gains, or a clear error when the sensor does not fit the band count."""
    try:
        return band_gains(sensor, bands)
    except ValueError as exc:
        raise JobError(
            INVALID_INPUT,
            str(exc),
            "Choose the MS bands that match the sensor (ms_bands), or sensor 'generic'.",
        ) from None


# --- the parameters every pansharpening job declares -----------------------------------------------------------
SENSOR = Param(
    "sensor",
    str,
    "Sensor of the MS, for its MTF filters (QB = QuickBird, WV2/WV3 = WorldView-2/3); generic for others.",
    default="generic",
    choices=(*(k for k in SENSORS if k != "generic"), "generic"),
    prominent=True,
)
RATIO = Param(
    "ratio",
    int,
    "MS pixel size / PAN pixel size (2, 4 …); auto = detected from the two grids.",
    minimum=2,
    maximum=64,
    step=1,
    prominent=True,
)
PAN = Param(
    "pan",
    str,
    "Panchromatic raster (one band); its grid is the output grid.",
    required=True,
    kind="raster",
)
MS = Param(
    "ms",
    str,
    "Multispectral raster (any band count, any CRS; read onto the PAN grid on the fly).",
    required=True,
    kind="raster",
)
MAX_SIZE = Param(
    "max_size",
    int,
    "Side of the window read whole, in PAN pixels (the centre of the area when it is larger).",
    minimum=64,
    maximum=16384,
    step=64,
)
MS_BANDS = Param("ms_bands", list, "MS bands to use, e.g. 1,2,3,4 (default: all).", kind="bands")
PANSHARPENED = (OutputDecl("pansharpened", "raster", "Pansharpened image (PAN grid, MS bands and dtype)"),)
