"""The job catalog: every job's parameters, kinds and outputs as plain JSON.

The QGIS side builds its dock forms and Processing algorithms from this, without importing the
backend: `resources/jobs.json` is this catalog written by `python -m backend catalog --write`, and a
test keeps the two equal. The worker's `initialize` answer carries the same job entries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from backend.io.pairs import RATIO_TOLERANCE
from backend.io.wavelengths import SENSORS
from backend.jobs import JOBS
from backend.jobs.base import JobSpec
from backend.methods.spec import METHODS
from backend.params import Param

FORMAT = 2
# Task ids (the part of a job name before the dot) and the words the analyst sees for them.
TASKS = {
    "change": "Change detection",
    "pansharpen": "Pansharpening",
    "objects": "Object segmentation",
    "landcover": "Land-cover mapping",
}
# Task-specific constants the plugin's form hooks need (the backend's own rules, not copies).
HINTS: dict[str, dict[str, Any]] = {
    "pansharpen": {"ratio_tolerance": RATIO_TOLERANCE},
    "landcover": {"sensors": {name: list(wavelengths) for name, (_, wavelengths) in SENSORS.items()}},
}
KINDS = {"raster", "vector", "polygons", "layer", "folder", "adapter", "field", "bands"}
_PLAIN_KIND = {str: "string", int: "int", float: "float", bool: "bool", list: "ints"}


def param_entry(p: Param) -> dict[str, Any]:
    return {
        "name": p.name,
        "type": p.type.__name__,
        "kind": p.kind or _PLAIN_KIND[p.type],
        "parent": p.parent,
        "required": p.required,
        "default": p.default,
        "choices": list(p.choices) if p.choices else None,
        "editable": p.editable,
        "minimum": p.minimum,
        "maximum": p.maximum,
        "step": p.step,
        "group": p.group,
        "prominent": p.prominent,
        "help": p.help,
    }


def job_entry(spec: JobSpec) -> dict[str, Any]:
    return {
        "task": spec.name.split(".")[0],
        "title": spec.title or spec.summary,
        "summary": spec.summary,
        "params": [param_entry(p) for p in spec.params],
        "outputs": [{"key": o.key, "kind": o.kind, "description": o.description} for o in spec.outputs],
        "method": spec.method,
        "stages": dict(spec.stages),
    }


def task_title(task: str) -> str:
    if task in TASKS:
        return TASKS[task]
    method = next((m for m in METHODS.values() if m.task == task), None)
    return method.task_title if method and method.task_title else task.capitalize()


def catalog() -> dict[str, Any]:
    ids = list(dict.fromkeys([*TASKS, *(name.split(".")[0] for name in JOBS)]))
    tasks = [
        {
            "id": task,
            "title": task_title(task),
            "jobs": [name for name in JOBS if name.split(".")[0] == task],
            "hints": HINTS.get(task, {}),
        }
        for task in ids
    ]
    return {
        "format": FORMAT,
        "tasks": [t for t in tasks if t["jobs"]],
        "jobs": {name: job_entry(spec) for name, spec in JOBS.items()},
    }


def dumps() -> str:
    return json.dumps(catalog(), indent=1, sort_keys=False) + "\n"


def write(path: str | Path) -> None:
    Path(path).write_text(dumps(), encoding="utf-8")
