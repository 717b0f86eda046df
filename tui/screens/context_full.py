"""The question the "ask" context policy puts when the next request would not fit in the
model's context: drop the chat's oldest turns, start a new chat with the message, or cancel.
Dismisses with "drop", "new" or None (cancel: the message goes back into the box)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ContextFullScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, used: int, n_ctx: int):
        super().__init__()
        self.used = used
        self.n_ctx = n_ctx

    def compose(self) -> ComposeResult:
        with Vertical(id="context-full-box", classes="dialog"):
            yield Static(f"This chat no longer fits in the model's context: the next request is about {self.used} "
                        f"tokens with room for the reply, the context holds {self.n_ctx}. What now?",
                        id="context-full-question")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Drop oldest turns", id="drop", variant="primary")
                yield Button("New chat", id="new")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#drop", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(None if event.button.id == "cancel" else event.button.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
