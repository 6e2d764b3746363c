"""Running an installation plan: each command's output streamed to a log, cancel, and the completion marker."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from rs_peft_qgis.installer.plan import InstallPlan, Step
from rs_peft_qgis.installer.processes import NO_WINDOW, clean_env


def _show(argv: list[str]) -> str:
    return subprocess.list2cmdline(argv) if sys.platform == "win32" else shlex.join(argv)


def _venv_folder_problem(venv: Path) -> str | None:
    # `venv --clear` empties the folder, so never point it at one that holds anything else.
    if venv.exists() and not venv.is_dir():
        return f"{venv} is a file, not a folder: choose another place for the backend environment."
    if venv.is_dir() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").is_file():
        return (
            f"The folder {venv} already holds other files and is not a Python environment: choose an empty or new"
            " folder for the backend environment."
        )
    return None


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    # This thread owns the pipe and closes it: closing it from another thread would block while a read is
    # pending, i.e. for as long as anything the command started keeps the pipe open.
    with contextlib.suppress(ValueError, OSError), stream:
        for line in stream:
            lines.put(line.rstrip("\r\n"))
    lines.put(None)


def _signal(proc: subprocess.Popen[str], *, hard: bool) -> None:
    if os.name == "posix":
        # The whole process group: pip starts helpers (build backends) that would outlive it otherwise.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
    elif hard:
        proc.kill()
    else:
        # TerminateProcess ends only the process itself; taskkill /T also ends the processes it started.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, timeout=10, **NO_WINDOW
            )
        if proc.poll() is None:
            proc.terminate()


def _stop(proc: subprocess.Popen[str]) -> None:
    """Terminate, then kill after 5 s; on POSIX also kill anything left in its process group."""
    if proc.poll() is None:
        _signal(proc, hard=False)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _signal(proc, hard=True)
            proc.wait()
    if os.name == "posix":
        _signal(proc, hard=True)


def _run_step(step: Step, emit: Callable[[str], None], is_cancelled: Callable[[], bool]) -> int | None:
    """Run one command, streaming its output; its exit code, or None when cancelled."""
    try:
        proc = subprocess.Popen(
            step.argv,
            cwd=step.cwd,
            env=clean_env(step.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=os.name == "posix",
            **NO_WINDOW,
        )
    except OSError as exc:
        emit(f"Could not start {step.argv[0]}: {exc}")
        return 127
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    # A reader thread, so a silent command (a long download) can still be cancelled.
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), name="installer-output", daemon=True)
    reader.start()
    try:
        while True:
            if is_cancelled():
                _stop(proc)
                return None
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                if proc.poll() is not None:
                    reader.join(timeout=1)  # let the last lines through
                    if reader.is_alive():  # something it started still holds the pipe: do not wait for that
                        break
                continue
            if line is None:
                break
            emit(line)
        with contextlib.suppress(queue.Empty):
            while (line := lines.get_nowait()) is not None:
                emit(line)
        while proc.poll() is None:  # output closed but the process still running
            if is_cancelled():
                _stop(proc)
                return None
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
        return proc.returncode
    finally:
        if proc.poll() is None:
            _stop(proc)
        reader.join(timeout=0.2)  # done already, unless a leftover helper holds the pipe


def run_plan(plan: InstallPlan, on_line: Callable[[str], None], is_cancelled: Callable[[], bool]) -> bool:
    """Run the plan's steps in order; True when all succeeded and the venv is marked installed.

    Every output line goes to `on_line` and is appended to `plan.log_path`. A failing step stops the run
    with a line naming it; cancelling stops the running command. Either way the unfinished venv is left
    without the marker, so nothing uses it.
    """
    steps = plan.steps()
    plan.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(plan.log_path, "a", encoding="utf-8") as log:

        def emit(line: str) -> None:
            log.write(line + "\n")
            log.flush()
            on_line(line)

        emit(f"=== Backend installation, {datetime.now(UTC).astimezone():%Y-%m-%d %H:%M:%S %Z} ===")
        problem = _venv_folder_problem(plan.venv)
        if problem:
            emit(problem)
            return False
        # The environment is about to change: it is not usable again until every step has succeeded.
        plan.marker.unlink(missing_ok=True)
        if plan.torch_index_reason:
            emit(plan.torch_index_reason)
        for number, step in enumerate(steps, 1):
            where = f"step {number} of {len(steps)} ({step.label})"
            if is_cancelled():
                code = None
            else:
                emit(f"Step {number} of {len(steps)}: {step.label}")
                emit(f"$ {_show(step.argv)}")
                code = _run_step(step, emit, is_cancelled)
            if code is None:
                emit(
                    f"Installation cancelled at {where}. The unfinished environment in {plan.venv} will not be"
                    " used; run the installer again to finish it."
                )
                return False
            if code != 0:
                emit(f"(the command ended with exit code {code})")
                if step.optional:
                    emit(
                        f"{where[0].upper()}{where[1:]} did not succeed; the backend works without it. Run it again "
                        "later from Backend diagnostics (Download missing models)."
                    )
                    continue
                emit(f"Installing the backend failed at {where}: see {plan.log_path}")
                return False
        record = {
            "torch": plan.torch_spec,
            "torch_index": plan.torch_index_url,
            "base_python": plan.base_python,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        plan.marker.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        emit(f"The backend is installed in {plan.venv}.")
        return True
