"""Where the backend code and its Python live (standard library only).

The lowest plugin module: it imports nothing from the plugin. The installer builds on it (it writes the
venv and its marker that `is_installed` reads here), never the other way round.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent
# Debian's QGIS ships python3-platformdirs 2.6 only; this is its user_data_dir on Linux.
USER_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "rs-peft-qgis"
# Written by the installer as its very last step.
MARKER_NAME = ".rs_peft_ok"


def backend_root() -> Path:
    """The folder holding `backend/`: the plugin folder when packaged, the repository in a checkout."""
    for candidate in (PLUGIN_DIR, *PLUGIN_DIR.parents[:3]):
        if (candidate / "backend" / "protocol.py").is_file():
            return candidate
    raise FileNotFoundError("backend/ not found next to the plugin")


def default_venv() -> Path:
    """The folder the installer puts the backend's Python environment in unless told otherwise."""
    return USER_DATA_DIR / "venv"


def venv_python(venv: Path, *, windows: bool | None = None) -> Path:
    """The interpreter inside a venv."""
    windows = sys.platform == "win32" if windows is None else windows
    return venv / "Scripts" / "python.exe" if windows else venv / "bin" / "python"


def is_installed(venv: Path) -> bool:
    """Whether an installer run finished in this venv (a failed or cancelled one leaves no marker)."""
    return (venv / MARKER_NAME).is_file() and venv_python(venv).is_file()


def candidate_pythons() -> list[Path]:
    """Backend interpreters to try, best first: a checkout's .venv, then the installer's venv if it finished."""
    found = [p / ".venv" / "bin" / "python" for p in (PLUGIN_DIR, *PLUGIN_DIR.parents[:3])]
    venv = default_venv()
    if is_installed(venv):  # a failed or cancelled install is never used
        found.append(venv_python(venv))
    return found


def find_backend_python(configured: str | None = None) -> Path | None:
    """The configured interpreter if it exists, else the first candidate that does."""
    if configured:
        path = Path(configured).expanduser()
        return path if path.is_file() else None
    return next((p for p in candidate_pythons() if p.is_file()), None)
