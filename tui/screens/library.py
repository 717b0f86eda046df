"""The model library in the app (Ctrl+L): the same models.toml `llamachat models` edits.

A table of models (default marked, missing files marked, the quality figures measured at import)
and, for the selected model, its figures in full (read-only) and a form of its defaults: each
field is checked with runtime.params' rules, an empty field means "llama.cpp's default" (the key
is removed). Add a model from a file path, remove one, set the
default, and import a model (Ctrl+O: the import dialog, a GGUF file, a Hugging Face or Meta
folder, optionally quantized). Every change goes through model_store.library (validated, written atomically); its
error sentences are shown as they are.

The screen tells the app what happened and leaves the rest to it: `Changed` after each change
to models.toml, and `dismiss(name)` for "Use in chat" (None: back without a model to use).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, DataTable, Input, Label, Static

from llamachat.model_store.library import quality_details, quality_text
from llamachat.runtime.errors import UserError
from llamachat.runtime.params import SETTINGS, check_setting

from ..widgets.sidebar import format_value
from ..widgets.footer import KeyFooter
from .confirm import ConfirmScreen
from .import_dialog import ImportDialog

FORM_KEYS = ("description", *SETTINGS)


class LibraryCommands(Provider):
    """The library screen's actions in the command palette."""

    def _commands(self):
        screen = self.screen
        return [("Import a model…", "From a GGUF file, a Hugging Face or Meta folder, optionally quantized", screen.action_import_model)]

    async def discover(self) -> Hits:
        for title, help_text, action in self._commands():
            yield DiscoveryHit(title, action, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, action in self._commands():
            if (score := matcher.match(title)) > 0:
                yield Hit(score, matcher.highlight(title), action, help=help_text)


class LibraryScreen(Screen[str | None]):
    class Changed(Message):
        """models.toml was changed here (a model added, removed, its defaults, the default)."""

    COMMANDS = {LibraryCommands}
    BINDINGS = [
        Binding("escape", "close", "Back to chat"),
        Binding("ctrl+s", "save", "Save", priority=True),
        Binding("ctrl+d", "make_default", "Set default", priority=True),  # over Input's delete-right (Delete still works)
        Binding("ctrl+t", "use_model", "Use in chat", priority=True),
        Binding("ctrl+o", "import_model", "Import…", priority=True),
    ]

    def __init__(self, library_loader):
        super().__init__()
        self._load_library = library_loader  # callable -> Library (fresh read of models.toml)
        self.library = None
        self.selected: str | None = None

    def compose(self) -> ComposeResult:
        yield Label("Model library", classes="screen-title")
        yield Static("", id="library-file")
        with Horizontal(id="library-main"):
            with Vertical(id="library-left"):
                yield DataTable(id="library-table", cursor_type="row", zebra_stripes=True)
                yield Label("Add a model from a .gguf file", classes="sidebar-title")
                yield Input(placeholder="path to a .gguf file", id="add-path")
                yield Input(placeholder="name (optional: made from the file name)", id="add-name")
                with Horizontal(classes="dialog-buttons"):
                    yield Button("Add", id="add", variant="primary", compact=True)
                    yield Button("Use in chat", id="use", compact=True)
                    yield Button("Import…", id="import", compact=True)
            with VerticalScroll(id="library-form"):
                yield Label("", id="form-title", classes="sidebar-title")
                yield Static("", id="lib-quality")  # read-only: measured at import (--report)
                for key in FORM_KEYS:
                    with Horizontal(classes="setting-row"):
                        yield Label(key, classes="setting-label")
                        placeholder = "" if key == "description" else f"default {format_value(SETTINGS[key].default) or '(none)'}"
                        yield Input(id=f"lib-{key}", compact=True, placeholder=placeholder, classes="setting-input")
                    yield Static("", id=f"lib-error-{key}", classes="setting-error")
                with Horizontal(classes="dialog-buttons"):
                    yield Button("Save", id="save", variant="primary", compact=True)
                    yield Button("Set default", id="default", compact=True)
                    yield Button("Remove", id="remove", variant="error", compact=True)
                    yield Button("Back", id="back", compact=True)
        yield KeyFooter()

    def on_resize(self, event) -> None:
        # below 100 columns the form goes under the table instead of beside it
        self.set_class(event.size.width < 100, "-narrow")

    def on_mount(self) -> None:
        self.set_class(self.app.size.width < 100, "-narrow")  # a pushed screen gets no first Resize
        table = self.query_one(DataTable)
        table.add_columns("", "name", "file", "quality", "defaults")
        self.reload()
        table.focus()

    # -- showing ----------------------------------------------------------------------------

    def reload(self, select: str | None = None) -> None:
        try:
            self.library = self._load_library()
        except UserError as err:
            self.library = None
            self.notify(str(err), severity="error", title="Model library")
        table = self.query_one(DataTable)
        table.clear()
        lib = self.library
        if lib is None:
            return
        note = f"  (read-only: {lib.read_only_reason})" if lib.read_only else ""
        self.query_one("#library-file", Static).update(f"{lib.file}{note}")
        for warning in lib.warnings:
            self.notify(warning, severity="warning", title="models.toml")
        for entry in lib.models.values():
            mark = "★" if entry.name == lib.default_name else ""
            file = (entry.base_url if entry.remote else
                    "MISSING " + str(entry.path) if entry.missing else entry.path.name)
            defaults = ", ".join(f"{k}={format_value(v)}" for k, v in entry.settings.items())
            table.add_row(mark, entry.name, file, quality_text(entry.quality) or "-", defaults or "-", key=entry.name)
        names = list(lib.models)
        target = select if select in names else self.selected if self.selected in names else (names[0] if names else None)
        if target is not None:
            table.move_cursor(row=names.index(target))
        self.show_form(target)

    def show_form(self, name: str | None) -> None:
        self.selected = name
        entry = self.library.models.get(name) if (self.library and name) else None
        self.query_one("#form-title", Label).update(f"Defaults of {name}" if entry else "No model selected")
        details = quality_details(entry.quality) if entry is not None else ""
        quality = self.query_one("#lib-quality", Static)
        quality.update(f"quality: {details}" if details else "")
        quality.display = bool(details)
        for key in FORM_KEYS:
            field = self.query_one(f"#lib-{key}", Input)
            if entry is None:
                field.value = ""
            elif key == "description":
                field.value = entry.description or ""
            else:
                field.value = format_value(entry.settings[key]) if key in entry.settings else ""
            field.remove_class("-invalid")
            self.query_one(f"#lib-error-{key}", Static).update("")
            self.query_one(f"#lib-error-{key}", Static).remove_class("-shown")

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key is not None and event.row_key.value != self.selected:
            self.show_form(event.row_key.value)

    # -- editing ----------------------------------------------------------------------------

    def _check_field(self, key: str) -> tuple[bool, object]:
        field = self.query_one(f"#lib-{key}", Input)
        error = self.query_one(f"#lib-error-{key}", Static)
        raw = field.value.strip() if key != "description" else field.value
        if key != "description" and raw == "":
            value = None
        elif key == "description":
            value = raw
        else:
            try:
                value = check_setting(key, raw)
            except ValueError as err:
                field.add_class("-invalid")
                error.update(str(err)); error.add_class("-shown")
                return False, None
        field.remove_class("-invalid")
        error.update("")
        error.remove_class("-shown")
        return True, value

    def on_input_changed(self, event: Input.Changed) -> None:
        key = (event.input.id or "").removeprefix("lib-")
        if key in FORM_KEYS:
            self._check_field(key)

    def action_save(self) -> None:
        if not self.library or not self.selected or self.selected not in self.library.models:
            return
        entry = self.library.models[self.selected]
        changes = {}
        ok = True
        for key in FORM_KEYS:
            valid, value = self._check_field(key)
            if not valid:
                ok = False
                continue
            current = entry.description if key == "description" else entry.settings.get(key)
            if key == "description" and value == (current or ""):
                continue
            if value != current:
                changes[key] = value
        if not ok:
            self.notify("Fix the fields marked in red first; nothing was saved.", severity="error")
            return
        if not changes:
            self.notify("Nothing changed.")
            return
        try:
            self.library.set(self.selected, **changes)
        except UserError as err:
            self.notify(str(err), severity="error", title="Not saved")
            return
        self.notify(f"Saved {', '.join(changes)} for {self.selected}.", title="Model library")
        self.reload(self.selected)
        self.post_message(self.Changed())

    def action_make_default(self) -> None:
        if not self.library or not self.selected:
            return
        try:
            self.library.set_default(self.selected)
        except UserError as err:
            self.notify(str(err), severity="error")
            return
        self.notify(f"{self.selected} is now the default model.")
        self.reload(self.selected)
        self.post_message(self.Changed())

    def action_use_model(self) -> None:
        if self.selected:
            self.dismiss(self.selected)

    def add_model(self) -> None:
        path = self.query_one("#add-path", Input).value.strip()
        name = self.query_one("#add-name", Input).value.strip() or None
        if not path:
            self.notify("Type the path of a .gguf file first.", severity="warning")
            return
        if self.library is None:
            return
        try:
            entry = self.library.add(path, name=name)
        except UserError as err:
            self.notify(str(err), severity="error", title="Not added")
            return
        self.query_one("#add-path", Input).value = ""
        self.query_one("#add-name", Input).value = ""
        self.notify(f"Added {entry.name}.", title="Model library")
        self.reload(entry.name)
        self.post_message(self.Changed())

    def remove_model(self) -> None:
        name = self.selected
        if not self.library or not name:
            return

        def done(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self.library.remove(name)
            except UserError as err:
                self.notify(str(err), severity="error")
                return
            self.notify(f"Removed {name} from the library (the file was left where it is).")
            self.selected = None
            self.reload()
            self.post_message(self.Changed())

        self.app.push_screen(ConfirmScreen(f"Remove {name} from the library? The file itself is kept.", yes="Remove"), done)

    def action_import_model(self) -> None:
        """The import dialog; a model it imports is shown selected here and in the picker."""

        def done(name: str | None) -> None:
            if not name:
                return
            self.reload(name)
            entry = self.library.models.get(name) if self.library else None
            where = f" ({entry.base_url if entry.remote else entry.path.name})" if entry else ""
            self.notify(f"Imported {name}{where}.", title="Model library")
            self.post_message(self.Changed())

        if self.library is not None and self.library.read_only:
            self.notify(f"The library cannot be changed: {self.library.read_only_reason}", severity="error")
            return
        self.app.push_screen(ImportDialog(), done)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id in ("add-path", "add-name"):
            self.add_model()
        elif (event.input.id or "").startswith("lib-"):
            self.action_save()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        actions = {"add": self.add_model, "default": self.action_make_default, "use": self.action_use_model,
                   "remove": self.remove_model, "save": self.action_save, "back": self.action_close,
                   "import": self.action_import_model}
        actions[event.button.id]()

    def action_close(self) -> None:
        self.dismiss(None)
