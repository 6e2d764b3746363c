"""Creates the backend's Python environment for a user without a checkout (standard library only).

It runs inside QGIS's Python but imports nothing from qgis, so it is testable on its own; the installer
dialog drives it from a background task. The plan: a venv made by a normal Python >= 3.11 (never
sys.executable: inside QGIS that is QGIS, not a Python), pip, torch from the PyTorch wheel index that suits
this machine's NVIDIA driver and graphics card, the backend's pinned requirements, then
`python -m backend info` as a check. A venv counts as installed only once the marker file is written, at
the very end.

* `torch_build`: which torch build this machine's NVIDIA driver and card can run (CPU otherwise).
* `plan`: the base Python, the requirements, `InstallPlan` and its commands.
* `run`: `run_plan`, each command's output streamed to a log, cancel, the completion marker.
* `processes`: the clean environment and windowless start every command gets.
"""

from __future__ import annotations

# backend_env knows what a finished install looks like (it looks for the venv); the installer makes one.
# Re-exported: callers know them as installer.is_installed etc.
from rs_peft_qgis.backend_env import MARKER_NAME, is_installed, venv_python
from rs_peft_qgis.installer.plan import (
    BASE_PYTHON_NAMES,
    MIN_PYTHON,
    InstallerError,
    InstallPlan,
    Step,
    find_base_python,
    plan_for_this_machine,
    read_torch_spec,
    requirements_dir,
)
from rs_peft_qgis.installer.run import run_plan
from rs_peft_qgis.installer.torch_build import (
    CPU_INDEX,
    TORCH_WHEEL_INDEXES,
    CudaWheelIndex,
    TorchIndexChoice,
    choose_torch_index,
    detect_compute_capability,
    detect_cuda,
    torch_index_for_driver,
)

__all__ = [
    "BASE_PYTHON_NAMES",
    "CPU_INDEX",
    "MARKER_NAME",
    "MIN_PYTHON",
    "TORCH_WHEEL_INDEXES",
    "CudaWheelIndex",
    "InstallPlan",
    "InstallerError",
    "Step",
    "TorchIndexChoice",
    "choose_torch_index",
    "detect_compute_capability",
    "detect_cuda",
    "find_base_python",
    "is_installed",
    "plan_for_this_machine",
    "read_torch_spec",
    "requirements_dir",
    "run_plan",
    "torch_index_for_driver",
    "venv_python",
]
