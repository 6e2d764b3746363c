"""The epoch table of a fine-tune (one row per `epoch` log record) and the one-line summaries a finished job
ends with."""

from __future__ import annotations

from typing import Any

from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QHeaderView, QTableWidget, QTableWidgetItem, QWidget

# Columns of the epoch table: a fine-tune's "epoch" log records decide which appear (the first record of a
# job), in this order. Validation scores listed here are the headline ones; a record with none of them shows
# its own val_* keys instead (readable labels), so that a new task's fine-tune needs no plugin change.
EPOCH_LABELS = {
    "epoch": "Epoch",
    "stage": "Stage",
    "loss": "Loss",
    "val_f1": "Val F1",
    "val_iou": "Val IoU",
    "val_miou": "Val mIoU",
    "val_q2n": "Val Q2n",
    "val_sam": "Val SAM",
    "val_ergas": "Val ERGAS",
}
EPOCH_BASE = ("epoch", "stage", "loss")
MAX_EPOCH_SCORES = 4


def epoch_label(key: str) -> str:
    """'val_q2n' -> 'Val Q2n' (known keys), 'val_kappa_x' -> 'Val kappa x' (others)."""
    words = key.replace("_", " ")
    return EPOCH_LABELS.get(key, words[:1].upper() + words[1:])


def epoch_columns(record: dict[str, Any]) -> list[str]:
    """The epoch table's columns for a fine-tune whose first epoch record is `record`."""
    scores = [k for k in EPOCH_LABELS if k.startswith("val_") and k in record]
    if not scores:
        scores = [k for k in record if k.startswith("val_")][:MAX_EPOCH_SCORES]
    return ["epoch", *(k for k in EPOCH_BASE[1:] if k in record), *scores]


def cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def training_summary(metrics: dict[str, Any], stages: dict[str, str]) -> str:
    """' · best epoch 3 of stage 2 (adapters) · validation Q2n 0.900' (what a fine-tune ends with); `stages`
    are the fine-tune's stage titles by stage id (the catalog's)."""
    parts = []
    if metrics.get("best_epoch"):
        best = f"best epoch {metrics['best_epoch']}"
        stage = metrics.get("best_stage")
        if stage:
            best += f" of {stages.get(stage, f'stage {stage}')}"
        parts.append(best)
    for key in epoch_columns(metrics):
        value = metrics.get(key)
        if key.startswith("val_") and isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"validation {epoch_label(key).removeprefix('Val ')} {value:.3f}")
    return "".join(f" · {part}" for part in parts)


def metrics_text(metrics: dict[str, Any], limit: int = 5) -> str:
    """A job's key numbers in one line: 'polygons 12 · changed fraction 3.4 %'."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        label = key.replace("_", " ").replace("val ", "validation ")
        if key.endswith("fraction"):
            parts.append(f"{label} {100 * value:.1f} %")
        elif isinstance(value, int):
            parts.append(f"{label} {value}")
        else:
            parts.append(f"{label} {value:.3g}")
    return " · ".join(parts[:limit])


class EpochTable(QTableWidget):
    """One row per epoch record of the running fine-tune; its first record decides the columns."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(0, 0, parent)
        self.setObjectName("epochTable")
        self.keys: list[str] = []
        self.reset()
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.setMaximumHeight(140)

    def reset(self) -> None:
        """An empty table for the next job (its first epoch record decides the columns)."""
        self.setRowCount(0)
        self._set_columns(["epoch", "loss"])

    def _set_columns(self, keys: list[str]) -> None:
        self.keys = list(keys)
        self.setColumnCount(len(keys))
        self.setHorizontalHeaderLabels([epoch_label(k) for k in keys])
        # Up to four columns share the width; more would elide the numbers in a narrow panel: fit them instead.
        header = self.horizontalHeader()
        wide = len(keys) > 4
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents if wide else QHeaderView.ResizeMode.Stretch)
        header.setStretchLastSection(True)

    def add_record(self, record: dict[str, Any]) -> None:
        if self.rowCount() == 0:
            self._set_columns(epoch_columns(record))  # the job's first record decides the columns
        row = self.rowCount()
        self.insertRow(row)
        # Every score of the epoch (also those without a column) in the row's tooltip.
        tip = "\n".join(f"{epoch_label(k)}: {cell_text(v)}" for k, v in record.items())
        for col, key in enumerate(self.keys):
            value = record.get(key)
            item = QTableWidgetItem(cell_text(value))
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            align = Qt.AlignmentFlag.AlignRight if numeric else Qt.AlignmentFlag.AlignLeft
            item.setTextAlignment(align | Qt.AlignmentFlag.AlignVCenter)
            item.setToolTip(tip)
            self.setItem(row, col, item)
        self.scrollToBottom()
