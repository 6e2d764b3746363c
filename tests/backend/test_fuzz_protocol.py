"""Protocol fuzzing against a real worker process: no line can kill it or make it answer invalid JSON-RPC.

The lines that used to kill the worker (issue 15) are checked one by one with the exact answer JSON-RPC 2.0
asks for; then a seeded generator sends over 10,000 malformed lines (bytes that are not UTF-8, truncated JSON,
forbidden ids, wrong params, deep nesting, huge numbers, random mutations of valid requests), after which the
worker still answers `initialize`. Every line the worker wrote must be a valid JSON-RPC 2.0 message.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from queue import Empty, Queue

import pytest
from conftest import ROOT

SEED = 20261207
LINES = 10_500
# Methods the fuzzer may name with broken params; `shutdown` (ends the worker by design) and `models.fetch`
# (a valid name would download) are left out, as is `job.start` with valid params (it would run a job).
METHODS = ["initialize", "job.start", "job.cancel", "models.list", "adapters.list", "adapters.delete", "no.such"]
KILLERS = [  # (line, expected error code): each once killed the worker
    b'{"jsonrpc":"2.0","method":"foo","id":NaN}',
    b'{"jsonrpc":"2.0","method":"foo","id":1e999}',
    b'{"jsonrpc":"2.0","method":"foo","id":' + b"7" * 5000 + b"}",
    b"[" * 100_000 + b"]" * 100_000,
]


class RawWorker:
    """A worker process driven with raw bytes; a thread collects every stdout line."""

    def __init__(self, tmp: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RS_PEFT_QGIS_LOG_DIR": str(tmp)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "backend", "worker"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.lines: Queue[bytes] = Queue()
        self.seen: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def send(self, line: bytes) -> None:
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()

    def answer(self, msg_id: object, timeout: float = 120) -> dict:
        """Read replies until the one with `msg_id` (the worker answers in order)."""
        while True:
            try:
                raw = self.lines.get(timeout=timeout)
            except Empty:
                raise AssertionError(f"no answer to id {msg_id!r}; worker exit code {self.proc.poll()}") from None
            self.seen.append(raw)
            msg = json.loads(raw)
            if msg.get("id") == msg_id and "method" not in msg:
                return msg

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send(b'{"jsonrpc":"2.0","method":"shutdown","id":"bye"}')
            self.proc.stdin.close()
            self.proc.wait(30)


@pytest.fixture
def raw_worker(tmp_path: Path) -> RawWorker:
    w = RawWorker(tmp_path)
    yield w
    w.close()
    if w.proc.poll() is None:
        w.proc.kill()


def valid_jsonrpc(raw: bytes) -> str:
    """'' when `raw` is one valid JSON-RPC 2.0 response or notification, else what is wrong."""
    try:
        msg = json.loads(raw, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except ValueError as exc:
        return f"not JSON: {exc}"
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
        return "not a JSON-RPC 2.0 object"
    if "method" in msg:
        return "" if isinstance(msg.get("params"), dict) and "id" not in msg else "bad notification"
    msg_id = msg.get("id", "missing")
    if not (msg_id is None or isinstance(msg_id, str) or (isinstance(msg_id, int) and not isinstance(msg_id, bool))):
        return f"bad id {msg_id!r}"
    if ("result" in msg) == ("error" in msg):
        return "needs exactly one of result and error"
    err = msg.get("error")
    if err is not None and not (isinstance(err.get("code"), int) and isinstance(err.get("message"), str)):
        return f"bad error object {err!r}"
    return ""


def test_lines_that_killed_the_worker_get_the_right_error(raw_worker: RawWorker) -> None:
    for i, line in enumerate(KILLERS):
        raw_worker.send(line)
        err = raw_worker.answer(None)["error"]
        assert err["code"] == -32700, (line[:60], err)  # parse error
        raw_worker.send(json.dumps({"jsonrpc": "2.0", "method": "models.list", "id": i}).encode())
        assert "models" in raw_worker.answer(i)["result"]
    # Ids JSON-RPC forbids are refused with a null id, never echoed back.
    for bad_id in ('{"a":1}', "[1]", "true", "1.5"):
        raw_worker.send(b'{"jsonrpc":"2.0","method":"models.list","id":' + bad_id.encode() + b"}")
        err = raw_worker.answer(None)["error"]
        assert err["code"] == -32600 and "id" in err["message"]
    # Params must be an object: [], "" and 0 are invalid params, not an empty object.
    for k, params in enumerate(("[]", '""', "0")):
        raw_worker.send(f'{{"jsonrpc":"2.0","method":"models.list","id":{100 + k},"params":{params}}}'.encode())
        assert raw_worker.answer(100 + k)["error"]["code"] == -32602
    # A notification (no id) is never answered, not even for an unknown method.
    raw_worker.send(b'{"jsonrpc":"2.0","method":"no.such"}')
    raw_worker.send(b'{"jsonrpc":"2.0","method":"initialize","id":"after"}')
    assert raw_worker.answer("after")["result"]["backend_version"]
    assert raw_worker.proc.poll() is None
    assert [problem for raw in raw_worker.seen if (problem := valid_jsonrpc(raw))] == []


def malformed(rng: random.Random) -> bytes:
    """One malformed or edge-case line (never a valid job start, never shutdown)."""
    kind = rng.randrange(12)
    method = rng.choice(METHODS)
    if kind == 0:  # random bytes, often not UTF-8
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))).replace(b"\n", b" ")
    if kind == 1:  # a valid request cut short
        full = json.dumps({"jsonrpc": "2.0", "method": method, "id": rng.randrange(1000), "params": {}})
        return full[: rng.randrange(1, len(full))].encode()
    if kind == 2:  # JSON that is not a request object
        return rng.choice([b"null", b"1", b'"x"', b"[]", b"[{}]", b"{}", b"true", b"-0", b"1e5"])
    if kind == 3:  # a forbidden or odd id
        bad = rng.choice(['{"a":1}', "[1]", "true", "false", "1.5", "-1e308", '"' + "x" * 3000 + '"', "1e400"])
        return f'{{"jsonrpc":"2.0","method":"{method}","id":{bad}}}'.encode()
    if kind == 4:  # params of the wrong type
        bad = rng.choice(["[]", '""', "0", "null", "[1,2]", "true", '"params"'])
        return f'{{"jsonrpc":"2.0","method":"{method}","id":{rng.randrange(10**6)},"params":{bad}}}'.encode()
    if kind == 5:  # wrong or missing version / method
        version = rng.choice(['"1.0"', '"2"', "2.0", "null", '""'])
        return f'{{"jsonrpc":{version},"method":"{method}","id":1}}'.encode()
    if kind == 6:  # nesting, from harmless to far too deep
        depth = rng.choice([5, 31, 33, 1000, 20_000])
        return (
            '{"jsonrpc":"2.0","method":"job.cancel","id":2,"params":{"job_id":' + "[" * depth + "]" * depth + "}}"
        ).encode()
    if kind == 7:  # numbers JSON allows but Python's parser or our encoder would choke on
        number = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "9" * rng.randrange(4000, 6000), "-0.0"])
        return f'{{"jsonrpc":"2.0","method":"job.cancel","id":3,"params":{{"job_id":{number}}}}}'.encode()
    if kind == 8:  # job.start with broken job or params (never a runnable job)
        params = rng.choice(
            [
                {"job": None},
                {"job": "change.cva", "params": []},
                {"job": "change.cva", "params": {"before": 1}},
                {"job": "change.cva", "params": {"out_dir": "x", "tile_size": float("inf")}},
                {"job": ["change.cva"]},
                {"job": "change.cva", "params": {"nope": True}},
            ]
        )
        return json.dumps({"jsonrpc": "2.0", "method": "job.start", "id": 4, "params": params}).encode()
    if kind == 9:  # a valid-looking request with random mutations of its bytes
        line = bytearray(json.dumps({"jsonrpc": "2.0", "method": method, "id": 5, "params": {"name": "x"}}).encode())
        for _ in range(rng.randrange(1, 6)):
            line[rng.randrange(len(line))] = rng.randrange(32, 256)
        return bytes(line).replace(b"\n", b" ")
    if kind == 10:  # control characters, a BOM, surrogates escaped in JSON
        return rng.choice(
            [b"\xef\xbb\xbf{}", b'{"jsonrpc":"2.0","method":"\\ud800","id":6}', b"\x00\x01\x02", b"\t\r", b"{\x7f}"]
        )
    name = json.dumps(rng.choice(["../x", "", "/etc", "a" * 500]))  # never a real adapter, never a path
    return f'{{"jsonrpc":"2.0","method":"adapters.delete","id":7,"params":{{"name":{name}}}}}'.encode()


def test_ten_thousand_malformed_lines_leave_the_worker_answering(raw_worker: RawWorker) -> None:
    rng = random.Random(SEED)
    lines = [*KILLERS, *(malformed(rng) for _ in range(LINES))]
    for i, line in enumerate(lines):
        raw_worker.send(line)
        if i % 500 == 0:  # keep the pipes from filling: drain up to a marker now and then
            raw_worker.send(json.dumps({"jsonrpc": "2.0", "method": "models.list", "id": f"mark{i}"}).encode())
            raw_worker.answer(f"mark{i}")
    raw_worker.send(b'{"jsonrpc":"2.0","method":"initialize","id":"final"}')
    info = raw_worker.answer("final")["result"]
    assert info["backend_version"] and "change.cva" in info["jobs"]
    assert raw_worker.proc.poll() is None
    assert len(lines) >= 10_000
    problems = [(raw[:120], problem) for raw in raw_worker.seen if (problem := valid_jsonrpc(raw))]
    assert problems == []
