"""Pre-flight: the size of a job before it starts (pixels, blocks, time, output bytes, free disk).

Every apply job calls `preflight()` once its grid is known: the estimate goes to the analyst (a log line and
an `estimate` record the dock shows), and requests that cannot end well are refused before any work: more
pixels than one machine should take in one job, outputs larger than the free disk, or days of work.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from backend.context import JobContext
from backend.protocol import INVALID_INPUT, OUTPUT_ERROR, JobError

MAX_PIXELS = 10**11  # 100 gigapixels (e.g. 316,000 px a side): beyond one job on one machine
MAX_SECONDS = 7 * 24 * 3600  # a CPU estimate above a week is refused, not started
AREA_HINT = "Choose an area of interest (aoi), or split the area into several jobs."


@dataclass(frozen=True)
class Estimate:
    pixels: int
    blocks: int
    seconds: float | None  # None where no throughput is known for the device (CUDA: measured per GPU)
    output_bytes: int  # uncompressed: the files are compressed, so this is an upper bound
    free_bytes: int
    device: str

    def summary(self) -> str:
        time_part = f"about {duration(self.seconds)}" if self.seconds is not None else "no time estimate"
        time_part += f" on {self.device}"
        return (
            f"Job size: {self.pixels / 1e6:,.1f} megapixels in {self.blocks:,} tile{'s' if self.blocks > 1 else ''}, "
            f"{time_part}; outputs up to "
            f"{size(self.output_bytes)} ({size(self.free_bytes)} free in the output folder)."
        )


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError


def preflight(
    ctx: JobContext,
    height: int,
    width: int,
    stride: int,
    out_dir: Path,
    bytes_per_pixel: float,
    device: str,
    cpu_mp_per_s: float | None,
) -> Estimate:
    """Estimate the job, refuse what cannot end well, and tell the analyst; `cpu_mp_per_s` is the job's
    measured CPU throughput (docs/BENCHMARKS.md), used for the time on a CPU."""
    pixels = height * width
    blocks = math.ceil(height / stride) * math.ceil(width / stride)
    seconds = pixels / (cpu_mp_per_s * 1e6) if cpu_mp_per_s and device == "cpu" else None
    est = Estimate(pixels, blocks, seconds, int(pixels * bytes_per_pixel), shutil.disk_usage(out_dir).free, device)
    if pixels > MAX_PIXELS:
        raise JobError(
            INVALID_INPUT,
            f"The area is {width:,} × {height:,} pixels ({pixels / 1e9:,.0f} gigapixels), more than one job takes "
            f"({MAX_PIXELS / 1e9:,.0f} gigapixels).",
            AREA_HINT,
        )
    if seconds is not None and seconds > MAX_SECONDS:
        raise JobError(
            INVALID_INPUT,
            f"This job would take about {duration(seconds)} on the CPU ({pixels / 1e6:,.0f} megapixels).",
            "Use a GPU (device cuda), or " + AREA_HINT[0].lower() + AREA_HINT[1:],
        )
    if est.output_bytes > est.free_bytes:
        raise JobError(
            OUTPUT_ERROR,
            f"The results may need up to {size(est.output_bytes)}, but the output folder has {size(est.free_bytes)} "
            "free.",
            "Free disk space, choose another output folder, or a smaller area of interest.",
        )
    ctx.log(est.summary(), "estimate", {"estimate": asdict(est)})
    return est
