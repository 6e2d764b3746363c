"""What every benchmark records about the machine it ran on, next to its numbers."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any


def machine_record(device: str = "cpu", load_at_start: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """Date, machine, CPU count, torch threads, load average (start and end) and the GPU's name."""
    import torch

    record: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }
    if load_at_start is not None:  # CPU timings are only as good as the machine is quiet
        record["loadavg_1_5_15min"] = {"start": load_at_start, "end": os.getloadavg()}
    return record
