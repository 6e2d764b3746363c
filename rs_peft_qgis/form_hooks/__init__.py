"""Per-task additions to the generic job form, registered by task id: after `JobForm` built the form of a
job of task X, it calls the hook registered for X with the form (task-specific constants come from the
task's `hints` in the catalog)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rs_peft_qgis.form_hooks import landcover, pansharpen

# Task id -> hook(form). A hook adds widgets and behaviour through the form's generic API: `job`, `widgets`,
# `value()`, `add_row_below()`, the `valueChanged(name)` signal.
HOOKS: dict[str, Callable[[Any], None]] = {
    "pansharpen": pansharpen.add_ratio_hint,
    "landcover": landcover.add_wavelength_hint,
}


def apply(form: Any) -> None:
    """Run the hook of the form's task, if it has one."""
    hook = HOOKS.get(form.job.task)
    if hook is not None:
        hook(form)
