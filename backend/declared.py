"""The job catalog as `resources/jobs.json` holds it, read without importing a single job module.

The CLI builds its parser (`--help` included) and the worker answers `initialize` from it, so neither waits
for torch and the method packages before they are needed. A test keeps the file equal to the live catalog
(backend/jobs/catalog.py); methods registered through RS_PEFT_QGIS_METHODS are not in the file, so with that
variable set the live catalog is used instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from backend import EXTRA_METHODS_ENV

CATALOG_FILE = Path(__file__).resolve().parents[1] / "resources" / "jobs.json"


def jobs() -> dict[str, dict[str, Any]]:
    """Job name -> its catalog entry (title, summary, params with type/choices/default/help, outputs)."""
    if not os.environ.get(EXTRA_METHODS_ENV) and CATALOG_FILE.is_file():
        return json.loads(CATALOG_FILE.read_text(encoding="utf-8"))["jobs"]
    from backend.jobs.catalog import catalog  # other methods are registered: the live catalog knows them

    return catalog()["jobs"]
