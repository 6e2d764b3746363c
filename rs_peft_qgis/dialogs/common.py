"""Small widgets and styles the dialogs share."""

from __future__ import annotations

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtGui import QFontDatabase
from qgis.PyQt.QtWidgets import QLabel, QPlainTextEdit

ERROR_STYLE = "color: #c0392b;"
OK_STYLE = "color: #1e8449;"


def show_message(label: QLabel, text: str, style: str = "") -> None:
    """`text` in `label` (hidden when empty), styled as an error, a success or plain."""
    label.setStyleSheet(style)
    label.setText(text)
    label.setVisible(bool(text))


def fixed_font_view() -> QPlainTextEdit:
    view = QPlainTextEdit()
    view.setReadOnly(True)
    view.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
    return view


def file_widget(mode: QgsFileWidget.StorageMode, title: str, placeholder: str = "") -> QgsFileWidget:
    widget = QgsFileWidget()
    widget.setStorageMode(mode)
    widget.setDialogTitle(title)
    widget.lineEdit().setPlaceholderText(placeholder)
    return widget


def wrapped_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    return label
