"""The library's import dialog: bring a model in from a GGUF file, a Hugging Face folder or a
Meta checkpoint folder (model_store.importers.import_model), optionally merging a LoRA adapter
and quantizing to one of llama-quantize's types.

The import runs in a thread worker; its progress callback only stores the latest
(stage, done, total, tensor) and a 4 Hz timer on the UI thread shows it, so a fast stream of
tensors never floods the message queue. Cancel sets the import's cancel event (it stops at the
next tensor and leaves nothing). Errors a user can cause (UserError) are shown in the dialog as
their sentence; the dialog stays open to correct the fields. Dismisses with the new model's
name, or None if nothing was imported.
"""

from __future__ import annotations

import threading
from pathlib import Path

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, ProgressBar, Select, Static

from llamachat.runtime.errors import UserError

STAGES = {"convert": "Converting", "quantize": "Quantizing", "copy": "Copying", "report": "Measuring"}
REFRESH_HZ = 4


def quant_type_names() -> list[str]:
    """llama-quantize's type names, from the quantize code itself (one list in the project)."""
    from llamachat.runtime.gguf.quantize_model import QUANT_TYPES

    return list(QUANT_TYPES)


class ImportDialog(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel / close")]

    class Finished(Message):
        """From the worker: the imported model's name, or the error sentence."""

        def __init__(self, name: str | None, error: str | None):
            super().__init__()
            self.name = name
            self.error = error

    def __init__(self):
        super().__init__()
        self.cancel_event: threading.Event | None = None
        self.running = False
        self._latest: tuple[str, int, int, str] | None = None  # written by the worker thread
        self._shown: tuple[str, int, int, str] | None = None
        self.updates = 0  # progress refreshes actually drawn (tests check they are batched)

    def compose(self) -> ComposeResult:
        with Vertical(id="import-box", classes="dialog"):
            yield Label("Import a model", classes="dialog-title")
            yield Label("A .gguf file, a Hugging Face model folder or a Meta checkpoint folder", classes="import-hint")
            with Horizontal(classes="import-row"):
                yield Label("source", classes="import-label")
                yield Input(placeholder="path of the .gguf file or the model folder", id="import-path", compact=True)
            with Horizontal(classes="import-row"):
                yield Label("name", classes="import-label")
                yield Input(placeholder="optional: made from the source", id="import-name", compact=True)
            with Horizontal(classes="import-row"):
                yield Label("quant type", classes="import-label")
                yield Select([(name, name) for name in quant_type_names()], prompt="keep as is / F16 (no quantizing)",
                             allow_blank=True, id="import-quant", compact=True)
            with Horizontal(classes="import-row"):
                yield Label("LoRA adapter", classes="import-label")
                yield Input(placeholder="optional: a PEFT adapter folder to merge", id="import-lora", compact=True)
            yield Static("", id="import-error")
            yield Label("", id="import-stage")
            yield ProgressBar(id="import-progress", show_eta=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Import", id="import-start", variant="primary")
                yield Button("Cancel", id="import-cancel")

    def on_mount(self) -> None:
        self._show_running(False)
        self.query_one("#import-path", Input).focus()
        self.set_interval(1 / REFRESH_HZ, self._show_progress)

    # -- starting ---------------------------------------------------------------------------

    def _error(self, text: str) -> None:
        error = self.query_one("#import-error", Static)
        error.update(text)
        error.set_class(bool(text), "-shown")

    def _fields(self) -> tuple[Path, str | None, str | None, Path | None] | None:
        """The fields checked before anything starts; None (the sentence shown) if wrong."""
        from llamachat.model_store.importers import check_quant_type, source_kind
        from llamachat.model_store.library import check_name

        raw = self.query_one("#import-path", Input).value.strip()
        name = self.query_one("#import-name", Input).value.strip() or None
        quant = self.query_one("#import-quant", Select).value
        quant = None if quant is Select.NULL or quant is Select.BLANK else str(quant)
        lora_raw = self.query_one("#import-lora", Input).value.strip()
        if not raw:
            self._error("Type the path of a .gguf file, a Hugging Face folder or a Meta checkpoint folder first.")
            return None
        try:
            source = Path(raw).expanduser()
            source_kind(source)
            if name is not None:
                check_name(name)
            check_quant_type(quant)
            lora = Path(lora_raw).expanduser() if lora_raw else None
            if lora is not None and not lora.exists():
                raise UserError(f"{lora}: no such LoRA adapter folder")
        except UserError as err:
            self._error(str(err))
            return None
        return source, name, quant, lora

    def start(self) -> None:
        if self.running:
            return
        fields = self._fields()
        if fields is None:
            return
        self._error("")
        self.running = True
        self.cancel_event = threading.Event()
        self._latest = self._shown = None
        self._show_running(True)
        self.query_one("#import-progress", ProgressBar).update(total=None, progress=0)
        self.query_one("#import-stage", Label).update("Checking the source…")
        self.query_one("#import-cancel", Button).focus()
        self._import_worker(*fields, self.cancel_event)

    @work(thread=True, group="import", exit_on_error=False)
    def _import_worker(self, source: Path, name: str | None, quant: str | None, lora: Path | None,
                       cancel: threading.Event) -> None:
        from llamachat.model_store.importers import import_model

        def progress(stage: str, done: int, total: int, what: str = "") -> None:
            self._latest = (stage, done, total, what)  # one assignment: read by the UI timer

        # post_message, not call_from_thread: it never blocks, even if the app is closing
        try:
            entry = import_model(source, name=name, quant=quant, lora=lora, progress=progress, cancel=cancel)
        except UserError as err:
            self.post_message(self.Finished(None, str(err)))
            return
        except OSError as err:  # a disk error the importer did not word itself
            self.post_message(self.Finished(None, f"the import failed: {err.strerror or err}; nothing was imported"))
            return
        self.post_message(self.Finished(entry.name, None))

    # -- progress and the end ---------------------------------------------------------------

    def _show_running(self, running: bool) -> None:
        for widget in self.query("Input, Select, #import-start"):
            widget.disabled = running
        self.query_one("#import-progress").display = running
        self.query_one("#import-stage").display = running
        if not running:
            self.query_one("#import-stage", Label).update("")

    def _show_progress(self) -> None:
        latest = self._latest
        if not self.running or latest is None or latest == self._shown:
            return
        self._shown = latest
        stage, done, total, what = latest
        self.updates += 1
        bar = self.query_one("#import-progress", ProgressBar)
        bar.update(total=max(total, 1), progress=min(done, total))
        label = STAGES.get(stage, stage.capitalize())
        self.query_one("#import-stage", Label).update(f"{label} {done}/{total}" + (f": {what}" if what else ""))

    def on_import_dialog_finished(self, message: Finished) -> None:
        self.running = False
        if message.name is not None:
            self.dismiss(message.name)
            return
        self._show_running(False)
        self._error(message.error or "")

    def action_cancel(self) -> None:
        if self.running:
            if self.cancel_event is not None:
                self.cancel_event.set()
            self.query_one("#import-stage", Label).update("Cancelling at the next tensor…")
        else:
            self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "import-start":
            self.start()
        else:
            self.action_cancel()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.start()

    def on_unmount(self) -> None:
        if self.cancel_event is not None:  # the app is closing: stop the import, leave nothing
            self.cancel_event.set()
