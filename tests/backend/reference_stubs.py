"""Stand-ins for the optional imports of the reference packages the equivalence tests compare against.

`segment_anything` and `mobile_sam` import torchvision at import time (for the automatic mask generator
and the resize transforms), and `mobile_sam` imports a few timm layers for TinyViT. The encoders the
tests compare against need neither, and torchvision cannot be installed in the backend venv. So, for a
package that is not installed, only the names those imports ask for are put in `sys.modules`; an
installed package is always used as it is.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def _unavailable(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("stubbed by tests/backend/reference_stubs.py: not available in the tests")


class _DropPath(nn.Module):
    """timm's DropPath is the identity in eval mode, the only mode the equivalence tests run in."""

    def __init__(self, drop_prob: float | None = None) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _to_2tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, Iterable) and not isinstance(x, str) else (x, x)


def _register_model(fn: Callable) -> Callable:
    return fn


_STUBS: dict[str, dict[str, Any]] = {
    "torchvision.ops.boxes": {"batched_nms": _unavailable, "box_area": _unavailable},
    "torchvision.transforms.functional": {"resize": _unavailable, "to_pil_image": _unavailable},
    "timm.models.layers": {
        "DropPath": _DropPath,
        "to_2tuple": _to_2tuple,
        "trunc_normal_": torch.nn.init.trunc_normal_,
    },
    "timm.models.registry": {"register_model": _register_model},
}


def _install(name: str, attrs: dict[str, Any]) -> None:
    """Put module `name` (and its missing parents, linked as attributes) in sys.modules with `attrs`."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        path = ".".join(parts[:i])
        if path not in sys.modules:
            sys.modules[path] = types.ModuleType(path)
            if i > 1:
                setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], sys.modules[path])
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)


def stub_missing_reference_imports() -> None:
    """Stub torchvision / timm where they are not installed; call before importing the reference package."""
    for top in sorted({name.split(".")[0] for name in _STUBS}):
        # Already imported (the real package, or these stubs from an earlier call), or installed: leave it.
        if top in sys.modules or importlib.util.find_spec(top) is not None:
            continue
        for name, attrs in _STUBS.items():
            if name.split(".")[0] == top:
                _install(name, attrs)
