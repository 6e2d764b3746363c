"""The adapter library: fine-tuned adapters saved as safetensors + JSON metadata.

Each adapter is a folder `<data dir>/adapters/<name>/` holding `adapter.safetensors` (tensors only:
loading never unpickles anything) and `adapter.json`. Saves are atomic (written to a temporary
folder, then renamed). `RS_PEFT_QGIS_DATA_DIR` overrides the platformdirs data folder.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.context import data_dir
from backend.protocol import INVALID_INPUT, JobError

WEIGHTS = "adapter.safetensors"
META = "adapter.json"
FORMAT_VERSION = 1

if TYPE_CHECKING:  # torch loads with the first job, not to list the library
    import torch


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
    if os.environ.get("RS_PEFT_QGIS_ADAPTER_DIR"):
        return Path(os.environ["RS_PEFT_QGIS_ADAPTER_DIR"])
    return data_dir() / "adapters"


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
    from safetensors.torch import save_file

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
    folder = _folder(name)
    path = folder / META
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise damaged(path, f"it is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise damaged(path, "it holds no JSON object")
    missing = [k for k in ("method", "backbone", "checkpoint_sha256", "bands", "normalization") if k not in raw]
    if missing:
        raise damaged(path, f"it lacks {', '.join(missing)}")
    meta = AdapterMeta(**{k: v for k, v in raw.items() if k in AdapterMeta.__dataclass_fields__})
    problem = _meta_problem(meta)
    if problem:
        raise damaged(path, problem)
    meta.name = folder.name  # the folder is the name the analyst sees and picks
    return meta


def damaged(path: Path, problem: str) -> JobError:
    return JobError(
        INVALID_INPUT,
        f"The adapter file {path} is damaged: {problem}.",
        "Delete this adapter and fine-tune it again, or restore the folder from a backup.",
    )


def _finite_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    )


def _meta_problem(meta: AdapterMeta) -> str:
    """What is wrong with an adapter.json's values, or "" (types, ranges: a hand-edited file)."""
    if not isinstance(meta.method, str) or not isinstance(meta.backbone, str):
        return "method and backbone must be text"
    if meta.checkpoint_sha256 is not None and not isinstance(meta.checkpoint_sha256, str):
        return "checkpoint_sha256 must be text or null"
    if not isinstance(meta.bands, list) or not meta.bands:
        return "bands must be a list of band numbers"
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in meta.bands):
        return "bands must be whole numbers from 1"
    norm = meta.normalization
    if not isinstance(norm, dict) or not all(_finite_list(v) for v in norm.values()):
        return "normalization must map names to lists of finite numbers"
    if any(min(v) <= 0 for k, v in norm.items() if "std" in k or "scale" in k):
        return "a normalization std or scale is zero or negative (it would divide by zero)"
    for key, kind in (("classes", list), ("metrics", dict), ("config", dict)):
        if not isinstance(getattr(meta, key), kind):
            return f"{key} must be a {'list' if kind is list else 'JSON object'}"
    if meta.training_area is not None and not isinstance(meta.training_area, dict):
        return "training_area must be a JSON object or null"
    if not isinstance(meta.format_version, int) or meta.format_version > FORMAT_VERSION:
        return f"its format version {meta.format_version!r} is not one this version reads ({FORMAT_VERSION})"
    return ""


def weights_file(name: str) -> Path:
    """The adapter's tensors file (its modification time tells a changed adapter)."""
    return _folder(name) / WEIGHTS


def load(name: str) -> tuple[dict[str, torch.Tensor], AdapterMeta]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_meta(name)
    path = _folder(name) / WEIGHTS
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:  # a truncated file, or not safetensors at all
        raise damaged(path, f"its tensors cannot be read ({str(exc)[:120]})") from None


def list_adapters() -> list[dict[str, Any]]:
    root = library_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            meta = read_meta(folder.name)
        except JobError:
            continue  # a damaged folder is not an adapter; never let it break the list
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
