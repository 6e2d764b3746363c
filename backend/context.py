"""The run context every job gets: progress, logging, cancellation and atomic outputs."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
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
)

log = logging.getLogger("backend")


class Cancelled(Exception):
    """Raised inside a job when the user cancelled it."""


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
    out_dir: Path | None = None  # set by prepare_out_dir(); every output must lie directly in it
    _pending: list[tuple[Path, Path]] = field(default_factory=list)
    _created: list[Path] = field(default_factory=list)
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

    def prepare_out_dir(self, out_dir: str) -> Path:
        """Create the output folder and check it is writable; outputs are then confined to it.

        The folder is noted in the journal until the job ends, so that a process killed mid-job has its
        `.partial-*` files removed by the next worker (clean_stale_partials)."""
        wanted = Path(out_dir).expanduser().resolve()
        missing = [d for d in (wanted, *wanted.parents) if not d.exists()]
        self.out_dir = prepare_out_dir(out_dir)
        self._created = missing  # deepest first: removed again if the job fails (discard_outputs)
        try:
            journal_dir().mkdir(parents=True, exist_ok=True)
            entry = {"pid": os.getpid(), "out_dir": str(self.out_dir)}
            (journal_dir() / f"{self.job_id}.json").write_text(json.dumps(entry), encoding="utf-8")
        except OSError:
            log.warning("cannot write the job journal in %s", journal_dir())  # only the clean-up is lost
        return self.out_dir

    def end(self) -> None:
        """The job is over (committed or discarded): its journal entry goes."""
        (journal_dir() / f"{self.job_id}.json").unlink(missing_ok=True)

    def output_path(self, final: Path) -> Path:
        """A temporary path to write output `final` to; it is renamed to `final` when the job commits."""
        # Names are checked where they are given (params.check_file_name); this is the guarantee behind it.
        if self.out_dir is None or final.parent.resolve() != self.out_dir or final.name in ("", ".", ".."):
            raise JobError(
                INVALID_INPUT,
                f"The output {final} is not inside the output folder {self.out_dir}.",
                "Use an output name without folders in it.",
            )
        if final.resolve() in self.inputs:
            raise JobError(
                INVALID_INPUT,
                f"The output {final} would overwrite one of the inputs.",
                "Choose another output folder or output name.",
            )
        tmp = final.with_name(f".partial-{self.job_id}-{final.name}")
        self._pending.append((tmp, final))
        return tmp

    def pending_path(self, final: Path) -> Path:
        """The temporary path that `output_path` gave for `final` (to rewrite an output before it commits)."""
        return next(tmp for tmp, f in self._pending if f == final)

    def commit_outputs(self) -> None:
        for tmp, final in self._pending:
            os.replace(tmp, final)
        self._pending.clear()

    def discard_outputs(self) -> None:
        """Remove what a failed job wrote: its partial files and the folders it created for them."""
        for tmp, _ in self._pending:
            for p in (tmp, tmp.with_name(tmp.name + ".aux.xml")):
                p.unlink(missing_ok=True)
        self._pending.clear()
        for folder in self._created:
            try:
                folder.rmdir()  # only while empty: nothing else is ever removed
            except OSError:
                break
        self._created = []


def data_dir() -> Path:
    """The backend's own data folder (adapters, job journal): RS_PEFT_QGIS_DATA_DIR or the platform's."""
    import platformdirs

    base = os.environ.get("RS_PEFT_QGIS_DATA_DIR") or platformdirs.user_data_dir("rs-peft-qgis", appauthor=False)
    return Path(base)


def journal_dir() -> Path:
    return data_dir() / "running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or an odd entry): leave its files alone
    try:  # a killed worker its parent (QGIS) has not reaped yet is a zombie: dead, though kill(0) works
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def clean_stale_partials() -> int:
    """Remove the `.partial-*` outputs of jobs whose process died (SIGKILL, power cut); returns how many."""
    removed = 0
    root = journal_dir()
    if not root.is_dir():
        return 0
    for entry in root.glob("*.json"):
        try:
            info = json.loads(entry.read_text(encoding="utf-8"))
            pid, out_dir = int(info["pid"]), Path(info["out_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            entry.unlink(missing_ok=True)
            continue
        if _alive(pid):
            continue
        for partial in out_dir.glob(f".partial-{entry.stem}-*"):
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            else:
                partial.unlink(missing_ok=True)
            removed += 1
        entry.unlink(missing_ok=True)
    return removed


def prepare_out_dir(out_dir: str) -> Path:
    """Create the output folder (and its parents) and check that it is writable; bad input otherwise."""
    path = Path(out_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise JobError(INVALID_INPUT, f"The output folder {path} is a file.", "Choose a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobError(
            INVALID_INPUT,
            f"Cannot create the output folder {path}: {exc.strerror}.",
            "Choose a folder you can write to.",
        ) from None
    if not os.access(path, os.W_OK):
        raise JobError(INVALID_INPUT, f"The output folder {path} is not writable.", "Choose a folder you can write to.")
    return path


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
