"""The backend's job catalog (resources/jobs.json) as plain objects: forms and algorithms are built from it.

Written by `python -m backend catalog --write resources/jobs.json`; a backend test keeps it equal to the
jobs the worker really runs, so a task whose backend lands appears here without plugin code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from rs_peft_qgis.backend_env import backend_root

LAYER_KINDS = ("raster", "vector", "polygons", "layer")

# Optional settings an analyst should see next to the inputs rather than under "Advanced": the method, the
# sensor whose MTF and band layout the result depends on, and the scale ratio (auto unless the pixel sizes
# do not give a whole number). Kept small on purpose: everything else has a default that rarely needs a look.
PROMINENT = frozenset({"method", "sensor", "ratio"})


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: str  # str | int | float | bool | list
    kind: str  # raster|vector|polygons|layer|folder|adapter|field|bands, or string|int|float|bool|ints
    parent: str
    required: bool
    default: Any
    choices: tuple[Any, ...] | None
    help: str

    @property
    def label(self) -> str:
        """The name as an analyst reads it: 'tile_size' -> 'Tile size'."""
        words = self.name.replace("_", " ")
        return {"aoi": "Area of interest", "out dir": "Output folder"}.get(words, words[:1].upper() + words[1:])

    @property
    def is_layer(self) -> bool:
        return self.kind in LAYER_KINDS

    @property
    def prominent(self) -> bool:
        """An optional setting shown with the inputs, not folded under "Advanced"."""
        return self.name in PROMINENT


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


@dataclass(frozen=True)
class Catalog:
    tasks: tuple[TaskInfo, ...]
    jobs: dict[str, JobInfo]

    def task_jobs(self, task: str) -> list[JobInfo]:
        return [j for j in self.jobs.values() if j.task == task]


def parse(data: dict[str, Any]) -> Catalog:
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
        )
        for name, j in data["jobs"].items()
    }
    tasks = tuple(TaskInfo(t["id"], t["title"], tuple(t["jobs"])) for t in data["tasks"])
    return Catalog(tasks, jobs)


@lru_cache(maxsize=1)
def load(path: str | None = None) -> Catalog:
    """The catalog shipped with the plugin (or the one at `path`)."""
    file = Path(path) if path else backend_root() / "resources" / "jobs.json"
    return parse(json.loads(file.read_text(encoding="utf-8")))
