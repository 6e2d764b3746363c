"""How the installer starts other programs from inside QGIS (standard library only)."""

from __future__ import annotations

import os
import subprocess
import sys

# QGIS on Windows (OSGeo4W) points these at its own bundled Python; inherited, they would break another one.
FOREIGN_PYTHON_VARS = ("PYTHONHOME", "PYTHONPATH")
# No console window flashing up for each command when QGIS runs on Windows.
NO_WINDOW = {"creationflags": subprocess.CREATE_NO_WINDOW} if sys.platform == "win32" else {}


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without QGIS's Python settings, unbuffered UTF-8 output, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_PYTHON_VARS}
    env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    env.update(extra or {})
    return env
