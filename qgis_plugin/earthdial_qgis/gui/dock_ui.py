"""How the EarthDial panel is laid out: its widgets, built once. The panel's behaviour is in dock.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qgis.core import QgsSettings

from ..core import area as areas
from ..core import settings
from ..core.presets import AUTO
from ..core.qt import QtCore, QtWidgets
from .widgets import LaterLayers, PreviewLabel, raster_combo

if TYPE_CHECKING:
    from typing import TypeAlias

    from .backend_panel import BackendPanel
    from .maptools import RectangleMapTool, RegionMapTool

    DockBase: TypeAlias = (
        QtWidgets.QDockWidget
    )  # the class the dock's mixins go into, for the type checker only
else:
    DockBase = object


class DockLayout(DockBase):
    """Builds the panel's widgets as attributes of the dock (a mixin of EarthDialDock)."""

    # made by EarthDialDock.__init__ before _build_ui runs
    backend: BackendPanel
    rectangle_tool: RectangleMapTool
    region_tool: RegionMapTool

    if TYPE_CHECKING:  # the dock's own (dock.py) and ResultActions' (results.py) that the widgets connect to

        def send(self) -> None: ...
        def cancel(self) -> None: ...
        def schedule_plan(self, *_: Any) -> None: ...
        def refresh_status(self) -> None: ...
        def open_settings(self) -> None: ...
        def open_diagnostics(self) -> Any: ...
        def open_help(self) -> QtCore.QUrl: ...
        def open_installer(self, **options: Any) -> Any: ...
        def clear_history(self) -> None: ...
        def _task_changed(self, *_: Any) -> None: ...
        def _layer_changed(self, *_: Any) -> None: ...
        def _draw_toggled(self, on: bool) -> None: ...
        def _region_toggled(self, on: bool) -> None: ...
        def _set_result_buttons(self) -> None: ...
        def zoom_to_results(self) -> None: ...
        def save_results(self, path: str | None = None) -> str | None: ...
        def resume_scan(self) -> None: ...

    def _build_ui(self) -> None:
        body = QtWidgets.QWidget(self)
        layout = QtWidgets.QVBoxLayout(body)
        layout.addWidget(self._backend_box())
        layout.addWidget(self._input_box())
        layout.addWidget(QtWidgets.QLabel(self.tr("Prompt")))
        self.prompt_edit = QtWidgets.QPlainTextEdit()
        self.prompt_edit.setMaximumHeight(70)
        self.prompt_edit.setToolTip(
            self.tr("What to ask or find (the task's hint says what it takes); Ctrl+Return sends")
        )
        layout.addWidget(self.prompt_edit)
        layout.addLayout(self._request_buttons())
        layout.addWidget(self._output_tabs(), 1)
        scroll = QtWidgets.QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(
            QtCore.Qt.ScrollBarPolicy.ScrollBarAlwaysOff
        )  # fit, never scroll sideways
        scroll.setWidget(body)
        self.setWidget(scroll)
        self._shortcuts()
        self._connect_plan_updates()

    def _shortcuts(self) -> None:
        from ..core.qt import QtGui

        shortcut_class = getattr(QtWidgets, "QShortcut", None) or QtGui.QShortcut  # QtGui on Qt6
        self.send_shortcuts = []
        for keys in ("Ctrl+Return", "Ctrl+Enter"):  # the main keyboard's and the keypad's
            shortcut = shortcut_class(QtGui.QKeySequence(keys), self)
            shortcut.setContext(QtCore.Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(self.send)
            self.send_shortcuts.append(shortcut)

    def _tile_edited(self, _value: int) -> None:
        if not self._setting_tile:
            self._tile_chosen = True

    def _connect_plan_updates(self) -> None:
        """Every control that changes what would be sent asks for a new summary (debounced)."""
        self.task_combo.currentIndexChanged.connect(self.schedule_plan)
        self.area_combo.currentIndexChanged.connect(self.schedule_plan)
        self.preset_combo.currentIndexChanged.connect(self.schedule_plan)
        self.bands_edit.textChanged.connect(self.schedule_plan)
        self.gsd_spin.valueChanged.connect(self.schedule_plan)
        self.scan_radio.toggled.connect(self.schedule_plan)
        self.tile_spin.valueChanged.connect(self.schedule_plan)
        for combo in self.later_layers.combos:
            combo.layerChanged.connect(self.schedule_plan)

    def _backend_box(self) -> QtWidgets.QGroupBox:
        box = QtWidgets.QGroupBox(self.tr("Backend"))
        form = narrow_form(box)
        self.endpoint_edit = QtWidgets.QLineEdit(settings.endpoint())
        self.endpoint_edit.setToolTip(self.tr("ZeroMQ endpoint of `earthdial serve`"))
        self.endpoint_edit.editingFinished.connect(self.backend.endpoint_edited)
        self.refresh_button = QtWidgets.QToolButton()
        self.refresh_button.setText(self.tr("Check"))
        self.refresh_button.setToolTip(self.tr("Ask the backend what it has loaded"))
        self.refresh_button.clicked.connect(self.refresh_status)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.endpoint_edit, 1)
        row.addWidget(self.refresh_button)
        form.addRow(self.tr("Endpoint"), row)
        self.status_label = plain_label(self.tr("Not checked yet"))
        self.status_label.setToolTip(self.tr("What the backend says about itself, checked every few seconds"))
        form.addRow(self.tr("Status"), self.status_label)
        self.start_button = QtWidgets.QPushButton(self.tr("Start local"))
        self.start_button.setToolTip(self.tr("Start `earthdial serve` with the model set in the settings"))
        self.start_button.clicked.connect(self.backend.start)
        self.stop_button = QtWidgets.QPushButton(self.tr("Stop"))
        self.stop_button.setEnabled(False)
        self.stop_button.setToolTip(self.tr("Stop the local backend started from this panel"))
        self.stop_button.clicked.connect(self.backend.stop)
        self.settings_button = QtWidgets.QPushButton(self.tr("Settings…"))
        self.settings_button.setToolTip(
            self.tr("The local backend's command and model, and where results are stored")
        )
        self.settings_button.clicked.connect(self.open_settings)
        self.diagnostics_button = QtWidgets.QPushButton(self.tr("Diagnostics…"))
        self.diagnostics_button.setToolTip(
            self.tr("A report of versions, the backend and recent errors, to copy")
        )
        self.diagnostics_button.clicked.connect(self.open_diagnostics)
        self.help_button = QtWidgets.QPushButton(self.tr("Help"))
        self.help_button.setToolTip(self.tr("Open the plugin's help page (it ships with the plugin)"))
        self.help_button.clicked.connect(self.open_help)
        # full rows under the form, three buttons a row at most: nothing is clipped in a 300 px dock
        buttons = QtWidgets.QGridLayout()
        buttons.addWidget(self.start_button, 0, 0)
        buttons.addWidget(self.stop_button, 0, 1)
        buttons.addWidget(self.help_button, 0, 2)
        buttons.addWidget(self.settings_button, 1, 0, 1, 1)
        buttons.addWidget(self.diagnostics_button, 1, 1, 1, 2)
        for widget in (
            self.start_button,
            self.stop_button,
            self.help_button,
            self.settings_button,
            self.diagnostics_button,
        ):
            widget.setSizePolicy(QtWidgets.QSizePolicy.Policy.Ignored, QtWidgets.QSizePolicy.Policy.Fixed)
            widget.setMinimumWidth(widget.fontMetrics().horizontalAdvance(widget.text()) + 16)
        form.addRow(buttons)
        # -- Install backend... (install_dialog.py): offered while no backend command is set -----------
        self.install_backend_button = QtWidgets.QPushButton(self.tr("Install backend…"))
        self.install_backend_button.setObjectName("EarthDialInstallBackend")
        self.install_backend_button.setToolTip(
            self.tr("Install the EarthDial backend into a Python environment of its own and start it")
        )
        self.install_backend_button.clicked.connect(lambda: self.open_installer())
        form.addRow(self.install_backend_button)
        return box

    def _input_box(self) -> QtWidgets.QGroupBox:
        box = QtWidgets.QGroupBox(self.tr("Question"))
        form = narrow_form(box)
        self.task_combo = QtWidgets.QComboBox()
        narrow_combo(self.task_combo)
        self.task_combo.setToolTip(
            self.tr("What to ask the model; the hint below says what the prompt takes")
        )
        self.task_combo.currentIndexChanged.connect(self._task_changed)
        form.addRow(self.tr("Task"), self.task_combo)
        self.task_hint = plain_label()
        self.task_hint.setToolTip(self.tr("What the task does and what its prompt takes"))
        form.addRow("", self.task_hint)
        self.model_note = plain_label()
        self.model_note.setStyleSheet("color: #b35900;")
        self.model_note.setToolTip(
            self.tr("What the loaded model was trained for, as the backend reports it")
        )
        self.model_note.setVisible(False)
        form.addRow("", self.model_note)

        self.layer_label = QtWidgets.QLabel(self.tr("Layer"))
        self.layer_combo = raster_combo()
        self.layer_combo.setToolTip(self.tr("The raster layer to ask about (the first image of a pair)"))
        self.layer_combo.layerChanged.connect(self._layer_changed)
        form.addRow(self.layer_label, self.layer_combo)
        self.later_label = QtWidgets.QLabel(self.tr("Later layers"))
        self.later_layers = LaterLayers()
        self.later_layers.setToolTip(self.tr("The later image(s) of a before/after pair or time series"))
        form.addRow(self.later_label, self.later_layers)

        self.area_combo = QtWidgets.QComboBox()
        for mode, text in (
            (areas.MAP_EXTENT, self.tr("Map extent")),
            (areas.WHOLE_LAYER, self.tr("Whole layer")),
            (areas.DRAWN, self.tr("Drawn rectangle")),
            (areas.SELECTION, self.tr("Selected features")),
        ):
            self.area_combo.addItem(text, mode)
        narrow_combo(self.area_combo)
        self.area_combo.setToolTip(
            self.tr(
                "The part of the layer that is sent: the map view, the whole layer, a rectangle you "
                "draw, or the extent of the selected features"
            )
        )
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
        form.addRow(self.tr("Send as"), self._mode_row())

        self.preset_combo = QtWidgets.QComboBox()
        narrow_combo(self.preset_combo, 6)
        self.preset_combo.addItem(self.tr("auto"), AUTO)  # the backend's presets follow once it answers
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
        form.addRow(self.tr("GSD"), self.gsd_spin)
        form.addRow(self.tr("Timeout"), self.timeout_spin)
        self.plan_label = plain_label(self.tr("What will be sent is shown here once a backend answers."))
        self.plan_label.setToolTip(
            self.tr(
                "What Send will send, as the backend plans it from the layer's metadata: the window, by "
                "reference or by value, bands, band preset and why, sensor tag, ground resolution, tiles"
            )
        )
        form.addRow(self.tr("Sends"), self.plan_label)
        return box

    def _mode_row(self) -> QtWidgets.QGridLayout:
        """The first choice about the area: one window (read at most 2 048 px and resized to the model's
        input) or a tiled scan (every tile at the model's input size, boxes merged)."""
        self.window_radio = QtWidgets.QRadioButton(self.tr("One window"))
        self.window_radio.setToolTip(
            self.tr("The whole area as one picture: quick, but a large area is shrunk to the model's input")
        )
        self.scan_radio = QtWidgets.QRadioButton(self.tr("Tiled scan"))
        self.scan_radio.setToolTip(
            self.tr(
                "Find objects (refer, grounding) or changes (change) over the whole area, tile by tile at the "
                "layer's resolution: boxes appear as tiles finish and are merged at the end"
            )
        )
        self.mode_group = QtWidgets.QButtonGroup(self)
        self.mode_group.addButton(self.window_radio)
        self.mode_group.addButton(self.scan_radio)
        self.window_radio.setChecked(True)
        self.tile_spin = QtWidgets.QSpinBox()
        self.tile_spin.setRange(32, 8192)  # the backend's limits (tiling.MIN_TILE, MAX_TILE)
        self.tile_spin.setValue(448)
        self.tile_spin.setSuffix(self.tr(" px"))
        self.tile_spin.setToolTip(
            self.tr("Tile size in layer pixels (each tile is resized to the model's input)")
        )
        self.tile_spin.setEnabled(False)
        self.scan_radio.toggled.connect(self.tile_spin.setEnabled)
        self._tile_chosen = self._setting_tile = (
            False  # the tile size follows the model until the user picks one
        )
        self.tile_spin.valueChanged.connect(self._tile_edited)
        rows = QtWidgets.QGridLayout()  # one above the other: whole in a 300 px dock
        rows.addWidget(self.window_radio, 0, 0, 1, 2)
        rows.addWidget(self.scan_radio, 1, 0)
        rows.addWidget(self.tile_spin, 1, 1)
        return rows

    def _request_buttons(self) -> QtWidgets.QGridLayout:
        self.region_button = QtWidgets.QPushButton(self.tr("Ask about a region"))
        self.region_button.setCheckable(True)
        self.region_button.setToolTip(
            self.tr("Drag a box or click a feature on the map: asks what is there (damage level for pairs)")
        )
        self.region_button.toggled.connect(self._region_toggled)
        self.region_tool.deactivated.connect(lambda: self.region_button.setChecked(False))
        self.send_button = QtWidgets.QPushButton(self.tr("Send"))
        self.send_button.setDefault(True)
        self.send_button.setToolTip(self.tr("Send the question for the area (Ctrl+Return)"))
        self.send_button.clicked.connect(self.send)
        self.cancel_button = QtWidgets.QPushButton(self.tr("Cancel"))
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip(self.tr("Stop the running request; the backend stops working on it"))
        self.cancel_button.clicked.connect(self.cancel)
        # two rows, so that a 300 px dock shows every button whole; a scan mode adds its own row here
        self.request_rows = QtWidgets.QGridLayout()
        self.request_rows.addWidget(self.region_button, 0, 0, 1, 2)
        self.request_rows.addWidget(self.send_button, 1, 0)
        self.request_rows.addWidget(self.cancel_button, 1, 1)
        return self.request_rows

    def _output_tabs(self) -> QtWidgets.QTabWidget:
        self.tabs = QtWidgets.QTabWidget()
        self.tabs.setToolTip(self.tr("The answer, the picture that was sent, and this layer's chat"))
        answer = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(answer)
        self.answer_view = QtWidgets.QPlainTextEdit()
        self.answer_view.setReadOnly(True)
        self.answer_view.setPlaceholderText(self.tr("The answer appears here."))
        self.answer_view.setToolTip(self.tr("The model's answer, or what went wrong"))
        self.result_label = plain_label()
        self.storage_label = plain_label()
        self.storage_label.setToolTip(self.tr("Where result layers are written (Settings… changes it)"))
        self.zoom_button = QtWidgets.QPushButton(self.tr("Zoom to results"))
        self.zoom_button.setToolTip(self.tr("Zoom the map to the last result layer"))
        self.zoom_button.clicked.connect(self.zoom_to_results)
        self.save_button = QtWidgets.QPushButton(self.tr("Save to GeoPackage…"))
        self.save_button.setToolTip(
            self.tr("Add the last result as a new layer to a GeoPackage; the file's other layers are kept")
        )
        self.save_button.clicked.connect(lambda: self.save_results())
        self.resume_button = QtWidgets.QPushButton(self.tr("Resume scan"))
        self.resume_button.setToolTip(
            self.tr(
                "Go on with the stopped scan (the last one, or the stopped layer selected in the Layers "
                "panel): only its unfinished tiles are scanned, and the merged layer replaces it"
            )
        )
        self.resume_button.clicked.connect(self.resume_scan)
        buttons = QtWidgets.QVBoxLayout()  # one above the other: all whole in a narrow dock
        buttons.addWidget(self.zoom_button)
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.resume_button)
        layout.addWidget(self.answer_view, 1)
        layout.addWidget(self.result_label)
        layout.addLayout(buttons)
        layout.addWidget(self.storage_label)
        self.tabs.addTab(answer, self.tr("Answer"))

        chip = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(chip)
        self.preview_label = PreviewLabel()
        self.preview_label.setMinimumHeight(240)
        self.preview_label.setToolTip(self.tr("Exactly the window that was sent, with the answer's boxes"))
        self.preview_caption = plain_label()
        self.preview_caption.setToolTip(self.tr("What was sent, as the backend's reply reports it"))
        layout.addWidget(self.preview_label, 1)
        layout.addWidget(self.preview_caption)
        self.tabs.addTab(chip, self.tr("Preview"))

        chat = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(chat)
        self.chat_view = QtWidgets.QPlainTextEdit()
        self.chat_view.setReadOnly(True)
        self.chat_view.setToolTip(self.tr("The conversation about this layer; follow-ups carry it along"))
        self.chat_view.setPlaceholderText(
            self.tr("Chat turns about this layer appear here; they are saved with the project.")
        )
        self.new_chat_button = QtWidgets.QPushButton(self.tr("New conversation"))
        self.new_chat_button.setToolTip(
            self.tr("Forget this layer's chat: the next chat question starts afresh")
        )
        self.new_chat_button.clicked.connect(self.clear_history)
        layout.addWidget(self.chat_view, 1)
        layout.addWidget(self.new_chat_button)
        self.tabs.addTab(chat, self.tr("Chat"))
        self._set_result_buttons()
        return self.tabs


def narrow_combo(combo: QtWidgets.QComboBox, chars: int = 8) -> None:
    """A combo box as narrow as ``chars`` characters (its list still shows whole entries)."""
    combo.setSizeAdjustPolicy(QtWidgets.QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)


def narrow_form(box: QtWidgets.QWidget) -> QtWidgets.QFormLayout:
    """A form whose fields go under their labels when the dock is too narrow for both side by side."""
    form = QtWidgets.QFormLayout(box)
    form.setRowWrapPolicy(QtWidgets.QFormLayout.RowWrapPolicy.WrapLongRows)
    form.setFieldGrowthPolicy(QtWidgets.QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    return form


def plain_label(text: str = "") -> QtWidgets.QLabel:
    # plain text: answers and messages hold "<box>", "<array>" and the like, which rich text would eat
    label = QtWidgets.QLabel(text)
    label.setTextFormat(QtCore.Qt.TextFormat.PlainText)
    label.setWordWrap(True)
    return label
