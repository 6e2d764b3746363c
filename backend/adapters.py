"""The adapter library: fine-tuned adapters saved as safetensors + JSON metadata.

Each adapter is a folder `<data dir>/adapters/<name>/` holding `adapter.safetensors` (tensors only:
loading never unpickles anything) and `adapter.json`. Saves are atomic (written to a temporary
folder, then renamed). `RS_PEFT_QGIS_DATA_DIR` overrides the platformdirs data folder.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from backend.protocol import INVALID_INPUT, JobError

WEIGHTS = "adapter.safetensors"
META = "adapter.json"
FORMAT_VERSION = 1


@dataclass
class AdapterMeta:
    """Everything needed to apply an adapter correctly to another raster."""

    method: str  # "filf" | "weft" | "spectralx" | "panadapter"
    backbone: str  # registry model name, e.g. "mobile_sam"
    checkpoint_sha256: str | None  # SHA-256 of the backbone file it was trained on; None = random init
    bands: list[int]  # 1-based band indexes of the training raster(s)
    normalization: dict[str, list[float]]  # {"mean": [...], "std": [...]} per band
    classes: list[str] = field(default_factory=list)
    training_area: dict[str, Any] | None = None  # {"bounds": [l, b, r, t], "crs": "EPSG:..."}
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # method hyper-parameters (rank, ...)
    name: str = ""
    created_at: str = ""
    format_version: int = FORMAT_VERSION


def library_dir() -> Path:
    """RS_PEFT_QGIS_ADAPTER_DIR if set (QGIS's settings), else `adapters` in the data folder."""
    import platformdirs

    if os.environ.get("RS_PEFT_QGIS_ADAPTER_DIR"):
        return Path(os.environ["RS_PEFT_QGIS_ADAPTER_DIR"])
    base = os.environ.get("RS_PEFT_QGIS_DATA_DIR") or platformdirs.user_data_dir("rs-peft-qgis", appauthor=False)
    return Path(base) / "adapters"


def sanitize(name: str) -> str:
    """A safe folder name: letters, digits, '-', '_' and '.', no leading dot, at most 80 characters."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")[:80]
    if not clean:
        raise JobError(
            INVALID_INPUT, f"'{name}' cannot be used as an adapter name.", "Use letters, digits, '-' or '_'."
        )
    return clean


def save(name: str, tensors: dict[str, torch.Tensor], meta: AdapterMeta, overwrite: bool = False) -> Path:
    """Store an adapter; refuses to replace an existing one unless `overwrite`."""
    safe = sanitize(name)
    root = library_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / safe
    if final.exists() and not overwrite:
        raise JobError(
            INVALID_INPUT, f"An adapter named '{safe}' already exists.", "Choose another name or delete it first."
        )
    meta.name = safe
    meta.created_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    tmp = root / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(asdict(meta), indent=2), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _folder(name: str) -> Path:
    folder = library_dir() / sanitize(name)
    if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
        raise JobError(INVALID_INPUT, f"There is no adapter named '{name}'.", "See the adapter list for the names.")
    return folder


def read_meta(name: str) -> AdapterMeta:
    raw = json.loads((_folder(name) / META).read_text(encoding="utf-8"))
    known = {k: v for k, v in raw.items() if k in AdapterMeta.__dataclass_fields__}
    return AdapterMeta(**known)


def load(name: str) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    folder = _folder(name)
    return load_file(str(folder / WEIGHTS)), read_meta(name)


def list_adapters() -> list[dict[str, Any]]:
    root = library_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            meta = read_meta(folder.name)
        except (JobError, json.JSONDecodeError, TypeError):
            continue  # an unreadable folder is not an adapter; never let it break the list
        out.append({**asdict(meta), "size_bytes": (folder / WEIGHTS).stat().st_size, "path": str(folder)})
    return out


def delete(name: str) -> None:
    shutil.rmtree(_folder(name))


def check_compatible(meta: AdapterMeta, method: str, backbone: str, band_count: int) -> None:
    """Refuse, in plain words, an adapter trained for another method, backbone or band count."""
    if meta.method != method:
        raise JobError(INVALID_INPUT, f"The adapter '{meta.name}' was trained for {meta.method}, not {method}.")
    if meta.backbone != backbone:
        raise JobError(
            INVALID_INPUT,
            f"The adapter '{meta.name}' was trained on the {meta.backbone} backbone, but this job uses {backbone}.",
            f"Choose the {meta.backbone} backbone, or fine-tune a new adapter.",
        )
    if len(meta.bands) != band_count:
        raise JobError(
            INVALID_INPUT,
            f"The adapter '{meta.name}' expects {len(meta.bands)} band(s) (bands {meta.bands}), "
            f"but the raster provides {band_count}.",
            "Choose the same bands as during fine-tuning.",
        )
