"""Z-PNN (Ciotola et al., "Pansharpening by convolutional neural networks in the full resolution framework",
IEEE TGRS 2022) as a published peer, with the authors' pretrained weights (github.com/matciotola/Z-PNN).

Our own implementation of what the official code does at test time (`main.py`, `networks.py`,
`input_prepocessing.py`, `sensor.py`, `losses.py`, `cross_correlation.py`):

* Network: PNN, three *valid* convolutions 9x9 (C+1 -> 48), ReLU, 5x5 (48 -> 32), ReLU, 5x5 (32 -> C); the
  output is added to the up-sampled MS cropped by the network's scope (4 + 2 + 2 = 8 pixels per side).
* Input: the MS up-sampled with the 23-tap interpolator, stacked with the PAN, divided by 2**bits (11 bits for
  WV2/WV3/GE1), then edge-replicated by the scope so that the output covers the whole PAN grid.
* Output: times 2**bits, clipped at 0 (the official code then casts to uint16; we stay float).
* "Zero-shot" target adaptation (`adapt_iterations`, 100 in the official code): Adam on the test image itself
  with the full-resolution loss = spectral L1 (MTF-filtered output against the MS samples) + beta x structural
  loss (1 - local correlation with the PAN where it is worse than between the MS and the low-passed PAN).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backend.methods.pansharpening_classic import GainsLike, band_gains, check_ratio, mtf_kernel, upsample

KERNELS = (9, 5, 5)
SCOPE = sum(k // 2 for k in KERNELS)  # pixels each side that the valid convolutions consume
SENSOR_BANDS = {"WV2": 8, "WV3": 8, "GE1": 4}
# Target-adaptive fine-tuning settings of the official `sensor.py`: (beta of the structural loss, Adam lr).
ADAPT_SETTINGS = {"WV2": (0.36, 1e-5), "WV3": (0.36, 1e-5), "GE1": (0.25, 5e-5)}
CORR_HALF_WIDTH = 8  # half-width of the local correlation that sets the structural-loss threshold (official)
STRIP_ROWS = 256  # output rows per forward pass at inference, to bound memory on big scenes


class PNN(nn.Module):
    """Three valid convolutions with a residual on the up-sampled MS (Z-PNN's network)."""

    def __init__(self, bands: int, sensor: str | None = None) -> None:
        super().__init__()
        self.bands = bands
        self.sensor = sensor
        self.conv1 = nn.Conv2d(bands + 1, 48, KERNELS[0])
        self.conv2 = nn.Conv2d(48, 32, KERNELS[1])
        self.conv3 = nn.Conv2d(32, bands, KERNELS[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C+1, H, W) normalised [MS_up, PAN] -> (N, C, H - 2*SCOPE, W - 2*SCOPE)."""
        y = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return y + x[:, :-1, SCOPE:-SCOPE, SCOPE:-SCOPE]


def load_zpnn(sensor: str, weights_dir: Path) -> PNN:
    """The pretrained Z-PNN of `sensor` (WV2, WV3 or GE1) from `<weights_dir>/<sensor>_Z-PNN_model.tar`."""
    key = str(sensor).upper()
    if key not in SENSOR_BANDS:
        raise ValueError(f"Z-PNN has pretrained weights for {', '.join(SENSOR_BANDS)}; got {sensor!r}.")
    path = Path(weights_dir) / f"{key}_Z-PNN_model.tar"
    if not path.is_file():
        raise FileNotFoundError(f"Z-PNN weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = PNN(SENSOR_BANDS[key], key)
    model.load_state_dict(state, strict=True)  # every key and shape must match
    return model.eval()


def _local_corr(x: torch.Tensor, y: torch.Tensor, half_width: int) -> torch.Tensor:
    """Local correlation coefficient over (2w+1)^2 windows (zero padded); y may have one channel."""
    k = 2 * half_width + 1

    def box(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, k, stride=1, padding=half_width, count_include_pad=True)

    mx, my = box(x), box(y)
    cov = box(x * y) - mx * my
    var = (box(x * x) - mx**2).clamp_min(1e-20) * (box(y * y) - my**2).clamp_min(1e-20)
    return cov / var.sqrt()


def _mtf_conv(x: torch.Tensor, gains: np.ndarray, ratio: int, padding: str = "valid") -> torch.Tensor:
    """Depthwise MTF-matched Gaussian low-pass, one gain per channel of x."""
    taps = np.stack([mtf_kernel(float(g), ratio) for g in gains])[:, None]
    weight = torch.as_tensor(taps, dtype=x.dtype, device=x.device)
    if padding == "reflect":
        half = taps.shape[-1] // 2
        x = F.pad(x, (half, half, half, half), mode="reflect")
    return F.conv2d(x, weight, groups=len(gains))


def _adapt(
    model: PNN,
    stack: torch.Tensor,
    ms: torch.Tensor,
    ratio: int,
    gains: np.ndarray,
    iterations: int,
    beta: float,
    lr: float,
) -> PNN:
    """Z-PNN's target-adaptive fine-tuning on the (unpadded) test image; returns the lowest-loss weights.

    Differences from the official code: our Gaussian MTF filter instead of their Kaiser-windowed one, a
    (2w+1)-pixel correlation window instead of 2w, and the weights kept are those that produced the lowest
    loss (the official code saves the weights after the step that followed it).
    """
    net = copy.deepcopy(model).to(stack.device).train()
    pan = stack[:, -1:]
    # Threshold: how well the MS alone correlates with the PAN low-passed to the MS resolution.
    pan_lp = _mtf_conv(pan, gains[:1], ratio, padding="reflect")
    thr = (1.0 - _local_corr(stack[:, :-1], pan_lp, CORR_HALF_WIDTH))[..., SCOPE:-SCOPE, SCOPE:-SCOPE]
    pan_ref = pan[..., SCOPE:-SCOPE, SCOPE:-SCOPE]
    half = mtf_kernel(float(gains[0]), ratio).shape[0] // 2
    first = (ratio // 2 - SCOPE - half) % ratio  # first filtered pixel that lies on an MS pixel centre
    ms_row0 = (SCOPE + half + first - ratio // 2) // ratio
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    best, best_state = math.inf, copy.deepcopy(net.state_dict())
    for _ in range(iterations):
        optimizer.zero_grad()
        out = net(stack)
        low = _mtf_conv(out, gains, ratio)[..., first::ratio, first::ratio]
        target = ms[..., ms_row0 : ms_row0 + low.shape[-2], ms_row0 : ms_row0 + low.shape[-1]]
        loss_spec = (low - target).abs().mean()
        err = 1.0 - _local_corr(out, pan_ref, math.ceil(ratio / 2)).clamp_min(-1.0)
        loss = loss_spec + beta * (err * (err > thr)).mean()
        if loss.item() < best:
            best, best_state = loss.item(), copy.deepcopy(net.state_dict())
        loss.backward()
        optimizer.step()
    net.load_state_dict(best_state)
    return net.eval()


def zpnn_fuse(
    pan: np.ndarray,
    ms: np.ndarray,
    ratio: int,
    model: PNN,
    bits: int = 11,
    adapt_iterations: int = 0,
    gains: GainsLike | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Pansharpen with Z-PNN: PAN (H, W) + MS (C, h, w) -> (C, H, W) float64 in the MS's units.

    `bits` is the radiometric depth used for normalisation (2**bits). With `adapt_iterations` > 0 a copy of the
    model is first fine-tuned on this image with Z-PNN's full-resolution loss (`gains`: the MS MTF gains, by
    default those of the weights' sensor); `model` itself is never changed. `device`: where the network runs.
    """
    ratio = check_ratio(ratio)
    pan2 = np.asarray(pan, dtype=np.float64)
    if pan2.ndim == 3 and pan2.shape[0] == 1:
        pan2 = pan2[0]
    cube = np.asarray(ms, dtype=np.float64)
    if pan2.ndim != 2 or cube.ndim != 3:
        raise ValueError(f"Expected a PAN (H, W) and an MS (C, h, w); got {pan2.shape} and {cube.shape}.")
    if cube.shape[0] != model.bands:
        raise ValueError(
            f"These Z-PNN weights ({model.sensor or 'unknown sensor'}) take {model.bands} MS bands; "
            f"the MS has {cube.shape[0]}."
        )
    if pan2.shape != (cube.shape[1] * ratio, cube.shape[2] * ratio):
        raise ValueError(f"The PAN is {pan2.shape}; with ratio {ratio} the MS {cube.shape[1:]} needs it x{ratio}.")
    scale = 2.0**bits
    stack = np.concatenate([upsample(cube, ratio), pan2[None]]) / scale
    dev = torch.device(device)
    net = model if next(model.parameters()).device == dev else copy.deepcopy(model).to(dev)
    if adapt_iterations > 0:
        sensor = model.sensor or "WV3"
        g = band_gains(sensor if gains is None else gains, cube.shape[0])
        beta, lr = ADAPT_SETTINGS.get(sensor, ADAPT_SETTINGS["WV3"])
        with torch.enable_grad():
            net = _adapt(
                model,
                torch.from_numpy(stack).float()[None].to(dev),
                torch.from_numpy(cube / scale).float()[None].to(dev),
                ratio,
                g,
                adapt_iterations,
                beta,
                lr,
            )
    padded = torch.from_numpy(np.pad(stack, ((0, 0), (SCOPE, SCOPE), (SCOPE, SCOPE)), mode="edge")).float()[None]
    h = pan2.shape[0]
    out = np.empty((cube.shape[0], *pan2.shape))
    with torch.no_grad():
        # Valid convolutions: a strip of output rows needs only its rows plus the scope on each side.
        for r0 in range(0, h, STRIP_ROWS):
            r1 = min(h, r0 + STRIP_ROWS)
            out[:, r0:r1] = net(padded[..., r0 : r1 + 2 * SCOPE, :].to(dev))[0].double().cpu().numpy()
    return np.clip(out * scale, 0.0, None)
