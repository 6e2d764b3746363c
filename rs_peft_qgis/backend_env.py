"""Where the backend code and its Python live (standard library only)."""

from __future__ import annotations

import os
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parent
# Debian's QGIS ships python3-platformdirs 2.6 only; this is its user_data_dir on Linux.
USER_DATA_DIR = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "rs-peft-qgis"


def backend_root() -> Path:
    """The folder holding `backend/`: the plugin folder when packaged, the repository in a checkout."""
    for candidate in (PLUGIN_DIR, *PLUGIN_DIR.parents[:3]):
        if (candidate / "backend" / "protocol.py").is_file():
            return candidate
    raise FileNotFoundError("backend/ not found next to the plugin")


def candidate_pythons() -> list[Path]:
    """Backend interpreters to try, best first: a checkout's .venv, then the installer's venv if it finished."""
    from rs_peft_qgis import installer  # it imports this module

    found = [p / ".venv" / "bin" / "python" for p in (PLUGIN_DIR, *PLUGIN_DIR.parents[:3])]
    venv = USER_DATA_DIR / "venv"
    if installer.is_installed(venv):  # a failed or cancelled install is never used
        found.append(installer.venv_python(venv))
    return found


def find_backend_python(configured: str | None = None) -> Path | None:
    """The configured interpreter if it exists, else the first candidate that does."""
    if configured:
        path = Path(configured).expanduser()
        return path if path.is_file() else None
    return next((p for p in candidate_pythons() if p.is_file()), None)
