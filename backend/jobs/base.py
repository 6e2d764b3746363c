"""What every job shares: declared parameters, the run context, and failure mapping."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.protocol import (
    CANCELLED,
    INTERNAL,
    INVALID_INPUT,
    OUT_OF_MEMORY,
    OUTPUT_ERROR,
    PROGRESS_MAX_RATE_HZ,
    JobError,
    JobResult,
)

log = logging.getLogger("backend")


class Cancelled(Exception):
    """Raised inside a job when the user cancelled it."""


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

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class OutputDecl:
    """A result a job promises (its `key` matches Output.key), so Processing can declare it up front."""

    key: str
    kind: str  # raster | vector
    description: str


@dataclass(frozen=True)
class JobSpec:
    name: str
    summary: str
    params: tuple[Param, ...]
    run: Callable[[JobContext, dict[str, Any]], JobResult]
    title: str = ""  # short action name shown in QGIS, e.g. "Detect (FILF adapter)"
    outputs: tuple[OutputDecl, ...] = ()

    def validate(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Check names and types and fill defaults; raises ValueError with a plain message."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"Unknown parameter(s) for {self.name}: {', '.join(unknown)}")
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name not in raw or raw[p.name] is None:
                if p.required:
                    raise ValueError(f"Missing required parameter '{p.name}' for {self.name}")
                out[p.name] = p.default
                continue
            out[p.name] = _coerce(p, raw[p.name])
        return out


def _coerce(p: Param, value: Any) -> Any:
    try:
        if p.type is bool:
            if isinstance(value, bool):
                v: Any = value
            elif str(value).lower() in ("1", "true", "yes"):
                v = True
            elif str(value).lower() in ("0", "false", "no"):
                v = False
            else:
                raise ValueError
        elif p.type is list:
            items = value if isinstance(value, list) else str(value).replace(" ", "").split(",")
            v = [int(x) for x in items if str(x) != ""]
        elif p.type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            v = int(value)
        elif p.type is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
        else:
            if not isinstance(value, str | int | float):
                raise ValueError
            v = str(value)
    except (TypeError, ValueError):
        raise ValueError(f"Parameter '{p.name}' must be a {p.type.__name__}, got {value!r}") from None
    if p.choices is not None and v not in p.choices:
        raise ValueError(f"Parameter '{p.name}' must be one of {', '.join(map(str, p.choices))}, got {v!r}")
    return v


ProgressFn = Callable[[float, str, str], None]
LogFn = Callable[..., None]  # (level, message, data=None)


@dataclass
class JobContext:
    """Handed to a running job: progress, logging, cancellation and atomic outputs.

    Outputs are written to hidden temporary names in the output folder and renamed to their
    final names only when the whole job succeeded, so a failed or cancelled job leaves nothing
    that looks like a result.
    """

    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    on_progress: ProgressFn | None = None
    on_log: LogFn | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    warnings: list[str] = field(default_factory=list)
    inputs: set[Path] = field(default_factory=set)
    _pending: list[tuple[Path, Path]] = field(default_factory=list)
    _last_progress: float = 0.0

    # --- cancellation -------------------------------------------------------------------
    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled()

    # --- reporting ----------------------------------------------------------------------
    def progress(self, fraction: float, stage: str, message: str = "", force: bool = False) -> None:
        """Report progress; throttled so the pipe never floods (at most ~10 per second)."""
        self.check_cancelled()
        now = time.monotonic()
        if not force and now - self._last_progress < 1.0 / PROGRESS_MAX_RATE_HZ:
            return
        self._last_progress = now
        if self.on_progress:
            self.on_progress(min(max(float(fraction), 0.0), 1.0), stage, message)

    def log(self, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """A line for the user; `data` carries the same facts machine-readably (e.g. an epoch's scores)."""
        log.log(logging.WARNING if level == "warning" else logging.INFO, message)
        if self.on_log:
            if data is None:
                self.on_log(level, message)
            else:
                self.on_log(level, message, data)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        self.log(message, "warning")

    # --- outputs ------------------------------------------------------------------------
    def protect_inputs(self, *paths: str | None) -> None:
        """Remember input files so that no output can ever replace one."""
        self.inputs.update(Path(p).resolve() for p in paths if p)

    def output_path(self, final: Path) -> Path:
        """A temporary path to write output `final` to; it is renamed to `final` when the job commits."""
        if final.resolve() in self.inputs:
            raise JobError(
                INVALID_INPUT,
                f"The output {final} would overwrite one of the inputs.",
                "Choose another output folder or output name.",
            )
        tmp = final.with_name(f".partial-{self.job_id}-{final.name}")
        self._pending.append((tmp, final))
        return tmp

    def commit_outputs(self) -> None:
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self._pending.clear()

    def discard_outputs(self) -> None:
        for tmp, _ in self._pending:
            for p in (tmp, tmp.with_name(tmp.name + ".aux.xml")):
                p.unlink(missing_ok=True)
        self._pending.clear()


def prepare_out_dir(out_dir: str) -> Path:
    """Create the output folder (and its parents) and check that it is writable."""
    path = Path(out_dir).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobError(
            OUTPUT_ERROR,
            f"Cannot create the output folder {path}: {exc.strerror}.",
            "Choose a folder you can write to.",
        ) from None
    if not os.access(path, os.W_OK):
        raise JobError(OUTPUT_ERROR, f"The output folder {path} is not writable.", "Choose a folder you can write to.")
    return path


def run_job(spec: JobSpec, params: dict[str, Any], ctx: JobContext) -> JobResult:
    """Run a job with outputs committed on success and removed on any failure."""
    try:
        result = spec.run(ctx, params)
        ctx.check_cancelled()
        ctx.commit_outputs()
    except BaseException:
        ctx.discard_outputs()
        raise
    result.warnings = list(dict.fromkeys(ctx.warnings + result.warnings))
    return result


def to_job_error(exc: BaseException) -> JobError:
    """Map any exception from a job to the closed set of user-facing failures."""
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, Cancelled | KeyboardInterrupt):
        return JobError(CANCELLED, "The job was cancelled. No output was written.")
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return JobError(
            OUT_OF_MEMORY,
            "The job ran out of memory.",
            "Use a smaller tile size or batch size, or a smaller area of interest.",
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
        return JobError(
            OUTPUT_ERROR,
            f"Could not write the results: {exc.strerror}.",
            "Free disk space or choose another output folder.",
        )
    return JobError(
        INTERNAL,
        f"Unexpected error: {type(exc).__name__}: {exc}",
        "This is a bug in rs-peft-qgis. Please report it with the worker log attached.",
    )
