"""The job catalog QGIS builds on (resources/jobs.json) is exactly what the backend runs."""

from __future__ import annotations

import json
from pathlib import Path

from backend.jobs import JOBS
from backend.jobs.catalog import KINDS, TASKS, catalog

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_catalog_equals_the_backend_jobs() -> None:
    shipped = json.loads((ROOT / "resources" / "jobs.json").read_text())
    assert shipped == json.loads(json.dumps(catalog())), (
        "resources/jobs.json is stale: run `.venv/bin/python -m backend catalog --write resources/jobs.json`"
    )


def test_every_job_is_in_a_known_task_with_known_param_kinds() -> None:
    cat = catalog()
    listed = [name for task in cat["tasks"] for name in task["jobs"]]
    assert sorted(listed) == sorted(JOBS)
    for name, job in cat["jobs"].items():
        assert job["task"] in TASKS and job["title"], name
        for p in job["params"]:
            assert p["kind"] in KINDS | {"string", "int", "float", "bool", "ints"}, (name, p)
            if p["kind"] == "field":
                parent = next(q for q in job["params"] if q["name"] == p["parent"])
                assert parent["kind"] in ("vector", "polygons", "layer"), (name, p)
        # Jobs that write layers take an output folder and declare what they write.
        if any(p["kind"] == "folder" for p in job["params"]):
            assert job["outputs"], name
