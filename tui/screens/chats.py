"""Saved chats (Ctrl+O): open one, rename one, delete one (the question names it), export one
to a Markdown file of the user's choosing. Dismisses with the id of the chat to open, or None."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Label

from llamachat.runtime.errors import UserError

from .confirm import ConfirmScreen


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


class ChatsScreen(ModalScreen):
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("enter", "open", "Open", show=False),
        Binding("d,delete", "delete", "Delete"),
        Binding("e", "export", "Export"),
        Binding("r", "rename", "Rename"),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="chats-box", classes="dialog"):
            yield Label("Saved chats", classes="dialog-title")
            yield DataTable(id="chats-table", cursor_type="row", zebra_stripes=True)
            yield Label("", id="chats-empty")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Open", id="open", variant="primary")
                yield Button("Export", id="export")
                yield Button("Rename", id="rename")
                yield Button("Delete", id="delete", variant="error")
                yield Button("Close", id="close")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("title", "model", "mode", "messages", "updated")
        self.refresh_table()
        table.focus()

    def refresh_table(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        chats = self.app.store.list() if self.app.store else []
        for chat in chats:
            table.add_row(chat.title, chat.model, chat.mode, str(chat.n_messages), _when(chat.updated_at), key=str(chat.id))
        self.query_one("#chats-empty", Label).update("" if chats else "No saved chats yet: they are saved as you talk.")

    def _selected(self) -> int | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return int(key.value)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.dismiss(int(event.row_key.value))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        {"open": self.action_open, "export": self.action_export, "delete": self.action_delete,
         "rename": self.action_rename, "close": self.action_close}[event.button.id]()

    def action_open(self) -> None:
        chat_id = self._selected()
        if chat_id is not None:
            self.dismiss(chat_id)

    def action_close(self) -> None:
        self.dismiss(None)

    def action_export(self) -> None:
        chat_id = self._selected()
        if chat_id is not None:
            self.app.ask_export(chat_id)

    def action_rename(self) -> None:
        chat_id = self._selected()
        if chat_id is not None:
            self.app.ask_rename(chat_id, done=self.refresh_table)

    def _describe(self, chat_id: int) -> str:
        """The chat as the user knows it: two chats may share a title, so when and how long too."""
        for chat in self.app.store.list() if self.app.store else []:
            if chat.id == chat_id:
                return f"“{chat.title}” ({chat.n_messages} messages, {chat.model or 'no model'}, last used {_when(chat.updated_at)})"
        return f"chat {chat_id}"

    def action_delete(self) -> None:
        chat_id = self._selected()
        if chat_id is None:
            return

        def done(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self.app.delete_chat(chat_id)
            except UserError as err:
                self.notify(str(err), severity="error")
            self.refresh_table()

        self.app.push_screen(ConfirmScreen(f"Delete {self._describe(chat_id)}? This cannot be undone.", yes="Delete"), done)
