"""What this backend runs on: versions, devices, GPU memory (for `initialize` and `info`)."""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

import backend


def environment_info() -> dict[str, Any]:
    import fiona
    import numpy
    import rasterio
    import torch

    from backend import adapters, weights

    devices: list[dict[str, Any]] = [{"name": "cpu", "type": "cpu", "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            devices.append(
                {
                    "name": f"cuda:{i}",
                    "type": "cuda",
                    "model": props.name,
                    "memory_total_mb": total // 2**20,
                    "memory_free_mb": free // 2**20,
                    "bf16": torch.cuda.is_bf16_supported(),
                }
            )
    return {
        "backend_version": backend.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "executable": sys.executable,
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "numpy": numpy.__version__,
            "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__,
            "fiona": fiona.__version__,
        },
        "devices": devices,
        "default_device": devices[-1]["name"],
        "folders": {"models": str(weights.cache_dir()), "adapters": str(adapters.library_dir())},
    }


def resolve_device(requested: str) -> str:
    """'auto' -> CUDA when there is one, else CPU; a forced CUDA device without one is a clear error."""
    import torch

    from backend.protocol import INVALID_INPUT, JobError

    if requested in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise JobError(
            INVALID_INPUT, "A GPU (CUDA) was requested but none is available.", "Choose device 'cpu' or 'auto'."
        )
    if requested != "cpu" and not requested.startswith("cuda"):
        raise JobError(INVALID_INPUT, f"Unknown device '{requested}'.", "Use auto, cpu, cuda or cuda:N.")
    return requested


TilePredictor = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (batch, valid) -> predictions, as the tiler calls


def halve_batch_on_oom(predict: TilePredictor) -> TilePredictor:
    """On CUDA out-of-memory, free the cache and predict each half of the batch (down to single tiles).

    A batch size that fits one GPU may not fit a smaller one; halving keeps the job running instead of failing.
    """
    import torch  # the worker answers `initialize` before torch is needed

    def run(batch: np.ndarray, valid: np.ndarray) -> np.ndarray:
        try:
            return predict(batch, valid)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(batch) // 2
            return np.concatenate([run(batch[:half], valid[:half]), run(batch[half:], valid[half:])])

    return run
