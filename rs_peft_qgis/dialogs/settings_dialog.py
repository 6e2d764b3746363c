"""The settings dialog: backend interpreter, device, model and adapter folders, default output folder."""

from __future__ import annotations

from pathlib import Path

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtWidgets import QComboBox, QDialog, QDialogButtonBox, QFormLayout, QVBoxLayout, QWidget

from rs_peft_qgis import catalog
from rs_peft_qgis.backend_env import find_backend_python
from rs_peft_qgis.dialogs.common import ERROR_STYLE, file_widget, show_message, wrapped_label
from rs_peft_qgis.session import SESSION, WorkerSession
from rs_peft_qgis.settings import Settings

# How the devices the jobs offer (the catalog's `device` choices) read in the dialog; others show as they are.
DEVICE_LABELS = {
    "auto": "Automatic (the graphics card when there is one)",
    "cpu": "Processor (CPU)",
    "cuda": "NVIDIA graphics card (CUDA)",
}


class SettingsDialog(QDialog):
    """Backend interpreter, device, model and adapter folders, default output folder (saved in QgsSettings)."""

    def __init__(self, parent: QWidget | None = None, session: WorkerSession = SESSION) -> None:
        super().__init__(parent)
        self.setWindowTitle("RS PEFT settings")
        self.setMinimumWidth(560)
        self.saved = False
        current = Settings.load()
        folders = self._backend_folders(session, current)

        self.python_edit = file_widget(
            QgsFileWidget.StorageMode.GetFile, "Backend Python interpreter", "(detect automatically)"
        )
        self.python_edit.setFilePath(current.backend_python)
        self.detected_label = wrapped_label()
        self.device_combo = QComboBox()
        for value in catalog.load().param_choices("device"):
            self.device_combo.addItem(DEVICE_LABELS.get(value, str(value)), value)
        self.device_combo.setCurrentIndex(max(0, self.device_combo.findData(current.device)))
        self.models_edit = file_widget(QgsFileWidget.StorageMode.GetDirectory, "Model cache folder", folders[0])
        self.models_edit.setFilePath(current.models_dir)
        self.adapters_edit = file_widget(QgsFileWidget.StorageMode.GetDirectory, "Adapter library folder", folders[1])
        self.adapters_edit.setFilePath(current.adapters_dir)
        self.out_edit = file_widget(
            QgsFileWidget.StorageMode.GetDirectory,
            "Default output folder",
            "(a folder next to the project, or the temporary folder)",
        )
        self.out_edit.setFilePath(current.out_dir)
        self.error_label = wrapped_label()
        self.error_label.setVisible(False)

        form = QFormLayout()
        form.addRow("Backend interpreter", self.python_edit)
        form.addRow("", self.detected_label)
        form.addRow("Device", self.device_combo)
        form.addRow("Model cache folder", self.models_edit)
        form.addRow("Adapter library folder", self.adapters_edit)
        form.addRow("Default output folder", self.out_edit)
        note = wrapped_label(
            "Leave a field empty to use the default. Changes to the interpreter or the folders apply from the next "
            "job: the backend restarts then, so let running jobs finish first."
        )
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(note)
        layout.addWidget(self.error_label)
        layout.addWidget(buttons)

        self.python_edit.fileChanged.connect(self._show_detected)
        self._show_detected()

    @staticmethod
    def _backend_folders(session: WorkerSession, current: Settings) -> tuple[str, str]:
        """Placeholders: the folder a running worker uses where the setting is empty (that is the default)."""
        client = session.running
        folders = client.info.get("folders", {}) if client is not None else {}
        models = folders.get("models") if not current.models_dir else None
        adapters = folders.get("adapters") if not current.adapters_dir else None
        return models or "(backend default)", adapters or "(backend default)"

    def _show_detected(self) -> None:
        found = find_backend_python()
        if found is None:
            text = "Auto-detection: none found — use Install backend…"
        elif self.python_edit.filePath().strip():
            text = f"Auto-detection would use {found} (when the field above is empty)."
        else:
            text = f"Auto-detected: {found}"
        self.detected_label.setText(text)

    def settings(self) -> Settings:
        """The settings as the dialog shows them now (not saved)."""
        return Settings(
            backend_python=self.python_edit.filePath().strip(),
            device=self.device_combo.currentData() or "auto",
            models_dir=self.models_edit.filePath().strip(),
            adapters_dir=self.adapters_edit.filePath().strip(),
            out_dir=self.out_edit.filePath().strip(),
        )

    @staticmethod
    def problem(settings: Settings) -> str:
        """Why these settings cannot be saved, in plain words; "" when they can."""
        if settings.backend_python and not Path(settings.backend_python).expanduser().is_file():
            return (
                f"The backend interpreter '{settings.backend_python}' does not exist. Choose the python file of the "
                "backend environment (for example …/venv/bin/python), or leave the field empty to detect it "
                "automatically."
            )
        for label, value in (
            ("model cache folder", settings.models_dir),
            ("adapter library folder", settings.adapters_dir),
            ("default output folder", settings.out_dir),
        ):
            path = Path(value).expanduser() if value else None
            if path is not None and path.exists() and not path.is_dir():
                return f"The {label} '{value}' is a file, not a folder. Choose a folder."
        return ""

    def accept(self) -> None:
        settings = self.settings()
        problem = self.problem(settings)
        if problem:
            show_message(self.error_label, problem, ERROR_STYLE)
            return
        settings.save()
        self.saved = True
        super().accept()
