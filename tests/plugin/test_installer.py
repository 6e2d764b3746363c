"""The backend installer: torch build choice, the plan's commands, and real runs of real commands."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT

from rs_peft_qgis import installer
from rs_peft_qgis.installer import (
    CPU_INDEX,
    MARKER_NAME,
    TORCH_WHEEL_INDEXES,
    InstallPlan,
    Step,
    choose_torch_index,
    run_plan,
    torch_index_for_driver,
    venv_python,
)

CU126 = "https://download.pytorch.org/whl/cu126"
CU130 = "https://download.pytorch.org/whl/cu130"
posix_only = pytest.mark.skipif(os.name != "posix", reason="uses a POSIX shell script / process groups")


@pytest.fixture(scope="module")
def base_python() -> str:
    found = installer.find_base_python()
    assert found, "no Python >= 3.11 with venv on PATH"
    return found


@dataclass
class TinyPlan(InstallPlan):
    """The real plan's machinery with small, offline commands: a venv without pip, then `extra`."""

    extra: list[Step] = field(default_factory=list)

    def steps(self) -> list[Step]:
        create = Step(
            "create the Python environment", [self.base_python, "-m", "venv", "--without-pip", str(self.venv)]
        )
        return [create, *self.extra]


def run_collecting(plan: InstallPlan, is_cancelled=lambda: False) -> tuple[bool, list[str]]:
    lines: list[str] = []
    ok = run_plan(plan, lines.append, is_cancelled)
    return ok, lines


# --- which torch build ---------------------------------------------------------------------------------------


def test_no_nvidia_driver_means_the_cpu_index() -> None:
    choice = choose_torch_index(None)
    assert choice.url == CPU_INDEX == "https://download.pytorch.org/whl/cpu" and choice.cuda is None
    assert "processor" in choice.reason
    assert torch_index_for_driver(None) == CPU_INDEX
    assert choose_torch_index("not a version").url == CPU_INDEX


def test_new_driver_gets_the_newest_cuda_build() -> None:
    assert TORCH_WHEEL_INDEXES[0].url == CU130  # newest first
    assert torch_index_for_driver("580.95.05") == CU130
    assert torch_index_for_driver("595.71.05", "12.0") == CU130  # Blackwell needs the CUDA 13 build
    assert choose_torch_index("581.57", windows=True).url == CU130
    choice = choose_torch_index("580.65.06", "8.9")  # exactly CUDA 13.0 GA's driver
    assert choice.cuda == "13.0" and "CUDA 13.0" in choice.reason


def test_older_driver_gets_an_older_cuda_build_or_the_cpu_with_a_reason() -> None:
    # CUDA 12.x minor version compatibility: any driver from 525.60.13 runs the CUDA 12.6 build.
    assert torch_index_for_driver("525.60.13") == CU126
    assert torch_index_for_driver("535.183.01", "8.0") == CU126
    assert torch_index_for_driver("570.124.06") == CU126
    assert choose_torch_index("528.02", windows=True).url == CU126

    too_old = choose_torch_index("470.256.02")
    assert too_old.url == CPU_INDEX and "525.60.13 or newer" in too_old.reason and "Update" in too_old.reason
    assert choose_torch_index("525.60.11").url == CPU_INDEX
    assert choose_torch_index("526.98", windows=True).url == CPU_INDEX  # Windows numbers its drivers apart


def test_the_graphics_card_limits_the_build() -> None:
    # Pascal on a 580 driver: the CUDA 13 build has no Pascal kernels, the 12.6 one does.
    assert torch_index_for_driver("580.95.05", "6.1") == CU126
    # Blackwell on a 570 driver: only the CUDA 13 build runs it, and that needs a newer driver.
    blackwell = choose_torch_index("570.124.06", "12.0")
    assert blackwell.url == CPU_INDEX and "580.65.06 or newer" in blackwell.reason
    kepler = choose_torch_index("580.95.05", "3.7")
    assert kepler.url == CPU_INDEX and "not supported" in kepler.reason


def test_the_cuda_table_belongs_to_the_pinned_torch() -> None:
    # TORCH_WHEEL_INDEXES lists torch 2.13's CUDA builds: a new pin must come with a re-checked table.
    assert installer.read_torch_spec().startswith("torch==2.13.")
    for entry in TORCH_WHEEL_INDEXES:
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d{3}", entry.url)
        assert entry.url.endswith("cu" + entry.cuda.replace(".", ""))


# --- the plan ------------------------------------------------------------------------------------------------


def test_torch_spec_is_read_from_requirements_torch_txt(tmp_path: Path) -> None:
    pinned = [
        line.strip()
        for line in (ROOT / "requirements" / "torch.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert pinned == ["torch==2.13.0"]
    assert InstallPlan(base_python="python3.11").torch_spec == "torch==2.13.0"
    other = tmp_path / "torch.txt"
    other.write_text("# a comment\n\ntorch==9.9.9  # trailing comment\n")
    assert installer.read_torch_spec(other) == "torch==9.9.9"


def test_plan_commands(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    plan = InstallPlan(base_python="/opt/py/bin/python3.12", torch_index_url=CU126, venv=venv)
    py = str(venv / "bin" / "python") if os.name == "posix" else str(venv / "Scripts" / "python.exe")
    assert plan.python == Path(py)
    pip = [py, "-m", "pip", "install", "--progress-bar", "off"]
    assert plan.commands() == [
        ["/opt/py/bin/python3.12", "-m", "venv", str(venv)],
        [*pip, "--upgrade", "pip"],
        [*pip, "--index-url", CU126, "torch==2.13.0"],
        [*pip, "-r", str(ROOT / "requirements" / "backend.txt")],
        [py, "-m", "backend", "info"],
        [py, "-m", "backend", "models", "fetch", "mobile_sam"],
    ]
    check, download = plan.steps()[-2:]
    assert download.optional and download.cwd == ROOT and not check.optional
    assert check.cwd == ROOT and check.env == {"PYTHONPATH": str(ROOT)}
    assert plan.steps()[2].label == "pip install torch"
    fresh = InstallPlan(base_python="/opt/py/bin/python3.12", venv=venv, fresh=True)
    assert fresh.commands()[0] == ["/opt/py/bin/python3.12", "-m", "venv", "--clear", str(venv)]


def test_venv_python_path_on_windows_and_posix() -> None:
    assert venv_python(Path("env"), windows=True) == Path("env") / "Scripts" / "python.exe"
    assert venv_python(Path("env"), windows=False) == Path("env") / "bin" / "python"


def test_defaults_live_in_the_user_data_folder() -> None:
    from rs_peft_qgis.backend_env import USER_DATA_DIR

    plan = InstallPlan(base_python="python3")
    assert plan.venv == USER_DATA_DIR / "venv" and plan.log_path == USER_DATA_DIR / "install.log"
    assert plan.marker == USER_DATA_DIR / "venv" / MARKER_NAME


def test_find_base_python_finds_a_python_311_or_newer(base_python: str) -> None:
    assert Path(base_python).name.startswith("python")  # a real interpreter, not QGIS's executable
    out = subprocess.run(
        [base_python, "-c", "import sys, venv; print(sys.version_info[:2] >= (3, 11))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "True"


def test_plan_for_this_machine(tmp_path: Path, base_python: str) -> None:
    plan = installer.plan_for_this_machine(tmp_path / "venv")
    assert plan.base_python == base_python and plan.venv == tmp_path / "venv" and not plan.fresh
    assert plan.torch_spec == "torch==2.13.0" and plan.requirements == ROOT / "requirements" / "backend.txt"
    assert plan.torch_index_reason
    if shutil.which("nvidia-smi") is None:  # this machine: no NVIDIA GPU
        assert plan.torch_index_url == CPU_INDEX


# --- nvidia-smi ----------------------------------------------------------------------------------------------


def _fake_nvidia_smi(folder: Path, body: str) -> None:
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(0o755)


@posix_only
def test_detect_cuda_reads_the_driver_version_from_nvidia_smi(tmp_path: Path, monkeypatch) -> None:
    # This machine has no NVIDIA GPU, so a small script stands in for NVIDIA's nvidia-smi tool, answering the
    # two queries the installer makes the way the real tool does (one CSV line per GPU, no header).
    _fake_nvidia_smi(
        tmp_path / "bin",
        'case "$*" in\n'
        '  "--query-gpu=driver_version --format=csv,noheader") printf "580.95.05\\n580.95.05\\n" ;;\n'
        '  "--query-gpu=compute_cap --format=csv,noheader") printf "8.6\\n8.6\\n" ;;\n'
        '  *) echo "unexpected arguments: $*" >&2; exit 2 ;;\n'
        "esac\n",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert installer.detect_cuda() == "580.95.05"
    assert installer.detect_compute_capability() == "8.6"
    assert torch_index_for_driver(installer.detect_cuda(), installer.detect_compute_capability()) == CU130


@posix_only
def test_detect_cuda_is_none_when_nvidia_smi_fails_or_is_missing(tmp_path: Path, monkeypatch) -> None:
    # Stand-in for nvidia-smi on a machine whose NVIDIA driver is not loaded.
    _fake_nvidia_smi(
        tmp_path / "bin",
        'echo "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\nexit 9\n',
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert installer.detect_cuda() is None and installer.detect_compute_capability() is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert installer.detect_cuda() is None


# --- running a plan for real ---------------------------------------------------------------------------------


def test_run_plan_creates_a_real_venv_streams_logs_and_marks_it(tmp_path: Path, base_python: str, monkeypatch) -> None:
    # What QGIS on Windows sets for its own Python: it must not leak into the commands (the venv's Python
    # would not even start with this PYTHONHOME).
    monkeypatch.setenv("PYTHONHOME", str(tmp_path / "qgis-python"))
    venv = tmp_path / "venv"
    py = str(venv_python(venv))
    plan = TinyPlan(
        base_python=base_python,
        venv=venv,
        log_path=tmp_path / "logs" / "install.log",
        torch_index_reason="No NVIDIA graphics card was found.",
        extra=[
            Step(
                "say hello", [py, "-c", "import sys; print('hello from', sys.prefix); print('oops', file=sys.stderr)"]
            ),
            Step(
                "check the backend",
                [py, "-c", "import os, backend.protocol as p; print('protocol', p.JSONRPC, 'in', os.getcwd())"],
                cwd=ROOT,
                env={"PYTHONPATH": str(ROOT)},
            ),
        ],
    )
    ok, lines = run_collecting(plan)
    assert ok, lines
    assert lines[1] == "No NVIDIA graphics card was found."
    assert "Step 1 of 3: create the Python environment" in lines
    assert "Step 3 of 3: check the backend" in lines
    assert f"hello from {venv}" in lines and "oops" in lines  # stdout and stderr, merged
    assert f"protocol 2.0 in {ROOT}" in lines
    assert lines[-1] == f"The backend is installed in {venv}."
    assert Path(py).is_file() and (venv / "pyvenv.cfg").is_file()

    marker = json.loads((venv / MARKER_NAME).read_text())
    assert marker["torch"] == "torch==2.13.0" and marker["torch_index"] == CPU_INDEX
    assert installer.is_installed(venv)
    assert plan.log_path.read_text().splitlines() == lines

    # A second run appends to the same log; a finished venv is redone from clean.
    ok_again, again = run_collecting(plan)
    assert ok_again and plan.log_path.read_text().splitlines() == lines + again
    assert installer.plan_for_this_machine(venv).fresh


def test_a_failing_command_stops_the_run_and_leaves_no_marker(tmp_path: Path, base_python: str) -> None:
    venv = tmp_path / "venv"
    py = str(venv_python(venv))
    plan = TinyPlan(
        base_python=base_python,
        venv=venv,
        log_path=tmp_path / "install.log",
        extra=[
            Step("fail on purpose", [py, "-c", "import sys; print('about to fail'); sys.exit(3)"]),
            Step("never reached", [py, "-c", "print('unreachable line')"]),
        ],
    )
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /nowhere\n")
    (venv / MARKER_NAME).write_text("{}")  # an earlier finished install, about to be changed
    ok, lines = run_collecting(plan)
    assert not ok
    assert "about to fail" in lines and "unreachable line" not in lines
    assert lines[-1] == f"Installing the backend failed at step 2 of 3 (fail on purpose): see {plan.log_path}"
    assert "(the command ended with exit code 3)" in lines
    assert not (venv / MARKER_NAME).exists() and not installer.is_installed(venv)
    assert venv_python(venv).is_file()  # the half-made venv is left in place
    assert plan.log_path.read_text().splitlines() == lines


def test_a_failing_optional_step_is_reported_and_the_install_finishes(tmp_path: Path, base_python: str) -> None:
    venv = tmp_path / "venv"
    py = str(venv_python(venv))
    fail = Step("download a model", [py, "-c", "import sys; sys.exit(4)"], optional=True)
    plan = TinyPlan(base_python=base_python, venv=venv, log_path=tmp_path / "install.log", extra=[fail])
    ok, lines = run_collecting(plan)
    assert ok and installer.is_installed(venv)
    assert "Step 2 of 2 (download a model) did not succeed; the backend works without it." in " ".join(lines)


def test_a_missing_program_is_a_failed_step(tmp_path: Path, base_python: str) -> None:
    plan = TinyPlan(
        base_python=base_python,
        venv=tmp_path / "venv",
        log_path=tmp_path / "install.log",
        extra=[Step("run a missing program", [str(tmp_path / "no-such-program")])],
    )
    ok, lines = run_collecting(plan)
    assert not ok and any(line.startswith(f"Could not start {tmp_path / 'no-such-program'}") for line in lines)
    assert lines[-1].startswith("Installing the backend failed at step 2 of 2 (run a missing program)")


def test_refuses_a_folder_that_is_not_a_python_environment(tmp_path: Path, base_python: str) -> None:
    folder = tmp_path / "my-data"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    plan = TinyPlan(base_python=base_python, venv=folder, log_path=tmp_path / "install.log", fresh=True)
    ok, lines = run_collecting(plan)
    assert not ok and "is not a Python environment" in lines[-1]
    assert (folder / "notes.txt").read_text() == "keep me" and not (folder / "bin").exists()


def _alive(pid: int) -> bool:
    if not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent has not collected it


def _cancel_when(lines: list[str], predicate, cancelled: threading.Event) -> threading.Thread:
    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(predicate(line) for line in list(lines)):
            time.sleep(0.05)
        cancelled.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_cancel_from_another_thread_kills_a_long_command(tmp_path: Path, base_python: str) -> None:
    sleeper = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(60)"
    plan = TinyPlan(
        base_python=base_python,
        venv=tmp_path / "venv",
        log_path=tmp_path / "install.log",
        extra=[Step("wait a minute", [base_python, "-c", sleeper]), Step("never reached", [base_python, "-V"])],
    )
    lines: list[str] = []
    cancelled = threading.Event()
    watcher = _cancel_when(lines, lambda line: line.startswith("pid "), cancelled)
    start = time.monotonic()
    ok = run_plan(plan, lines.append, cancelled.is_set)
    took = time.monotonic() - start
    watcher.join()
    assert not ok and took < 15, took  # venv creation plus a prompt stop, not the 60 s sleep
    pid = int(next(line for line in lines if line.startswith("pid "))[4:])
    assert not _alive(pid)
    assert lines[-1].startswith("Installation cancelled at step 2 of 3 (wait a minute)")
    assert "Step 3 of 3: never reached" not in lines
    assert not (plan.venv / MARKER_NAME).exists()


@posix_only
def test_cancel_also_stops_what_the_command_started(tmp_path: Path, base_python: str) -> None:
    # pip runs build helpers in child processes: cancelling must not leave them running.
    child = "import os, time; print('grandchild', os.getpid(), flush=True); time.sleep(60)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    plan = TinyPlan(
        base_python=base_python,
        venv=tmp_path / "venv",
        log_path=tmp_path / "install.log",
        extra=[Step("start a helper", [base_python, "-c", parent])],
    )
    lines: list[str] = []
    cancelled = threading.Event()
    watcher = _cancel_when(lines, lambda line: line.startswith("grandchild "), cancelled)
    start = time.monotonic()
    ok = run_plan(plan, lines.append, cancelled.is_set)
    took = time.monotonic() - start
    watcher.join()
    assert took < 15, took  # not held up by the helper's 60 s
    grandchild = int(next(line for line in lines if line.startswith("grandchild ")).split()[1])
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not ok and not _alive(grandchild)
    assert lines[-1].startswith("Installation cancelled at step 2 of 2 (start a helper)")


@posix_only
def test_a_finished_command_is_not_held_up_by_what_it_left_running(tmp_path: Path, base_python: str) -> None:
    # The helper keeps the output pipe open for a minute after the command itself has ended.
    helper = "import time; time.sleep(60)"
    command = (
        "import subprocess, sys; "
        f"p = subprocess.Popen([sys.executable, '-c', {helper!r}]); print('left running', p.pid, flush=True)"
    )
    plan = TinyPlan(
        base_python=base_python,
        venv=tmp_path / "venv",
        log_path=tmp_path / "install.log",
        extra=[Step("leave a helper running", [base_python, "-c", command])],
    )
    start = time.monotonic()
    ok, lines = run_collecting(plan)
    took = time.monotonic() - start
    helper_pid = int(next(line for line in lines if line.startswith("left running ")).split()[2])
    try:
        assert ok and took < 15, (took, lines)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper_pid, signal.SIGKILL)
