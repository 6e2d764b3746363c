"""Job registry: every job the worker and the CLI can run, by its `<task>.<verb>` name."""

from __future__ import annotations

from backend.jobs import change_cva
from backend.jobs.base import JobSpec

JOBS: dict[str, JobSpec] = {spec.name: spec for spec in (change_cva.SPEC,)}
