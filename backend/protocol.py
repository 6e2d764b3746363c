"""The worker protocol: JSON-RPC 2.0, one JSON object per line over stdio.

Standard library only: the QGIS side loads this very file (by path) so both ends agree on
message names and error codes.
"""

from __future__ import annotations

import json
import math
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


def encode_safe(msg: dict[str, Any]) -> str:
    """encode(), and never an exception: NaN/inf become null and anything JSON cannot hold becomes text."""
    try:
        return encode(msg)
    except (TypeError, ValueError, RecursionError):
        return encode(_jsonable(msg, 0))


def _jsonable(value: Any, depth: int) -> Any:
    if depth > 64:
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


# --- reading requests ----------------------------------------------------------------------------------------
MAX_LINE_BYTES = 16 * 2**20  # a request is small; a longer line is refused without being parsed
MAX_DEPTH = 32  # our requests nest 3 deep; the limit keeps the parser far from Python's recursion limit


@dataclass
class BadMessage(Exception):
    """A line that is not a valid request: answered with this error response (JSON-RPC 2.0 §5.1)."""

    code: int
    message: str
    msg_id: int | str | None = None

    def response(self) -> dict[str, Any]:
        return error_response(self.msg_id, self.code, self.message)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _depth_ok(text: str) -> bool:
    """Whether brackets outside strings nest at most MAX_DEPTH deep (checked before parsing)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return True
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def valid_id(msg_id: Any) -> bool:
    """JSON-RPC ids are strings, whole numbers or null (ours: not booleans, not floats)."""
    return msg_id is None or isinstance(msg_id, str) or (isinstance(msg_id, int) and not isinstance(msg_id, bool))


def decode_request(line: bytes | str) -> dict[str, Any]:
    """One line as a JSON-RPC 2.0 request or notification; BadMessage for anything else. Never raises else."""
    if len(line) > MAX_LINE_BYTES:
        raise BadMessage(INVALID_REQUEST, f"Invalid request: longer than {MAX_LINE_BYTES} bytes")
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
    except UnicodeDecodeError:
        raise BadMessage(PARSE_ERROR, "Parse error: the line is not UTF-8 text") from None
    if not _depth_ok(text):
        raise BadMessage(PARSE_ERROR, f"Parse error: nested deeper than {MAX_DEPTH} levels")
    try:
        msg = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise BadMessage(PARSE_ERROR, f"Parse error: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # NaN/Infinity, 1e999, an integer of thousands of digits
        raise BadMessage(PARSE_ERROR, f"Parse error: {str(exc)[:200]}") from None
    if not isinstance(msg, dict):
        raise BadMessage(INVALID_REQUEST, "Invalid request: expected a JSON-RPC 2.0 object")
    msg_id = msg.get("id")
    if not valid_id(msg_id):
        raise BadMessage(INVALID_REQUEST, "Invalid request: the id must be a string, a whole number or null")
    if msg.get("jsonrpc") != JSONRPC or not isinstance(msg.get("method"), str):
        raise BadMessage(INVALID_REQUEST, "Invalid request: expected a JSON-RPC 2.0 object", msg_id)
    if "params" in msg and not isinstance(msg["params"], dict):
        raise BadMessage(INVALID_PARAMS, "Invalid params: params must be an object of named parameters", msg_id)
    return msg
