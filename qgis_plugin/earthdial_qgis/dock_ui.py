"""How the EarthDial panel is laid out: its widgets, built once. The panel's behaviour is in dock.py."""

from __future__ import annotations

from typing import Any

from qgis.core import QgsSettings

from . import area as areas
from . import settings
from .presets import AUTO, PRESETS
from .qt import QtCore, QtWidgets
from .widgets import LaterLayers, PreviewLabel, raster_combo

GEOREF = "georef"  # data of the task entry that imports an answer instead of asking the model

# The backend's tasks, for when it cannot be asked (names must match backend/earthdial/prompts.py).
FALLBACK_TASKS: list[dict[str, Any]] = [
    {"name": "chat", "description": "Free question about the image", "needs_prompt": True, "grounded": False},
    {"name": "caption", "description": "Caption the image", "needs_prompt": False, "grounded": False},
    {"name": "vqa", "description": "Short answer to a question", "needs_prompt": True, "grounded": False},
    {
        "name": "classify",
        "description": "Scene class from a list (prompt: comma-separated classes)",
        "needs_prompt": True,
        "grounded": False,
    },
    {
        "name": "grounding",
        "description": "Describe the image with object boxes",
        "needs_prompt": False,
        "grounded": True,
    },
    {
        "name": "refer",
        "description": "Find objects (prompt: what to find, e.g. 'ships')",
        "needs_prompt": True,
        "grounded": True,
    },
    {
        "name": "identify",
        "description": "What is at a box (prompt: [[x1, y1, x2, y2, angle]] on 0-100)",
        "needs_prompt": True,
        "grounded": False,
    },
    {"name": "change", "description": "Is there a semantic change between two images?", "needs_prompt": False,
     "grounded": False, "images": 2},
    {"name": "disaster", "description": "Type of disaster between two images (prompt: options)",
     "needs_prompt": False, "grounded": False, "images": 2},
    {"name": "damage", "description": "Damage level of the building at a box (prompt: [[x1, y1, x2, y2, angle]])",
     "needs_prompt": True, "grounded": False, "images": 2},
    {"name": "post_disaster_refer", "description": "Find objects in the later image of a pair (prompt: e.g. 'buildings')",
     "needs_prompt": True, "grounded": True, "images": 2},
]  # fmt: skip


class DockLayout:
    """Builds the panel's widgets as attributes of the dock (a mixin of EarthDialDock)."""

    def _build_ui(self) -> None:
        body = QtWidgets.QWidget(self)
        layout = QtWidgets.QVBoxLayout(body)
        layout.addWidget(self._backend_box())
        layout.addWidget(self._input_box())
        layout.addWidget(QtWidgets.QLabel(self.tr("Prompt")))
        self.prompt_edit = QtWidgets.QPlainTextEdit()
        self.prompt_edit.setMaximumHeight(70)
        layout.addWidget(self.prompt_edit)
        layout.addLayout(self._request_buttons())
        layout.addWidget(self._output_tabs(), 1)
        scroll = QtWidgets.QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(body)
        self.setWidget(scroll)

    def _backend_box(self) -> QtWidgets.QGroupBox:
        box = QtWidgets.QGroupBox(self.tr("Backend"))
        form = QtWidgets.QFormLayout(box)
        self.endpoint_edit = QtWidgets.QLineEdit(settings.endpoint())
        self.endpoint_edit.setToolTip(self.tr("ZeroMQ endpoint of `earthdial serve`"))
        self.endpoint_edit.editingFinished.connect(self._endpoint_edited)
        self.refresh_button = QtWidgets.QToolButton()
        self.refresh_button.setText(self.tr("Check"))
        self.refresh_button.setToolTip(self.tr("Ask the backend what it has loaded"))
        self.refresh_button.clicked.connect(self.refresh_status)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.endpoint_edit, 1)
        row.addWidget(self.refresh_button)
        form.addRow(self.tr("Endpoint"), row)
        self.status_label = plain_label(self.tr("Not checked yet"))
        form.addRow(self.tr("Status"), self.status_label)
        self.start_button = QtWidgets.QPushButton(self.tr("Start local"))
        self.start_button.setToolTip(self.tr("Start `earthdial serve` with the model set in the settings"))
        self.start_button.clicked.connect(self.start_backend)
        self.stop_button = QtWidgets.QPushButton(self.tr("Stop"))
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop_backend)
        self.settings_button = QtWidgets.QToolButton()
        self.settings_button.setText(self.tr("Settings…"))
        self.settings_button.clicked.connect(self.open_settings)
        self.diagnostics_button = QtWidgets.QToolButton()
        self.diagnostics_button.setText(self.tr("Diagnostics…"))
        self.diagnostics_button.clicked.connect(self.open_diagnostics)
        buttons = QtWidgets.QGridLayout()
        buttons.addWidget(self.start_button, 0, 0)
        buttons.addWidget(self.stop_button, 0, 1)
        buttons.addWidget(self.settings_button, 1, 0)
        buttons.addWidget(self.diagnostics_button, 1, 1)
        for widget in (self.settings_button, self.diagnostics_button):
            widget.setSizePolicy(QtWidgets.QSizePolicy.Policy.Expanding, QtWidgets.QSizePolicy.Policy.Fixed)
        form.addRow("", buttons)
        return box

    def _input_box(self) -> QtWidgets.QGroupBox:
        box = QtWidgets.QGroupBox(self.tr("Question"))
        form = QtWidgets.QFormLayout(box)
        self.task_combo = QtWidgets.QComboBox()
        self.task_combo.currentIndexChanged.connect(self._task_changed)
        form.addRow(self.tr("Task"), self.task_combo)
        self.task_hint = plain_label()
        form.addRow("", self.task_hint)

        self.layer_label = QtWidgets.QLabel(self.tr("Layer"))
        self.layer_combo = raster_combo()
        self.layer_combo.layerChanged.connect(self._layer_changed)
        form.addRow(self.layer_label, self.layer_combo)
        self.later_label = QtWidgets.QLabel(self.tr("Later layers"))
        self.later_layers = LaterLayers()
        form.addRow(self.later_label, self.later_layers)

        self.area_combo = QtWidgets.QComboBox()
        for mode, text in (
            (areas.MAP_EXTENT, self.tr("Map extent")),
            (areas.WHOLE_LAYER, self.tr("Whole layer")),
            (areas.DRAWN, self.tr("Drawn rectangle")),
            (areas.SELECTION, self.tr("Selected features")),
        ):
            self.area_combo.addItem(text, mode)
        self.draw_button = QtWidgets.QToolButton()
        self.draw_button.setText(self.tr("Draw"))
        self.draw_button.setCheckable(True)
        self.draw_button.setToolTip(self.tr("Drag a rectangle on the map to ask about"))
        self.draw_button.toggled.connect(self._draw_toggled)
        self.rectangle_tool.deactivated.connect(lambda: self.draw_button.setChecked(False))
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.area_combo, 1)
        row.addWidget(self.draw_button)
        form.addRow(self.tr("Area"), row)

        self.preset_combo = QtWidgets.QComboBox()
        self.preset_combo.addItem(self.tr("auto"), AUTO)
        for name, description in PRESETS.items():
            self.preset_combo.addItem(name, name)
            self.preset_combo.setItemData(
                self.preset_combo.count() - 1, description, QtCore.Qt.ItemDataRole.ToolTipRole
            )
        self.preset_combo.setToolTip(self.tr("How bands become the model's input; auto: the backend decides"))
        self.bands_edit = QtWidgets.QLineEdit()
        self.bands_edit.setPlaceholderText(self.tr("displayed bands"))
        self.bands_edit.setToolTip(
            self.tr("1-based band numbers, e.g. 4,3,2; empty: the preset's or the displayed bands")
        )
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.preset_combo)
        row.addWidget(self.bands_edit, 1)
        form.addRow(self.tr("Bands"), row)

        self.gsd_spin = QtWidgets.QDoubleSpinBox()
        self.gsd_spin.setRange(0.0, 10000.0)
        self.gsd_spin.setDecimals(2)
        self.gsd_spin.setSuffix(self.tr(" m"))
        self.gsd_spin.setSpecialValueText(self.tr("auto"))
        self.gsd_spin.setToolTip(
            self.tr("Ground sampling distance the model should see; auto: the layer's own")
        )
        self.timeout_spin = QtWidgets.QSpinBox()
        self.timeout_spin.setRange(1, 3600)
        self.timeout_spin.setSuffix(self.tr(" s"))
        self.timeout_spin.setValue(settings.timeout_s())
        self.timeout_spin.setToolTip(self.tr("How long to wait for an answer"))
        self.timeout_spin.valueChanged.connect(lambda v: QgsSettings().setValue(settings.TIMEOUT, int(v)))
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.gsd_spin)
        row.addWidget(QtWidgets.QLabel(self.tr("Timeout")))
        row.addWidget(self.timeout_spin)
        form.addRow(self.tr("GSD"), row)
        return box

    def _request_buttons(self) -> QtWidgets.QHBoxLayout:
        self.region_button = QtWidgets.QPushButton(self.tr("Ask about a region"))
        self.region_button.setCheckable(True)
        self.region_button.setToolTip(
            self.tr("Drag a box or click a feature on the map: asks what is there (damage level for pairs)")
        )
        self.region_button.toggled.connect(self._region_toggled)
        self.region_tool.deactivated.connect(lambda: self.region_button.setChecked(False))
        self.send_button = QtWidgets.QPushButton(self.tr("Send"))
        self.send_button.setDefault(True)
        self.send_button.clicked.connect(self.send)
        self.cancel_button = QtWidgets.QPushButton(self.tr("Cancel"))
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QtWidgets.QHBoxLayout()
        buttons.addWidget(self.region_button)
        buttons.addStretch(1)
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.cancel_button)
        return buttons

    def _output_tabs(self) -> QtWidgets.QTabWidget:
        self.tabs = QtWidgets.QTabWidget()
        answer = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(answer)
        self.answer_view = QtWidgets.QPlainTextEdit()
        self.answer_view.setReadOnly(True)
        self.answer_view.setPlaceholderText(self.tr("The answer appears here."))
        self.result_label = plain_label()
        self.zoom_button = QtWidgets.QPushButton(self.tr("Zoom to results"))
        self.zoom_button.clicked.connect(self.zoom_to_results)
        self.save_button = QtWidgets.QPushButton(self.tr("Save to GeoPackage…"))
        self.save_button.clicked.connect(lambda: self.save_results())
        buttons = QtWidgets.QHBoxLayout()
        buttons.addWidget(self.zoom_button)
        buttons.addWidget(self.save_button)
        buttons.addStretch(1)
        layout.addWidget(self.answer_view, 1)
        layout.addWidget(self.result_label)
        layout.addLayout(buttons)
        self.tabs.addTab(answer, self.tr("Answer"))

        chip = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(chip)
        self.preview_label = PreviewLabel()
        self.preview_label.setMinimumHeight(240)
        self.preview_caption = plain_label()
        layout.addWidget(self.preview_label, 1)
        layout.addWidget(self.preview_caption)
        self.tabs.addTab(chip, self.tr("Preview"))

        chat = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(chat)
        self.chat_view = QtWidgets.QPlainTextEdit()
        self.chat_view.setReadOnly(True)
        self.chat_view.setPlaceholderText(
            self.tr("Chat turns about this layer appear here; they are saved with the project.")
        )
        self.new_chat_button = QtWidgets.QPushButton(self.tr("New conversation"))
        self.new_chat_button.clicked.connect(self.clear_history)
        layout.addWidget(self.chat_view, 1)
        layout.addWidget(self.new_chat_button)
        self.tabs.addTab(chat, self.tr("Chat"))
        self._set_result_buttons()
        return self.tabs


def plain_label(text: str = "") -> QtWidgets.QLabel:
    # plain text: answers and messages hold "<box>", "<array>" and the like, which rich text would eat
    label = QtWidgets.QLabel(text)
    label.setTextFormat(QtCore.Qt.TextFormat.PlainText)
    label.setWordWrap(True)
    return label
