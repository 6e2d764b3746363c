"""One backend worker per QGIS session: started on first use with the configured interpreter, kept,
and started again for the next job when it died (the dock and Processing share it)."""

from __future__ import annotations

import threading
from pathlib import Path

from rs_peft_qgis.backend_env import backend_root, find_backend_python
from rs_peft_qgis.settings import Settings
from rs_peft_qgis.worker_client import RpcError, WorkerClient


class BackendNotFound(RpcError):
    """No backend interpreter is configured or installed."""


class WorkerSession:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: WorkerClient | None = None
        self._config: tuple[str, tuple[tuple[str, str], ...]] | None = None
        self.starts = 0  # how many workers this session started (a restart after a crash adds one)
        self.last_death = ""  # why the previous worker ended, if it died

    def python(self, settings: Settings | None = None) -> Path:
        settings = settings or Settings.load()
        python = find_backend_python(settings.backend_python or None)
        if python is None:
            where = f"'{settings.backend_python}' does not exist" if settings.backend_python else "none was found"
            raise BackendNotFound(
                -1,
                f"The backend Python environment is missing ({where}). Install it from "
                "RS PEFT > Install backend…, or set its interpreter in RS PEFT > Settings.",
            )
        return python

    def client(self) -> WorkerClient:
        """The running worker; starts one (again) if there is none, it died, or the settings changed."""
        settings = Settings.load()
        python = self.python(settings)
        env = settings.worker_env()
        config = (str(python), tuple(sorted((k, v) for k, v in env.items() if k.startswith("RS_PEFT_QGIS_"))))
        with self._lock:
            current = self._client
            # Changed settings apply once the worker is idle: a restart now would kill a running job.
            if current is not None and current.alive and (config == self._config or current.busy):
                return current
            if self._client is not None:
                if not self._client.alive:
                    self.last_death = self._client.died_message()
                self._client.shutdown()
            client = WorkerClient(python, backend_root(), env=env)
            self._client = client
            self._config = config
            self.starts += 1
            client.start()
            return client

    @property
    def running(self) -> WorkerClient | None:
        """The worker if one is running now (never starts one)."""
        client = self._client
        return client if client is not None and client.alive else None

    def shutdown(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.shutdown()
                self._client = None


SESSION = WorkerSession()
