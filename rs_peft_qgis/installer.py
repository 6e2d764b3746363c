"""Creates the backend's Python environment for a user without a checkout (standard library only).

It runs inside QGIS's Python but imports nothing from qgis, so it is testable on its own; the installer
dialog drives it from a background task. The plan: a venv made by a normal Python >= 3.11 (never
sys.executable: inside QGIS that is QGIS, not a Python), pip, torch from the PyTorch wheel index that suits
this machine's NVIDIA driver and graphics card, the backend's pinned requirements, then
`python -m backend info` as a check. A venv counts as installed only once the marker file is written, at
the very end.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from rs_peft_qgis import backend_env

# backend_env knows what a finished install looks like (it looks for the venv); the installer makes one.
# Re-exported: callers know them as installer.is_installed etc.
from rs_peft_qgis.backend_env import MARKER_NAME, is_installed, venv_python

MIN_PYTHON = (3, 11)
# 3.11 first: the pinned backend requirements are proven on it (CI and the Debian QGIS machines).
BASE_PYTHON_NAMES = ("python3.11", "python3.12", "python3.13", "python3")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# QGIS on Windows (OSGeo4W) points these at its own bundled Python; inherited, they would break another one.
_FOREIGN_PYTHON_VARS = ("PYTHONHOME", "PYTHONPATH")
# No console window flashing up for each command when QGIS runs on Windows.
_NO_WINDOW = {"creationflags": subprocess.CREATE_NO_WINDOW} if sys.platform == "win32" else {}


class InstallerError(RuntimeError):
    """A problem the user has to fix before the installer can run; the message says how."""


@dataclass(frozen=True)
class CudaWheelIndex:
    """One of PyTorch's CUDA wheel indexes and what the machine needs to use it."""

    url: str
    cuda: str
    min_driver_linux: str
    min_driver_windows: str
    min_compute_capability: tuple[int, int]
    max_compute_major: int | None  # None: newer GPUs run it too (the build ships PTX)

    def supports(self, capability: tuple[int, int]) -> bool:
        # Kernels built for X.Y run on X.Z with Z >= Y, so only the major version caps a build.
        if capability < self.min_compute_capability:
            return False
        return self.max_compute_major is None or capability[0] <= self.max_compute_major


# CUDA builds of torch 2.13 (the pin in requirements/torch.txt), newest first; re-check when the pin moves.
# * Which builds exist: PyTorch's RELEASE.md "Release Compatibility Matrix": 2.13 ships stable CUDA 12.6 and
#   13.0 (13.2 experimental, not used here); there is no 2.13 build for CUDA 12.8 (last: 2.11) or 11.8 (last:
#   2.7). Its "PyTorch CUDA Support Matrix" gives the GPUs of each build: 12.6.3 Maxwell 5.0 .. Hopper 9.0;
#   13.0.2 Turing 7.5 .. Blackwell 10.0/12.0 + PTX. URLs: https://download.pytorch.org/whl/<cuXYZ> as on
#   pytorch.org/get-started (cu126, cu130; cpu for no GPU).
# * Driver minimums: NVIDIA CUDA Toolkit release notes (13.2 Update 2), Table 2 "minimum required driver for
#   CUDA minor version compatibility" (12.x >= 525, 13.x >= 580) and Table 3 "toolkit driver versions":
#   CUDA 12.0 GA Linux >= 525.60.13 / Windows >= 527.41, CUDA 13.0 GA Linux >= 580.65.06 (Windows: none
#   listed, so Table 2's 580). PyTorch wheels bring their own CUDA runtime, so minor version compatibility
#   lets any driver from its CUDA major's minimum run them.
TORCH_WHEEL_INDEXES: tuple[CudaWheelIndex, ...] = (
    CudaWheelIndex("https://download.pytorch.org/whl/cu130", "13.0", "580.65.06", "580", (7, 5), None),
    CudaWheelIndex("https://download.pytorch.org/whl/cu126", "12.6", "525.60.13", "527.41", (5, 0), 9),
)


@dataclass(frozen=True)
class TorchIndexChoice:
    """The wheel index to install torch from, and why, in words for the installer dialog."""

    url: str
    cuda: str | None
    reason: str


def _version_tuple(text: str) -> tuple[int, ...] | None:
    text = text.strip()
    if not re.fullmatch(r"\d+(\.\d+)*", text):
        return None
    return tuple(int(part) for part in text.split("."))


def choose_torch_index(
    driver: str | None, compute_capability: str | None = None, *, windows: bool | None = None
) -> TorchIndexChoice:
    """The newest torch build this NVIDIA driver (and graphics card, when known) can run; CPU otherwise."""
    if not driver:
        return TorchIndexChoice(
            CPU_INDEX,
            None,
            "No NVIDIA graphics card was found, so the backend will run on the processor (slower, but everything"
            " works).",
        )
    version = _version_tuple(driver)
    if version is None:
        return TorchIndexChoice(
            CPU_INDEX,
            None,
            f"The NVIDIA driver version could not be read ({driver!r}), so the backend will run on the processor.",
        )
    windows = sys.platform == "win32" if windows is None else windows
    capability = _version_tuple(compute_capability or "")
    card = (capability[0], capability[1]) if capability and len(capability) == 2 else None
    fitting = [e for e in TORCH_WHEEL_INDEXES if card is None or e.supports(card)]

    def minimum(entry: CudaWheelIndex) -> str:
        return entry.min_driver_windows if windows else entry.min_driver_linux

    for entry in fitting:
        if version >= (_version_tuple(minimum(entry)) or ()):
            return TorchIndexChoice(
                entry.url,
                entry.cuda,
                f"NVIDIA driver {driver} found: installing PyTorch for CUDA {entry.cuda} so the backend can use the"
                " graphics card.",
            )
    if not fitting:
        return TorchIndexChoice(
            CPU_INDEX,
            None,
            f"This NVIDIA graphics card (compute capability {compute_capability}) is not supported by this PyTorch"
            " version, so the backend will run on the processor.",
        )
    needed = min((minimum(e) for e in fitting), key=lambda v: _version_tuple(v) or ())
    return TorchIndexChoice(
        CPU_INDEX,
        None,
        f"The NVIDIA driver {driver} is too old for the graphics card to be used (version {needed} or newer"
        " is needed), so the backend will run on the processor. Update the NVIDIA driver, then install the backend"
        " again to use the graphics card.",
    )


def torch_index_for_driver(driver: str | None, compute_capability: str | None = None) -> str:
    """PyTorch's wheel index URL for this NVIDIA driver version (None: no NVIDIA GPU, the CPU index)."""
    return choose_torch_index(driver, compute_capability).url


def _nvidia_smi(query: str) -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
            **_NO_WINDOW,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    # nvidia-smi fails (rc != 0) when the driver is not loaded or the field is unknown to an old driver.
    return lines if done.returncode == 0 and lines else None


def detect_cuda() -> str | None:
    """The NVIDIA driver version (e.g. '580.95.05') from nvidia-smi, or None without an NVIDIA GPU/driver."""
    lines = _nvidia_smi("driver_version")
    if not lines or _version_tuple(lines[0]) is None:
        return None
    return lines[0]  # one line per GPU, all the same driver


def detect_compute_capability() -> str | None:
    """The first GPU's compute capability (e.g. '8.6'), or None where nvidia-smi cannot say."""
    lines = _nvidia_smi("compute_cap")
    if not lines or _version_tuple(lines[0]) is None:
        return None
    return lines[0]


def find_base_python() -> str | None:
    """A Python >= 3.11 with a working venv module to create the environment with, or None."""
    check = "import sys, venv, ensurepip; print(tuple(sys.version_info[:2])); print(sys.executable)"
    for name in BASE_PYTHON_NAMES:
        exe = shutil.which(name)
        if exe is None:
            continue
        # Run it: a name on PATH may be a shim that fails (pyenv) or a Debian Python without python3-venv
        # (ensurepip missing, so `-m venv` would fail halfway).
        try:
            done = subprocess.run(
                [exe, "-c", check],
                capture_output=True,
                text=True,
                timeout=10,
                stdin=subprocess.DEVNULL,
                env=_clean_env(),
                **_NO_WINDOW,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        lines = done.stdout.splitlines()
        match = re.fullmatch(r"\((\d+), (\d+)\)", lines[0].strip()) if lines else None
        if done.returncode != 0 or match is None or len(lines) < 2:
            continue
        if (int(match[1]), int(match[2])) >= MIN_PYTHON:
            # The real interpreter, not a shim whose target could change later.
            return lines[1].strip() or exe
    return None


def requirements_dir() -> Path:
    """requirements/ next to backend/ (the repository root in a checkout, the plugin folder when packaged)."""
    return backend_env.backend_root() / "requirements"


def read_torch_spec(path: Path | None = None) -> str:
    """The torch requirement pinned in requirements/torch.txt (e.g. 'torch==2.13.0')."""
    path = path or requirements_dir() / "torch.txt"
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            return line
    raise InstallerError(f"{path} names no torch version.")


def _default_venv() -> Path:
    return backend_env.default_venv()


def _default_log() -> Path:
    return backend_env.USER_DATA_DIR / "install.log"


@dataclass
class Step:
    """One command of an installation, with the short name the progress and error lines use."""

    label: str
    argv: list[str]
    cwd: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class InstallPlan:
    """What the installer will do on this machine; `steps()` are the commands, in order."""

    base_python: str
    torch_index_url: str = CPU_INDEX
    torch_index_reason: str = ""
    venv: Path = field(default_factory=_default_venv)
    torch_spec: str = field(default_factory=read_torch_spec)
    requirements: Path = field(default_factory=lambda: requirements_dir() / "backend.txt")
    backend_root: Path = field(default_factory=backend_env.backend_root)
    log_path: Path = field(default_factory=_default_log)
    fresh: bool = False  # wipe an existing venv first (venv --clear)

    @property
    def python(self) -> Path:
        return venv_python(self.venv)

    @property
    def marker(self) -> Path:
        return self.venv / MARKER_NAME

    def steps(self) -> list[Step]:
        py = str(self.python)
        # pip's progress bars are terminal animations: noise in a log and in the dialog.
        pip_install = [py, "-m", "pip", "install", "--progress-bar", "off"]
        create = [self.base_python, "-m", "venv", *(["--clear"] if self.fresh else []), str(self.venv)]
        return [
            Step("create the Python environment", create),
            Step("update pip", [*pip_install, "--upgrade", "pip"]),
            # --index-url, not --extra-index-url: torch must come from the chosen build's index, never a
            # same-numbered default build from PyPI (environment.md pitfall 10).
            Step("pip install torch", [*pip_install, "--index-url", self.torch_index_url, self.torch_spec]),
            Step("pip install the backend's requirements", [*pip_install, "-r", str(self.requirements)]),
            Step(
                "check the backend",
                [py, "-m", "backend", "info"],
                cwd=self.backend_root,
                env={"PYTHONPATH": str(self.backend_root)},
            ),
        ]

    def commands(self) -> list[list[str]]:
        return [step.argv for step in self.steps()]


def plan_for_this_machine(venv: Path | None = None) -> InstallPlan:
    """The plan for this computer: its Python, its GPU's torch build, the default or given venv folder."""
    base = find_base_python()
    if base is None:
        raise InstallerError(
            "No Python 3.11 or newer was found on this computer. Install Python 3.11 or newer (on Debian or"
            " Ubuntu also the package python3-venv), then try again."
        )
    folder = requirements_dir()
    for name in ("torch.txt", "backend.txt"):
        if not (folder / name).is_file():
            raise InstallerError(f"The plugin is incomplete: {folder / name} is missing. Reinstall the plugin.")
    driver = detect_cuda()
    choice = choose_torch_index(driver, detect_compute_capability() if driver else None)
    venv = venv or _default_venv()
    return InstallPlan(
        base_python=base,
        torch_index_url=choice.url,
        torch_index_reason=choice.reason,
        venv=venv,
        torch_spec=read_torch_spec(folder / "torch.txt"),
        requirements=folder / "backend.txt",
        # Redoing a finished install starts clean, so the torch build follows the current driver; an
        # unfinished one is resumed (pip skips what is already there).
        fresh=is_installed(venv),
    )


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_PYTHON_VARS}
    env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    env.update(extra or {})
    return env


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
                ["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, timeout=10, **_NO_WINDOW
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
            env=_clean_env(step.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=os.name == "posix",
            **_NO_WINDOW,
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
