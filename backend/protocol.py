"""The worker protocol: JSON-RPC 2.0, one JSON object per line over stdio.

Standard library only: the QGIS side loads this very file (by path) so both ends agree on
message names and error codes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

JSONRPC = "2.0"

# Requests (client -> worker).
INITIALIZE = "initialize"
JOB_START = "job.start"
JOB_CANCEL = "job.cancel"
MODELS_LIST = "models.list"
MODELS_FETCH = "models.fetch"
ADAPTERS_LIST = "adapters.list"
ADAPTERS_DELETE = "adapters.delete"
SHUTDOWN = "shutdown"

# Notifications (worker -> client).
JOB_PROGRESS = "job.progress"
JOB_LOG = "job.log"
JOB_FINISHED = "job.finished"
JOB_FAILED = "job.failed"

# JSON-RPC error codes for malformed requests (not job failures).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_RPC_ERROR = -32603

# The closed set of job failure codes a user may see.
INVALID_INPUT = "INVALID_INPUT"
MISSING_WEIGHTS = "MISSING_WEIGHTS"
OUT_OF_MEMORY = "OUT_OF_MEMORY"
OUTPUT_ERROR = "OUTPUT_ERROR"
CANCELLED = "CANCELLED"
WORKER_DIED = "WORKER_DIED"
INTERNAL = "INTERNAL"
ERROR_CODES = frozenset({INVALID_INPUT, MISSING_WEIGHTS, OUT_OF_MEMORY, OUTPUT_ERROR, CANCELLED, WORKER_DIED, INTERNAL})

# Progress notifications are throttled to this many per second (the last one always goes out).
PROGRESS_MAX_RATE_HZ = 10.0


@dataclass
class JobError(Exception):
    """A job failure with a message written for a GIS analyst and a hint on what to do."""

    code: str
    message: str
    hint: str = ""

    def __post_init__(self) -> None:
        if self.code not in ERROR_CODES:
            raise ValueError(f"unknown error code {self.code!r}")
        super().__init__(self.message)

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


@dataclass
class Output:
    """One result file of a job, with what QGIS needs to show it as a layer."""

    path: str
    kind: str  # "raster" | "vector" | "image"
    layer_name: str
    style: str = ""  # QML file name in resources/styles, or "" for QGIS's default
    key: str = ""  # which declared output this is (e.g. "probability"), for Processing

    def to_dict(self) -> dict[str, str]:
        return {
            "path": self.path,
            "kind": self.kind,
            "layer_name": self.layer_name,
            "style": self.style,
            "key": self.key,
        }


@dataclass
class JobResult:
    outputs: list[Output] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "outputs": [o.to_dict() for o in self.outputs],
            "metrics": self.metrics,
            "warnings": self.warnings,
        }


def request(msg_id: int | str, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": JSONRPC, "id": msg_id, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "method": method, "params": params}


def response(msg_id: int | str | None, result: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": msg_id, "result": result}


def error_response(msg_id: int | str | None, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": JSONRPC, "id": msg_id, "error": err}


def encode(msg: dict[str, Any]) -> str:
    """One line of JSON; NaN/inf are not JSON, so they are refused here rather than sent."""
    return json.dumps(msg, separators=(",", ":"), allow_nan=False) + "\n"
