"""A method spec: everything the generic jobs need to fine-tune and apply one paper's method.

Each package under backend/methods/ builds one `MethodSpec` and calls `register(spec)` when imported (as HF
PEFT's tuners register themselves); `backend.jobs` then offers `<task>.finetune` and `<task>.<apply_verb>`
for it, with the generic parameter groups, and the catalog, CLI, worker, dock and Processing follow.
Methods outside this folder (a lab's own, or a test's) register by module name in RS_PEFT_QGIS_METHODS.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from rasterio.windows import Window
from torch import nn

from backend import EXTRA_METHODS_ENV
from backend.adapters import AdapterMeta
from backend.context import JobContext
from backend.io.raster import Grid
from backend.params import OutputDecl, Param
from backend.protocol import JobResult
from backend.training.loop import FitResult, Recipe

RANDOM_BACKBONE_SEED = 0  # randomly initialised frozen weights are rebuilt identically when applying


class Sink(Protocol):
    """Where predicted tiles go (a context manager): `write` per window, `finish` after the last one."""

    def __enter__(self) -> Sink: ...
    def __exit__(self, *exc: object) -> None: ...
    def write(self, win: Window, values: np.ndarray, valid: np.ndarray) -> None: ...
    def finish(self) -> JobResult: ...


@dataclass
class Training:
    """What a method read for fine-tuning: enough to build the model, its recipe and the adapter's metadata."""

    bands: list[int]
    dtype: np.dtype
    normalization: dict[str, list[float]]
    grid: Grid  # the training area
    config: dict[str, Any]  # what `build` needs again when applying (rank, ratio …), saved in the adapter
    recipe: Callable[[nn.Module, str], Recipe]  # (model, device) -> the training recipe
    classes: list[str] = field(default_factory=list)
    areas: int = 1
    report: Callable[[nn.Module, FitResult], dict[str, Any]] = lambda model, result: {}
    # Adapter tensors to start from (an earlier stage's adapter): those the model shares are loaded before training.
    init_state: dict[str, torch.Tensor] | None = None


@dataclass
class Application:
    """What a method opened for applying an adapter: the output grid, a tile reader, the forward pass and the
    outputs. `read(win)` -> (stack (C, h, w) float32, valid (h, w)); `predict(model, x)` -> (B, K, h, w)."""

    grid: Grid
    read: Callable[[Window], tuple[np.ndarray, np.ndarray]]
    predict: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    channels: int  # K, the predicted channels
    sink: Callable[[int], Sink]  # (block size) -> the outputs
    tile: int  # the tile size when the job gives none
    activity: str  # progress wording, e.g. "detecting changes"
    tiles_share: float = 0.9  # of the progress bar, for the tiles (the sink's `finish` takes the rest)
    stage: str | None = None  # the model's stage to run (multi-stage methods)
    close: Callable[[], None] = lambda: None
    overlap: int | None = None  # with `tile`, when the job gives neither (None: a quarter of the tile)
    output_bytes_per_pixel: float = 5.0  # uncompressed, all outputs (default: float32 probability + uint8 mask)
    # Scene-wide values `open` computed (SpectralX's normalization): a cluster run computes them once, on its driver,
    # and its actors' `open` takes them back from p["scene"] instead of reading the whole scene again.
    scene: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pretraining:
    """A first training stage on unlabelled imagery offered as a job of its own, `<task>.<verb>` (SpectralX's
    landcover.adapt); it saves an adapter that the fine-tune job's `init_adapter` starts from."""

    verb: str
    title: str
    summary: str
    params: tuple[Param, ...]
    prepare: Callable[[JobContext, dict[str, Any]], Training]


@dataclass(frozen=True)
class MethodSpec:
    name: str  # adapter method id, saved in every adapter: "filf"
    task: str  # the job prefix: "change"
    title: str  # the paper's name: "FILF"
    # The analyst's backbone choices -> registry names of the frozen parts loaded for it (main part first).
    backbones: dict[str, tuple[str, ...]]
    default_backbone: str
    build: Callable[[str, dict[str, Any], int, dict[str, str | None]], nn.Module]  # (backbone, config, bands, ckpts)
    finetune_summary: str
    finetune_params: tuple[Param, ...]  # inputs and options of this method (the generic groups are added)
    prepare: Callable[[JobContext, dict[str, Any]], Training]
    apply_summary: str
    apply_params: tuple[Param, ...]
    open: Callable[[JobContext, dict[str, Any], AdapterMeta], Application]
    outputs: tuple[OutputDecl, ...]
    apply_verb: str = "apply"
    stages: dict[str, str] = field(default_factory=dict)  # stage id -> title, for multi-stage methods
    finetune_title: str = ""
    apply_title: str = ""
    task_title: str = ""  # the task in the analyst's words, for a task the product does not know yet
    apply_batch_size: int = 4  # tiles per forward pass by default
    default_tile: int | None = None  # the apply job's tile size (None: from the adapter, see Application.tile)
    # The adapter config keys `build` depends on: adapters that agree on them (and on backbone, bands and
    # checkpoints) share one loaded model in the worker; only their adapter tensors are swapped.
    build_config: tuple[str, ...] = ()
    # The apply job's throughput on a CPU, measured (docs/BENCHMARKS.md), for the pre-flight time estimate.
    cpu_mp_per_s: float | None = None
    pretraining: Pretraining | None = None


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Offer a method (called by its package on import); a second method for the same task is refused, since
    job names are per task."""
    for other in METHODS.values():
        if other.task == spec.task and other.name != spec.name:
            raise ValueError(f"Task '{spec.task}' already has the method {other.name}; {spec.name} cannot join it.")
    METHODS[spec.name] = spec
    return spec


def discover() -> dict[str, MethodSpec]:
    """Import every method package here and the modules named in RS_PEFT_QGIS_METHODS (comma-separated)."""
    here = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules(importlib.import_module(here).__path__):
        if info.ispkg:
            importlib.import_module(f"{here}.{info.name}")
    for module in filter(None, os.environ.get(EXTRA_METHODS_ENV, "").split(",")):
        importlib.import_module(module.strip())
    return METHODS
