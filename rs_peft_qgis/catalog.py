"""The backend's job catalog (resources/jobs.json) as plain objects: forms and algorithms are built from it.

Written by `python -m backend catalog --write resources/jobs.json`; a backend test keeps it equal to the
jobs the worker really runs, so a task whose backend lands appears here without plugin code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from rs_peft_qgis.backend_env import backend_root

FORMAT = 2  # the catalog format this plugin reads
LAYER_KINDS = ("raster", "vector", "polygons", "layer")
CATALOG_ENV = "RS_PEFT_QGIS_CATALOG"  # another catalog file (see load)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: str  # str | int | float | bool | list
    kind: str  # raster|vector|polygons|layer|folder|adapter|field|bands, or string|int|float|bool|ints
    parent: str
    required: bool
    default: Any
    choices: tuple[Any, ...] | None
    editable: bool  # the choices are suggestions: other values are allowed too ("cuda:1")
    minimum: float | None  # numbers: the range and step of a spin box (None: no limit / a generic step)
    maximum: float | None
    step: float | None
    group: str  # inputs | method | finetune | tiling | device | output
    prominent: bool  # an optional setting shown with the inputs, not folded under "Advanced"
    help: str

    @property
    def label(self) -> str:
        """The name as an analyst reads it: 'tile_size' -> 'Tile size'."""
        words = self.name.replace("_", " ")
        known = {"aoi": "Area of interest", "out dir": "Output folder", "cluster": "Run on a Ray cluster"}
        return known.get(words, words[:1].upper() + words[1:])

    @property
    def is_layer(self) -> bool:
        return self.kind in LAYER_KINDS


@dataclass(frozen=True)
class OutputInfo:
    key: str
    kind: str  # raster | vector
    description: str


@dataclass(frozen=True)
class JobInfo:
    name: str  # "<task>.<verb>"
    task: str
    title: str
    summary: str
    params: tuple[ParamInfo, ...]
    outputs: tuple[OutputInfo, ...]
    method: str | None  # the adapter method the job trains or applies ("filf", "panadapter"…)
    stages: dict[str, str] = field(hash=False)  # stage id -> title shown to the analyst; {} when single-stage

    def param(self, name: str) -> ParamInfo | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def trains(self) -> bool:
        """A fine-tuning job (it saves an adapter rather than writing layers)."""
        return self.param("adapter_name") is not None


@dataclass(frozen=True)
class TaskInfo:
    id: str
    title: str
    jobs: tuple[str, ...]
    hints: dict[str, Any] = field(hash=False)  # task-specific constants for its form hook (form_hooks)


@dataclass(frozen=True)
class Catalog:
    tasks: tuple[TaskInfo, ...]
    jobs: dict[str, JobInfo]

    def task_jobs(self, task: str) -> list[JobInfo]:
        return [j for j in self.jobs.values() if j.task == task]

    def task(self, task_id: str) -> TaskInfo | None:
        return next((t for t in self.tasks if t.id == task_id), None)

    def param_choices(self, name: str) -> tuple[Any, ...]:
        """The choices of the parameter `name` (the first job that has it with choices), e.g. the devices."""
        params = (j.param(name) for j in self.jobs.values())
        return next((p.choices for p in params if p is not None and p.choices), ())


def parse(data: dict[str, Any]) -> Catalog:
    if data.get("format") != FORMAT:
        raise ValueError(
            f"The job catalog has format {data.get('format')!r}; this plugin reads format {FORMAT}. "
            "Reinstall the plugin (or run `make catalog` in a checkout)."
        )
    jobs = {
        name: JobInfo(
            name=name,
            task=j["task"],
            title=j["title"],
            summary=j["summary"],
            params=tuple(
                ParamInfo(**{**p, "choices": tuple(p["choices"]) if p["choices"] else None}) for p in j["params"]
            ),
            outputs=tuple(OutputInfo(**o) for o in j["outputs"]),
            method=j["method"],
            stages=dict(j["stages"]),
        )
        for name, j in data["jobs"].items()
    }
    tasks = tuple(TaskInfo(t["id"], t["title"], tuple(t["jobs"]), dict(t["hints"])) for t in data["tasks"])
    return Catalog(tasks, jobs)


def load(path: str | None = None) -> Catalog:
    """The catalog at `path`, else the file RS_PEFT_QGIS_CATALOG names, else the one shipped with the plugin.

    The variable is for developing a method outside the plugin: the backend registers it (RS_PEFT_QGIS_METHODS),
    `python -m backend catalog --write my.json` lists its jobs, and QGIS started with
    RS_PEFT_QGIS_CATALOG=my.json offers them in the panel, the settings and Processing alike.
    """
    file = path or os.environ.get(CATALOG_ENV) or backend_root() / "resources" / "jobs.json"
    return _read(Path(file).expanduser().resolve())


@lru_cache(maxsize=4)
def _read(file: Path) -> Catalog:
    return parse(json.loads(file.read_text(encoding="utf-8")))
