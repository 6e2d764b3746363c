"""What this backend runs on: versions, devices, GPU memory (for `initialize` and `info`)."""

from __future__ import annotations

import platform
import sys
from typing import Any

import backend


def environment_info() -> dict[str, Any]:
    import fiona
    import numpy
    import rasterio
    import torch

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
    }
