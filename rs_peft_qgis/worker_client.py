"""The backend worker client, as the plugin uses it (standard library only).

The client lives with the protocol, in `backend/client.py` (stdlib only too). The plugin never imports
`backend`, so that file is loaded here by path from `backend_env.backend_root()` — the plugin folder when
packaged, the repository in a checkout — once per process, under a fixed private name in sys.modules:
every plugin module, and a plugin reload, gets the same `WorkerClient` and `RpcError` classes, so the
error the client raises is the one the plugin catches.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from rs_peft_qgis.backend_env import backend_root

_MODULE_NAME = "rs_peft_qgis_backend_client"


def _load_client() -> ModuleType:
    module = sys.modules.get(_MODULE_NAME)
    if module is not None:
        return module
    path = backend_root() / "backend" / "client.py"
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f"The backend client {path} is missing: reinstall the plugin.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module  # before running it: dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_MODULE_NAME]
        raise
    return module


_client = _load_client()
WorkerClient = _client.WorkerClient
JobHandle = _client.JobHandle
RpcError = _client.RpcError
load_protocol = _client.load_protocol

__all__ = ["JobHandle", "RpcError", "WorkerClient", "load_protocol"]
