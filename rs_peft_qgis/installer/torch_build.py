"""Which PyTorch build suits this machine: its NVIDIA driver and graphics card, read from nvidia-smi."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

from rs_peft_qgis.installer.processes import NO_WINDOW

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass(frozen=True)
class CudaWheelIndex:
    """One of PyTorch's CUDA wheel indexes and what the machine needs to use it."""

    url: str
    cuda: str
    min_driver_linux: str
    min_driver_windows: str
    min_compute_capability: tuple[int, int]
    max_compute_major: int | None  # None: newer GPUs run it too (the build ships PTX)

    def supports(self, capability: tuple[int, int]) -> bool:
        # Kernels built for X.Y run on X.Z with Z >= Y, so only the major version caps a build.
        if capability < self.min_compute_capability:
            return False
        return self.max_compute_major is None or capability[0] <= self.max_compute_major


# CUDA builds of torch 2.13 (the pin in requirements/torch.txt), newest first; re-check when the pin moves.
# * Which builds exist: PyTorch's RELEASE.md "Release Compatibility Matrix": 2.13 ships stable CUDA 12.6 and
#   13.0 (13.2 experimental, not used here); there is no 2.13 build for CUDA 12.8 (last: 2.11) or 11.8 (last:
#   2.7). Its "PyTorch CUDA Support Matrix" gives the GPUs of each build: 12.6.3 Maxwell 5.0 .. Hopper 9.0;
#   13.0.2 Turing 7.5 .. Blackwell 10.0/12.0 + PTX. URLs: https://download.pytorch.org/whl/<cuXYZ> as on
#   pytorch.org/get-started (cu126, cu130; cpu for no GPU).
# * Driver minimums: NVIDIA CUDA Toolkit release notes (13.2 Update 2), Table 2 "minimum required driver for
#   CUDA minor version compatibility" (12.x >= 525, 13.x >= 580) and Table 3 "toolkit driver versions":
#   CUDA 12.0 GA Linux >= 525.60.13 / Windows >= 527.41, CUDA 13.0 GA Linux >= 580.65.06 (Windows: none
#   listed, so Table 2's 580). PyTorch wheels bring their own CUDA runtime, so minor version compatibility
#   lets any driver from its CUDA major's minimum run them.
TORCH_WHEEL_INDEXES: tuple[CudaWheelIndex, ...] = (
    CudaWheelIndex("https://download.pytorch.org/whl/cu130", "13.0", "580.65.06", "580", (7, 5), None),
    CudaWheelIndex("https://download.pytorch.org/whl/cu126", "12.6", "525.60.13", "527.41", (5, 0), 9),
)


@dataclass(frozen=True)
class TorchIndexChoice:
    """The wheel index to install torch from, and why, in words for the installer dialog."""

    url: str
    cuda: str | None
    reason: str


def _version_tuple(text: str) -> tuple[int, ...] | None:
    text = text.strip()
    if not re.fullmatch(r"\d+(\.\d+)*", text):
        return None
    return tuple(int(part) for part in text.split("."))


def choose_torch_index(
    driver: str | None, compute_capability: str | None = None, *, windows: bool | None = None
) -> TorchIndexChoice:
    """The newest torch build this NVIDIA driver (and graphics card, when known) can run; CPU otherwise."""
    if not driver:
        return TorchIndexChoice(
            CPU_INDEX,
            None,
            "No NVIDIA graphics card was found, so the backend will run on the processor (slower, but everything"
            " works).",
        )
    version = _version_tuple(driver)
    if version is None:
        return TorchIndexChoice(
            CPU_INDEX,
            None,
            f"The NVIDIA driver version could not be read ({driver!r}), so the backend will run on the processor.",
        )
    windows = sys.platform == "win32" if windows is None else windows
    capability = _version_tuple(compute_capability or "")
    card = (capability[0], capability[1]) if capability and len(capability) == 2 else None
    fitting = [e for e in TORCH_WHEEL_INDEXES if card is None or e.supports(card)]

    def minimum(entry: CudaWheelIndex) -> str:
        return entry.min_driver_windows if windows else entry.min_driver_linux

    for entry in fitting:
        if version >= (_version_tuple(minimum(entry)) or ()):
            return TorchIndexChoice(
                entry.url,
                entry.cuda,
                f"NVIDIA driver {driver} found: installing PyTorch for CUDA {entry.cuda} so the backend can use the"
                " graphics card.",
            )
    if not fitting:
        return TorchIndexChoice(
            CPU_INDEX,
            None,
            f"This NVIDIA graphics card (compute capability {compute_capability}) is not supported by this PyTorch"
            " version, so the backend will run on the processor.",
        )
    needed = min((minimum(e) for e in fitting), key=lambda v: _version_tuple(v) or ())
    return TorchIndexChoice(
        CPU_INDEX,
        None,
        f"The NVIDIA driver {driver} is too old for the graphics card to be used (version {needed} or newer"
        " is needed), so the backend will run on the processor. Update the NVIDIA driver, then install the backend"
        " again to use the graphics card.",
    )


def torch_index_for_driver(driver: str | None, compute_capability: str | None = None) -> str:
    """PyTorch's wheel index URL for this NVIDIA driver version (None: no NVIDIA GPU, the CPU index)."""
    return choose_torch_index(driver, compute_capability).url


def _nvidia_smi(query: str) -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
            **NO_WINDOW,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    # nvidia-smi fails (rc != 0) when the driver is not loaded or the field is unknown to an old driver.
    return lines if done.returncode == 0 and lines else None


def detect_cuda() -> str | None:
    """The NVIDIA driver version (e.g. '580.95.05') from nvidia-smi, or None without an NVIDIA GPU/driver."""
    lines = _nvidia_smi("driver_version")
    if not lines or _version_tuple(lines[0]) is None:
        return None
    return lines[0]  # one line per GPU, all the same driver


def detect_compute_capability() -> str | None:
    """The first GPU's compute capability (e.g. '8.6'), or None where nvidia-smi cannot say."""
    lines = _nvidia_smi("compute_cap")
    if not lines or _version_tuple(lines[0]) is None:
        return None
    return lines[0]
