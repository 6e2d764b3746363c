"""The frozen backbones' checkpoints as jobs see them (installed, allowed random, or a plain error), and the
model the last apply job built on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from backend import weights
from backend.context import JobContext
from backend.protocol import INVALID_INPUT, MISSING_WEIGHTS, JobError


def backbone_checkpoint(backbone: str, allow_random: bool, ctx: JobContext) -> tuple[str | None, str | None]:
    """(checkpoint path, its SHA-256) of an installed backbone; (None, None) for an allowed random init."""
    entry = weights.load_registry().get(backbone)
    if entry is not None and weights.status(entry) == "installed":
        return str(weights.model_path(entry)), weights.installed_sha256(entry)
    if entry is None:  # a miniature: there are no weights to install
        title = weights.backbone_info(backbone).title
        if not allow_random:
            raise JobError(
                INVALID_INPUT, f"The {backbone} backbone ({title}) has no official weights; it is for tests only."
            )
        ctx.warn(
            f"The {backbone} backbone is {title}, randomly initialised and without official weights: it is for "
            "trying the workflow, and its results say nothing about the published model."
        )
        return None, None
    if not allow_random:
        weights.require(backbone)  # raises MISSING_WEIGHTS with the exact command
    ctx.warn(
        f"The {backbone} weights ({entry.title}) are not installed: the frozen encoder is randomly initialised, so "
        f"results will be far below those of the published model. Install them with: python -m backend models fetch "
        f"{backbone}"
    )
    return None, None


def training_checkpoint(backbone: str, sha256: str | None, adapter: str) -> str | None:
    """The installed checkpoint an adapter was trained on (None when it was trained on random weights).

    Refuses a missing checkpoint, or one that is not the file the adapter was trained with.
    """
    if sha256 is None:
        return None
    path = weights.require(backbone)
    if weights.installed_sha256(weights.get_entry(backbone)) != sha256:
        raise JobError(
            MISSING_WEIGHTS,
            f"The installed {backbone} checkpoint is not the one the adapter '{adapter}' was trained with.",
            "Install the original checkpoint again, or fine-tune a new adapter.",
        )
    return str(path)


# The last model an apply job built, by what built it: the worker lives across jobs, so applying another adapter
# on the same frozen backbone only swaps the adapter's tensors instead of rebuilding it and re-reading checkpoints.
_LOADED: dict[tuple[Any, ...], Any] = {}


def loaded_model(key: tuple[Any, ...], build: Callable[[], Any]) -> tuple[Any, bool]:
    """(the model built for `key`, whether it was already loaded); one model at a time."""
    if key in _LOADED:
        return _LOADED[key], True
    release_loaded_model()  # the memory of the previous model goes back before the next is built
    _LOADED[key] = build()
    return _LOADED[key], False


def release_loaded_model() -> None:
    """Forget the kept model (a fine-tune needs the memory, GPU memory above all)."""
    _LOADED.clear()
