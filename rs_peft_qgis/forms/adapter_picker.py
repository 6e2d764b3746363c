"""The adapter picker of a job form: the adapters of one method in the library, their metadata as tooltip."""

from __future__ import annotations

from typing import Any

from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtWidgets import QComboBox, QHBoxLayout, QToolButton, QWidget

from rs_peft_qgis.forms.widgets import shrinkable


def adapter_tooltip(meta: dict[str, Any]) -> str:
    """The adapter's metadata as an analyst reads it (what it was trained on, how well it did)."""
    area = meta.get("training_area") or {}
    metrics = meta.get("metrics") or {}
    scores = ", ".join(
        f"{k.removeprefix('val_').upper() if len(k) <= 7 else k.removeprefix('val_')} {v:.3f}"
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    bounds = area.get("bounds")
    where = f"{area.get('crs') or 'no CRS'}"
    if bounds:
        where += " [" + ", ".join(f"{b:.6g}" for b in bounds) + "]"
    size = meta.get("size_bytes")
    lines = [
        f"<b>{meta.get('name', '')}</b> ({meta.get('method', '?')})",
        f"Backbone: {meta.get('backbone', '?')}",
        f"Bands: {', '.join(str(b) for b in meta.get('bands') or []) or '?'}",
        f"Classes: {', '.join(str(c) for c in meta.get('classes') or []) or '?'}",
        f"Training area: {where}",
        f"Validation: {scores or 'not recorded'}",
        f"Created: {meta.get('created_at') or '?'}",
    ]
    if size:
        lines.append(f"Size: {size / 1e6:.1f} MB")
    return "<br>".join(lines)


class AdapterPicker(QWidget):
    """The adapters of one method in the library; metadata as tooltip; a refresh button."""

    refreshRequested = pyqtSignal()
    EMPTY = "No adapter in the library yet — fine-tune one first"

    NONE = "None"

    def __init__(self, method: str, parent: QWidget | None = None, optional: bool = False) -> None:
        super().__init__(parent)
        self.method, self.optional = method, optional
        self.combo = QComboBox(self)
        shrinkable(self.combo)
        self.refresh = QToolButton(self)
        self.refresh.setText("⟳")
        self.refresh.setToolTip("Read the adapter library again")
        self.refresh.clicked.connect(self.refreshRequested)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.refresh)
        self._wanted: str | None = None  # a name asked for before the library list arrived
        self.set_adapters([], loading=True)

    def set_adapters(self, adapters: list[dict[str, Any]], loading: bool = False) -> None:
        keep = self._wanted or self.value()
        self.combo.clear()
        mine = [a for a in adapters if not self.method or a.get("method") == self.method]
        if self.optional:  # an adapter to start from, or to name classes by: none is a valid choice
            self.combo.addItem(self.NONE, None)
        for meta in mine:
            self.combo.addItem(meta["name"], meta["name"])
            self.combo.setItemData(self.combo.count() - 1, adapter_tooltip(meta), Qt.ItemDataRole.ToolTipRole)
        if not mine and not self.optional:
            self.combo.addItem("Reading the adapter library…" if loading else self.EMPTY, None)
        if keep and self.combo.findData(keep) >= 0:
            self.combo.setCurrentIndex(self.combo.findData(keep))
            self._wanted = None
        self.combo.setToolTip(self.combo.itemData(self.combo.currentIndex(), Qt.ItemDataRole.ToolTipRole) or "")

    def names(self) -> list[str]:
        return [self.combo.itemData(i) for i in range(self.combo.count()) if self.combo.itemData(i)]

    def value(self) -> str | None:
        return self.combo.currentData()

    def set_value(self, name: str | None) -> None:
        index = self.combo.findData(name) if name else -1
        if index >= 0:
            self.combo.setCurrentIndex(index)
            self._wanted = None
        else:
            self._wanted = name  # selected as soon as the library list has it
