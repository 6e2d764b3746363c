"""The persistent backend worker: JSON-RPC 2.0 over stdio, one job at a time, others queued.

stdout carries protocol lines only: at start the real stdout is moved to a private file
descriptor and fd 1 is pointed at stderr, so anything a library prints (Python or C) lands in
the log instead of corrupting the pipe.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from collections import deque
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from backend import adapters, declared, weights
from backend import protocol as P
from backend.context import Cancelled, JobContext, clean_stale_partials, to_job_error

if TYPE_CHECKING:
    from backend.jobs.base import JobSpec

log = logging.getLogger("backend")


def log_path() -> Path:
    import platformdirs

    base = os.environ.get("RS_PEFT_QGIS_LOG_DIR") or platformdirs.user_log_dir("rs-peft-qgis", appauthor=False)
    return Path(base) / "worker.log"


def setup_logging() -> Path:
    path = log_path()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(RotatingFileHandler(path, maxBytes=2_000_000, backupCount=2, encoding="utf-8"))
    except OSError:
        pass  # a read-only home must not stop the worker; stderr still has everything
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True
    )
    return path


class Worker:
    def __init__(self, out: TextIO, log_file: Path | None = None) -> None:
        self._out = out
        self._out_lock = threading.Lock()
        self._cv = threading.Condition()
        self._queue: deque[tuple[JobSpec, dict[str, Any], JobContext]] = deque()
        self._current: JobContext | None = None
        self._stopping = False
        self._log_file = log_file
        self._runner = threading.Thread(target=self._run_jobs, name="job-runner", daemon=True)
        self._runner.start()

    # --- pipe -------------------------------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        line = P.encode_safe(msg)
        with self._out_lock:
            self._out.write(line)
            self._out.flush()

    def serve(self, inp: BinaryIO | TextIO) -> None:
        """Answer requests line by line until shutdown or end of input; no line can end the loop."""
        while not self._stopping:
            line = inp.readline(P.MAX_LINE_BYTES + 1)
            if not line:
                break
            if len(line) > P.MAX_LINE_BYTES:  # skip the rest of an over-long line without holding it
                while line and not line.endswith(b"\n" if isinstance(line, bytes) else "\n"):
                    line = inp.readline(P.MAX_LINE_BYTES)
                self.send(P.BadMessage(P.INVALID_REQUEST, "Invalid request: line too long").response())
                continue
            if line.strip():
                self.handle_line(line)
        self.stop()

    def handle_line(self, line: bytes | str) -> None:
        msg_id = None
        try:
            msg = P.decode_request(line)
            msg_id = msg.get("id")
            self._dispatch(msg)
        except P.BadMessage as bad:
            self.send(bad.response())
        except Exception as exc:  # the last resort: a request must never kill the loop
            log.exception("request failed")
            self.send(P.error_response(msg_id, P.INTERNAL_RPC_ERROR, f"Internal error: {type(exc).__name__}"))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        msg_id, params = msg.get("id"), msg.get("params", {})
        handler = {
            P.INITIALIZE: self._initialize,
            P.JOB_START: self._job_start,
            P.JOB_CANCEL: self._job_cancel,
            P.MODELS_LIST: lambda _: {"models": [weights.describe(e) for e in weights.load_registry().values()]},
            P.MODELS_FETCH: self._models_fetch,
            P.ADAPTERS_LIST: lambda _: {"adapters": adapters.list_adapters()},
            P.ADAPTERS_DELETE: self._adapters_delete,
            P.SHUTDOWN: self._shutdown,
        }.get(msg["method"])
        if handler is None:
            reply = P.error_response(msg_id, P.METHOD_NOT_FOUND, f"Method not found: {msg['method'][:100]}")
        else:
            try:
                reply = P.response(msg_id, handler(params))
            except P.JobError as exc:
                reply = P.error_response(msg_id, P.INVALID_PARAMS, exc.message, exc.to_dict())
            except ValueError as exc:
                reply = P.error_response(msg_id, P.INVALID_PARAMS, str(exc)[:2000])
        if "id" in msg:  # a notification is never answered (JSON-RPC 2.0 §4.1), not even with an error
            self.send(reply)

    # --- requests ---------------------------------------------------------------------------
    def _initialize(self, params: dict[str, Any]) -> dict[str, Any]:
        from backend.runtime import environment_info

        info = environment_info()
        info["log_path"] = str(self._log_file) if self._log_file else None
        info["jobs"] = declared.jobs()  # from the catalog file: the job modules load with the first job
        return info

    def _job_start(self, params: dict[str, Any]) -> dict[str, Any]:
        from backend.jobs import JOBS

        name = params.get("job")
        spec = JOBS.get(name) if isinstance(name, str) else None
        if spec is None:
            raise ValueError(f"Unknown job {name!r}; known jobs: {', '.join(sorted(JOBS))}")
        job_params = params.get("params") or {}
        if not isinstance(job_params, dict):
            raise ValueError("job parameters must be an object")
        return self._enqueue(spec, spec.validate(job_params))

    def _models_fetch(self, params: dict[str, Any]) -> dict[str, Any]:
        """Downloads run as queued jobs: job.progress while downloading, job.finished/failed at the end."""
        from backend.jobs import SERVICE_JOBS

        spec = SERVICE_JOBS["models.fetch"]
        values = spec.validate(params)
        weights.get_entry(values["name"])  # unknown names are refused at once
        return self._enqueue(spec, values)

    def _adapters_delete(self, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        if not isinstance(name, str):
            raise ValueError("adapters.delete needs the adapter's name")
        adapters.delete(name)
        return {"deleted": name}

    def _enqueue(self, spec: JobSpec, values: dict[str, Any]) -> dict[str, Any]:
        ctx = JobContext()
        ctx.on_progress = lambda f, stage, message: self.send(
            P.notification(P.JOB_PROGRESS, {"job_id": ctx.job_id, "fraction": f, "stage": stage, "message": message})
        )
        ctx.on_log = lambda level, message, data=None: self.send(
            P.notification(
                P.JOB_LOG,
                {"job_id": ctx.job_id, "level": level, "message": message, **({"data": data} if data else {})},
            )
        )
        with self._cv:
            self._queue.append((spec, values, ctx))
            position = len(self._queue) - (0 if self._current else 1)
            self._cv.notify()
        return {"job_id": ctx.job_id, "queued": position}

    def _job_cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        job_id = params.get("job_id")
        with self._cv:
            if self._current is not None and self._current.job_id == job_id:
                self._current.cancel_event.set()
                return {"job_id": job_id, "cancelled": True}
            for item in list(self._queue):
                if item[2].job_id == job_id:
                    self._queue.remove(item)
                    err = to_job_error(Cancelled())
                    self.send(P.notification(P.JOB_FAILED, {"job_id": job_id, **err.to_dict()}))
                    return {"job_id": job_id, "cancelled": True}
        raise ValueError(f"No running or queued job with id {job_id!r}")

    def _shutdown(self, params: dict[str, Any]) -> dict[str, Any]:
        self._stopping = True
        return {"ok": True}

    # --- job runner -------------------------------------------------------------------------
    def _run_jobs(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._queue:
                    return
                spec, values, ctx = self._queue.popleft()
                self._current = ctx
            log.info("job %s (%s) started", ctx.job_id, spec.name)
            from backend.jobs.base import run_job

            try:
                result = run_job(spec, values, ctx)
            except BaseException as exc:
                err = to_job_error(exc)
                if err.code == P.INTERNAL:
                    log.error("job %s crashed:\n%s", ctx.job_id, "".join(traceback.format_exception(exc)))
                else:
                    log.info("job %s failed: %s %s", ctx.job_id, err.code, err.message)
                self.send(P.notification(P.JOB_FAILED, {"job_id": ctx.job_id, **err.to_dict()}))
            else:
                log.info("job %s finished", ctx.job_id)
                self.send(P.notification(P.JOB_FINISHED, {"job_id": ctx.job_id, **result.to_dict()}))
            finally:
                with self._cv:
                    self._current = None

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job, drop the queue, and wait for the runner to end."""
        with self._cv:
            self._stopping = True
            if self._current is not None:
                self._current.cancel_event.set()
            for _, _, ctx in self._queue:
                self.send(P.notification(P.JOB_FAILED, {"job_id": ctx.job_id, **to_job_error(Cancelled()).to_dict()}))
            self._queue.clear()
            self._cv.notify_all()
        self._runner.join(timeout)


def claim_stdout() -> TextIO:
    """Keep the real stdout for protocol lines only; everything else printed goes to stderr."""
    proto_fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(proto_fd, "w", encoding="utf-8", buffering=1)


def main() -> int:
    out = claim_stdout()
    worker = Worker(out, setup_logging())
    log.info("worker started (pid %d)", os.getpid())
    stale = clean_stale_partials()
    if stale:
        log.info("removed %d partial output(s) left by a job that was killed", stale)
    worker.serve(sys.stdin.buffer)  # bytes: a line that is not UTF-8 is answered, not fatal
    return 0


if __name__ == "__main__":
    sys.exit(main())
