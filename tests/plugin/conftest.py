"""Plugin tests run in QGIS's own Python (.venv-qgis) with a real headless QGIS (pytest-qgis)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
BACKEND_PYTHON = ROOT / ".venv" / "bin" / "python"
LEVIR = ROOT / "tests" / "data" / "levir_cd"
