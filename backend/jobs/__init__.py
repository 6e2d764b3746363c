"""Job registry: every job the worker and the CLI can run, by its `<task>.<verb>` name."""

from __future__ import annotations

from backend.jobs import (
    change_cva,
    change_evaluate,
    change_filf,
    models,
    pansharpen_classic,
    pansharpen_evaluate,
    pansharpen_panadapter,
)
from backend.jobs.base import JobSpec

JOBS: dict[str, JobSpec] = {
    spec.name: spec
    for spec in (
        change_cva.SPEC,
        change_filf.FINETUNE,
        change_filf.DETECT,
        change_evaluate.SPEC,
        pansharpen_classic.SPEC,
        pansharpen_evaluate.SPEC,
        pansharpen_panadapter.FINETUNE,
        pansharpen_panadapter.APPLY,
    )
}
# Jobs the worker runs for its own requests (models.fetch), not offered as raster jobs.
SERVICE_JOBS: dict[str, JobSpec] = {spec.name: spec for spec in (models.SPEC,)}
