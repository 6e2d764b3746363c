"""Job registry: every job the worker and the CLI can run, by its `<task>.<verb>` name.

The classical jobs are listed here; every registered method (backend/methods/*/spec.py, or a module named in
RS_PEFT_QGIS_METHODS) adds its generic `<task>.finetune` and `<task>.<apply verb>`.
"""

from __future__ import annotations

from backend.jobs import (
    apply,
    change_cva,
    change_evaluate,
    finetune,
    landcover_evaluate,
    models,
    objects_evaluate,
    pansharpen_classic,
    pansharpen_evaluate,
)
from backend.jobs.base import JobSpec
from backend.methods.spec import discover

CLASSIC: tuple[JobSpec, ...] = (
    change_cva.SPEC,
    change_evaluate.SPEC,
    landcover_evaluate.SPEC,
    objects_evaluate.SPEC,
    pansharpen_classic.SPEC,
    pansharpen_evaluate.SPEC,
)


def _all_jobs() -> dict[str, JobSpec]:
    jobs = {spec.name: spec for spec in CLASSIC}
    for method in discover().values():
        own = (finetune.job(method), apply.job(method), finetune.pretraining_job(method))
        for spec in filter(None, own):
            if spec.name in jobs:
                raise ValueError(f"Method {method.name} offers {spec.name}, which another job already has.")
            jobs[spec.name] = spec
    # Tasks in a stable order: each task's jobs together, classical ones first.
    return dict(sorted(jobs.items(), key=lambda kv: kv[0].split(".")[0]))


JOBS: dict[str, JobSpec] = _all_jobs()
# Jobs the worker runs for its own requests (models.fetch), not offered as raster jobs.
SERVICE_JOBS: dict[str, JobSpec] = {spec.name: spec for spec in (models.SPEC,)}
