"""The plugin's dialogs, one per module: settings, backend diagnostics (a report to paste into bug reports)
and the backend installer. Slow work (starting the worker, installing) runs in QgsTasks so QGIS never
freezes."""
