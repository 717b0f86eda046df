"""Saved chats (Ctrl+O): search them, open one, rename one, delete one (the question names it),
export one to a Markdown file of the user's choosing.

The screen opens in its search box: typing filters the list to the chats holding every word
(the store's full-text search), matched words highlighted in the title and in a snippet of the
best-matching message; Up/Down move through the list and Enter opens the chat at that message.
The list's own keys (d, e, r) work once it has the focus (Tab, or a click); `/` goes back to
the search box, and Esc clears a search before it closes the screen.

Dismisses with (chat id, index of the message to show or None), or None."""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label

from llamachat.runtime.errors import UserError

from ..chat_store import MATCH_END, MATCH_START, search_terms
from .confirm import ConfirmScreen


TITLE_WIDTH = 36


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def marked_text(marked: str, style: str = "bold reverse") -> Text:
    """A store search result's marked string as Rich text, the matched words in `style`."""
    text = Text()
    inside = False
    for part in marked.replace(MATCH_END, MATCH_START).split(MATCH_START):
        if part:
            text.append(part, style if inside else "")
        inside = not inside
    return text


class ChatsScreen(ModalScreen):
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("enter", "open", "Open", show=False),
        Binding("d,delete", "delete", "Delete"),
        Binding("e", "export", "Export"),
        Binding("r", "rename", "Rename"),
        Binding("slash", "search", "Search", show=False),
        # in the search box, as in a command palette: the keys move through the list
        Binding("down", "cursor('down')", show=False),
        Binding("up", "cursor('up')", show=False),
        Binding("pagedown", "cursor('page_down')", show=False),
        Binding("pageup", "cursor('page_up')", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.hits: dict[int, int | None] = {}  # chat id -> the matching message shown, while searching
        self._searching: bool | None = None  # which columns the table has

    def compose(self) -> ComposeResult:
        with Vertical(id="chats-box", classes="dialog"):
            yield Label("Saved chats", classes="dialog-title")
            yield Input(placeholder="Type to search every saved chat", id="chats-search")
            yield DataTable(id="chats-table", cursor_type="row", zebra_stripes=True)
            yield Label("", id="chats-empty")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Open", id="open", variant="primary")
                yield Button("Export", id="export")
                yield Button("Rename", id="rename")
                yield Button("Delete", id="delete", variant="error")
                yield Button("Close", id="close")

    def on_mount(self) -> None:
        self.refresh_table()
        self.query_one("#chats-search", Input).focus()

    @property
    def search_text(self) -> str:
        return self.query_one("#chats-search", Input).value

    def _set_columns(self, searching: bool) -> None:
        if searching != self._searching:
            table = self.query_one(DataTable)
            table.clear(columns=True)
            # a long title is cut at TITLE_WIDTH so that when the chat was used, and how long it
            # is, fit at 80 columns; what runs past the edge comes last
            table.add_column("title", width=TITLE_WIDTH)
            if searching:
                table.add_columns("updated", "match")  # the snippet last: it may run past the edge
            else:
                table.add_columns("updated", "messages", "model", "mode")
            self._searching = searching

    def refresh_table(self) -> None:
        table = self.query_one(DataTable)
        store = self.app.store
        query = self.search_text
        try:
            search_terms(query)
            searching = True
        except UserError:  # nothing searchable typed (yet): every chat
            searching = False
        empty = ""
        try:
            hits = store.search(query) if searching and store else []
        except UserError as err:
            hits, empty = [], str(err)
        self._set_columns(searching)
        table.clear()
        self.hits = {}
        if searching:
            for hit in hits:
                if hit.seq is None:
                    match = Text("(title)", style="dim")
                else:
                    match = Text(f"{hit.seq + 1}. ", style="dim") + marked_text(hit.snippet)
                table.add_row(marked_text(hit.title), _when(hit.updated_at), match, key=str(hit.id))
                self.hits[hit.id] = hit.seq
            empty = empty or ("" if hits else f"No saved chat holds “{query.strip()}”.")
        else:
            chats = store.list() if store else []
            for chat in chats:
                table.add_row(chat.title, _when(chat.updated_at), str(chat.n_messages), chat.model, chat.mode, key=str(chat.id))
            empty = "" if chats else "No saved chats yet: they are saved as you talk."
        self.query_one("#chats-empty", Label).update(empty)

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "chats-search":
            event.stop()
            self.refresh_table()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "chats-search":
            event.stop()
            self.action_open()

    def action_cursor(self, direction: str) -> None:
        table = self.query_one(DataTable)
        {"down": table.action_cursor_down, "up": table.action_cursor_up,
         "page_down": table.action_page_down, "page_up": table.action_page_up}[direction]()

    def action_search(self) -> None:
        self.query_one("#chats-search", Input).focus()

    def _selected(self) -> int | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return int(key.value)

    def _open(self, chat_id: int) -> None:
        self.dismiss((chat_id, self.hits.get(chat_id)))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self._open(int(event.row_key.value))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        {"open": self.action_open, "export": self.action_export, "delete": self.action_delete,
         "rename": self.action_rename, "close": lambda: self.dismiss(None)}[event.button.id]()

    def action_open(self) -> None:
        chat_id = self._selected()
        if chat_id is not None:
            self._open(chat_id)

    def action_close(self) -> None:
        search = self.query_one("#chats-search", Input)
        if search.value:  # Esc clears a search first
            search.value = ""
            search.focus()
            return
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
        chat = self.app.store.summary(chat_id) if self.app.store else None
        if chat is None:
            return f"chat {chat_id}"
        return f"“{chat.title}” ({chat.n_messages} messages, {chat.model or 'no model'}, last used {_when(chat.updated_at)})"

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
