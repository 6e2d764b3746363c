"""Job parameters and outputs: one declaration each, with type, range and choices, grouped the way forms show them.

Every job takes its common parameters from the groups below (inputs by name, AOI/output, tiling, device,
fine-tuning), so a range, a choice list or a help text exists once; a task's own parameters (pansharpening's
PAN, MS, sensor and ratio) are declared once beside its methods. The job catalog exports the same
declarations, and the QGIS side builds its forms from them without listing any parameter by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class OutputDecl:
    """A result a job promises (its `key` matches Output.key), so Processing can declare it up front."""

    key: str
    kind: str  # raster | vector
    description: str


LAYER_KINDS = ("raster", "vector", "polygons", "layer")  # parameters that name an input file
INPUT_KINDS = (*LAYER_KINDS, "field", "bands", "adapter")
# Groups, in the order forms show them.
GROUPS = ("inputs", "method", "finetune", "tiling", "device", "output")


def input_paths(params: tuple[Param, ...], values: dict[str, Any]) -> list[str | None]:
    """The files a job's values name as inputs (to protect them from being overwritten)."""
    return [values[p.name] for p in params if p.kind in LAYER_KINDS]


def in_group_order(params: tuple[Param, ...]) -> tuple[Param, ...]:
    """Parameters ordered by group (GROUPS), keeping their order within a group."""
    return tuple(sorted(params, key=lambda p: GROUPS.index(p.group)))


@dataclass(frozen=True)
class Param:
    """A job parameter; `name` is the worker's snake_case key, the CLI flag is its kebab-case form."""

    name: str
    type: type  # str | int | float | bool | list (comma-separated ints on the CLI)
    help: str
    default: Any = None
    required: bool = False
    choices: tuple[Any, ...] | None = None
    # What the value is, for the QGIS side's forms and Processing algorithms: raster | vector | polygons
    # | layer (raster or vector) | folder | adapter | field (of the layer param named `parent`) | bands;
    # empty = a plain value of `type`.
    kind: str = ""
    parent: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None  # a form's spin-box step (and, for floats, its decimals)
    group: str = ""  # one of GROUPS; default: "inputs" for layers, fields and bands, else "method"
    prominent: bool = False  # an optional setting shown next to the inputs, not under "Advanced"
    editable: bool = False  # `choices` are suggestions: other values pass (checked by the job)
    why: str = ""  # the reason for the range, said when a value is refused
    file_name: bool = False  # the value becomes part of an output file name (check_file_name)

    def __post_init__(self) -> None:
        if not self.group:
            object.__setattr__(self, "group", "inputs" if self.kind in INPUT_KINDS else "method")
        if self.group not in GROUPS:
            raise ValueError(f"Parameter '{self.name}': unknown group {self.group!r}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def but(self, **changes: Any) -> Param:
        """This declaration with another default, help or range (e.g. a job's own default tile size)."""
        return replace(self, **changes)

    @property
    def label(self) -> str:
        """How messages name it: 'The batch size (batch_size)'."""
        return f"The {self.name.replace('_', ' ')} ({self.name})"

    def coerce(self, value: Any) -> Any:
        """The value as this parameter's type, in its range and choices; ValueError in plain words."""
        v = _as_type(self, value)
        if self.choices is not None and not self.editable and v not in self.choices:
            raise ValueError(f"{self.label} must be one of {', '.join(map(str, self.choices))}, not {v!r}.")
        if self.type in (int, float):
            if not math.isfinite(v):
                raise ValueError(f"{self.label} must be a finite number, not {value!r}.")
            why = f": {self.why}" if self.why else ""
            if self.minimum is not None and v < self.minimum:
                raise ValueError(f"{self.label} must be at least {_num(self.minimum)}{why} (given: {v}).")
            if self.maximum is not None and v > self.maximum:
                raise ValueError(f"{self.label} must be at most {_num(self.maximum)}{why} (given: {v}).")
        if self.file_name:
            check_file_name(self, v)
        return v


MAX_NAME = 100  # leaves room for suffixes such as `_change_probability.tif` under the usual 255-byte limit


def check_file_name(p: Param, name: str) -> None:
    """A name that stays one file in the output folder: no folders, no `..`, no hidden or control characters."""
    bad = next((c for c in name if c in '/\\:*?"<>|' or ord(c) < 32), None)
    if bad is not None:
        problem = f"contain {bad!r}"
    elif not name.strip():
        problem = "be empty"
    elif name.startswith("."):
        problem = "start with a dot"
    else:
        problem = ""
    if problem:
        raise ValueError(f"{p.label} is used in file names, so it cannot {problem}: use letters, digits, '-' or '_'.")
    if len(name.encode("utf-8")) > MAX_NAME:
        raise ValueError(f"{p.label} must be at most {MAX_NAME} bytes long (given: {len(name.encode('utf-8'))}).")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _as_type(p: Param, value: Any) -> Any:
    try:
        if p.type is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes"):
                return True
            if str(value).lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if p.type is list:
            items = value if isinstance(value, list) else str(value).replace(" ", "").split(",")
            return [int(x) for x in items if str(x) != ""]
        if p.type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if p.type is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if not isinstance(value, str | int | float):
            raise ValueError
        return str(value)
    except (TypeError, ValueError, OverflowError):
        kind = {int: "a whole number", float: "a number", bool: "true or false", list: "a list of whole numbers"}
        raise ValueError(f"{p.label} must be {kind.get(p.type, 'text')}, not {value!r}.") from None


# --- AOI and output --------------------------------------------------------------------------------------------
OUT_DIR = Param("out_dir", str, "Folder for the results.", required=True, kind="folder", group="output")
AOI = Param(
    "aoi",
    str,
    "Polygon layer: only the area inside it is processed (default: all).",
    kind="polygons",
)
NAME = Param("name", str, "Prefix of the output file names.", group="output", file_name=True)
REFERENCE = Param("reference", str, "Optional reference to score the result against.", kind="raster")

# The two dates of a change pair.
BEFORE = Param(
    "before",
    str,
    "Raster of the first date (its grid is the output grid).",
    required=True,
    kind="raster",
)
AFTER = Param(
    "after",
    str,
    "Raster of the second date (any CRS/resolution; aligned on the fly).",
    required=True,
    kind="raster",
)

# --- tiling ----------------------------------------------------------------------------------------------------
TILE_SIZE = Param(
    "tile_size",
    int,
    "Tile size in pixels (memory grows with its square).",
    minimum=32,
    maximum=16384,
    step=32,
    group="tiling",
)
OVERLAP = Param("overlap", int, "Tile overlap in pixels (blended).", minimum=0, maximum=4096, step=16, group="tiling")
BATCH_SIZE = Param("batch_size", int, "Tiles per forward pass.", minimum=1, maximum=4096, step=1, group="tiling")
TILING = (TILE_SIZE, OVERLAP, BATCH_SIZE)

# --- device ----------------------------------------------------------------------------------------------------
CLUSTER = Param(
    "cluster",
    str,
    "Run on a Ray cluster: local (start one on this machine), auto (the one `ray start` made here), or the head's "
    "address (host:6379 or ray://host:10001). Inputs and the output folder must be reachable from every node. "
    "Empty: this machine only.",
    group="device",
)
DEVICES = ("auto", "cpu", "cuda")
DEVICE = Param(
    "device",
    str,
    "auto (CUDA when available), cpu or cuda (also cuda:1 …).",
    default="auto",
    choices=DEVICES,
    editable=True,
    group="device",
)

# --- fine-tuning -----------------------------------------------------------------------------------------------
ADAPTER_NAME = Param(
    "adapter_name", str, "Name under which the adapter is saved in the library.", required=True, group="inputs"
)
ADAPTER = Param("adapter", str, "Name of an adapter in the library.", required=True, kind="adapter")
ALLOW_RANDOM_BACKBONE = Param(
    "allow_random_backbone",
    bool,
    "Use a random frozen encoder if its weights are missing.",
    default=False,
    group="finetune",
)
EPOCHS = Param(
    "epochs",
    int,
    "Training epochs (early stopping may end sooner).",
    minimum=1,
    maximum=100_000,
    step=1,
    group="finetune",
)
STEPS_PER_EPOCH = Param(
    "steps_per_epoch", int, "Optimisation steps per epoch.", minimum=1, maximum=1_000_000, step=1, group="finetune"
)
TRAIN_BATCH_SIZE = Param("batch_size", int, "Patches per step.", minimum=1, maximum=4096, step=1, group="finetune")
PATCH_SIZE = Param(
    "patch_size", int, "Training patch size in pixels.", minimum=16, maximum=4096, step=16, group="finetune"
)
LR = Param("lr", float, "Learning rate (Adam).", minimum=0.0, maximum=1.0, step=1e-5, group="finetune")
VAL_FRACTION = Param(
    "val_fraction",
    float,
    "Share of the labelled area kept for validation.",
    minimum=0.01,
    maximum=0.99,
    step=0.05,
    group="finetune",
    why="some of the area must train and some validate",
)
PATIENCE = Param(
    "patience",
    int,
    "Stop after this many epochs without a better validation score.",
    minimum=0,
    maximum=10_000,
    step=1,
    group="finetune",
)
CHECKPOINTING = Param(
    "checkpointing",
    str,
    "Recompute the encoder's (and the adapter's heaviest) activations in the backward pass instead of keeping "
    "them: less memory, slower steps (auto: on for CUDA).",
    default="auto",
    choices=("auto", "on", "off"),
    group="finetune",
)
OVERWRITE = Param("overwrite", bool, "Replace an adapter of the same name.", default=False, group="finetune")

# --- maps (probability + mask + polygons) ----------------------------------------------------------------------
THRESHOLD = Param("threshold", float, "Probability threshold.", default=0.5, minimum=0.0, maximum=1.0, step=0.05)
MIN_AREA_M2 = Param(
    "min_area_m2",
    float,
    "Drop polygons smaller than this (square metres).",
    default=0.0,
    minimum=0.0,
    maximum=1e12,
    step=10.0,
    group="output",
)
SIMPLIFY = Param(
    "simplify",
    float,
    "Simplify polygon outlines, tolerance in pixels.",
    default=0.0,
    minimum=0.0,
    maximum=1000.0,
    step=0.5,
    group="output",
)
BANDS = Param("bands", list, "Bands to use, e.g. 1,2,3 (default: all).", kind="bands")
