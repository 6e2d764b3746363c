"""The plugin's settings (QgsSettings under `rs_peft_qgis/`) and the worker environment they imply."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from qgis.core import QgsSettings

from rs_peft_qgis import catalog

PREFIX = "rs_peft_qgis/"
# Settings that are also job parameters (same name): the configured value is the job's default.
JOB_DEFAULTS = ("device",)


@dataclass
class Settings:
    backend_python: str = ""  # "" = auto-detect (a checkout's .venv, then the installer's venv)
    device: str = "auto"
    models_dir: str = ""  # "" = the backend's platformdirs cache
    adapters_dir: str = ""  # "" = the backend's platformdirs data folder
    out_dir: str = ""  # "" = a folder next to the project (or the temp folder)

    @classmethod
    def load(cls) -> Settings:
        s = QgsSettings()
        values = {name: str(s.value(PREFIX + name, default) or default) for name, default in cls().__dict__.items()}
        if values["device"] not in catalog.load().param_choices("device"):  # the devices the jobs offer
            values["device"] = cls.device
        return cls(**values)

    def job_default(self, param: str) -> Any:
        """The configured default of the job parameter `param` (the device), or None."""
        return getattr(self, param) if param in JOB_DEFAULTS else None

    def save(self) -> None:
        s = QgsSettings()
        for name, value in self.__dict__.items():
            s.setValue(PREFIX + name, value)

    def worker_env(self) -> dict[str, str]:
        """The environment the worker starts with: QGIS's, plus the configured folders (if set)."""
        env = dict(os.environ)
        if self.models_dir:
            env["RS_PEFT_QGIS_CACHE_DIR"] = self.models_dir
        if self.adapters_dir:
            env["RS_PEFT_QGIS_ADAPTER_DIR"] = self.adapters_dir
        return env
