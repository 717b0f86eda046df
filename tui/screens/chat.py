"""The main screen: the conversation (auto-scrolling until the user scrolls up), the message box
with Send and Stop, the settings sidebar, and a status line (model, quant, tokens/s of the last
reply, context used / n_ctx, what happens when the context fills). The screen only shows things;
the app (tui/app.py) owns the engine and the conversation, and hears from the screen by
messages: `Ready` once it is composed, `StopPressed` for Esc or the Stop button."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Static

from ..widgets.chat_input import ChatInput
from ..widgets.footer import KeyFooter
from ..widgets.message_view import MessageView
from ..widgets.sidebar import Sidebar


class StatusLine(Static):
    """A line of status (the status line, the compile notice), made again for its width when
    that changes (at 80 columns the app's whole status line does not fit and it chooses what to
    leave out: ChatApp.status_text) and only then or when its text changes: an update lays the
    whole screen out again, and the app's timer shows these ten times a second during a load or
    a reply."""

    def show(self, text) -> None:
        self._source = text
        self._render_source()

    _shown = None  # the text last rendered

    def _render_source(self) -> None:
        source = getattr(self, "_source", "")
        width = self.content_region.width or max(self.screen.size.width - 2, 1)
        text = source(width) if callable(source) else source
        if text != self._shown:
            self._shown = text
            self.update(text)

    def on_resize(self, event) -> None:
        self._render_source()


class ChatScreen(Screen):
    class Ready(Message):
        """The screen is composed: the app can fill it in and load the model."""

    class StopPressed(Message):
        """Esc or the Stop button: stop the reply being written."""

    BINDINGS = [
        Binding("escape", "escape", "Stop"),
        Binding("ctrl+n", "app.new_chat", "New"),
        Binding("ctrl+r", "app.regenerate", "Regen"),
        Binding("ctrl+e", "app.edit_last", "Edit", priority=True),  # over the TextArea's end-of-line (End still works)
        Binding("ctrl+o", "app.chats", "Chats"),
        Binding("ctrl+l", "app.library", "Library"),
        Binding("ctrl+b", "toggle_sidebar", "Settings"),
        Binding("f2", "app.copy_reply", "Copy reply", show=False),
        Binding("f3", "app.copy_code", "Copy code", show=False),
        # F1 works everywhere; `?` only where it is not typed into a field
        Binding("f1", "app.help", "Help"),
        Binding("question_mark", "app.help", "Help", show=False),
    ]

    def __init__(self, *args, settings: dict | None = None, **kwargs):
        """settings: what the sidebar's fields start with (the app's settings)."""
        super().__init__(*args, **kwargs)
        self._settings = settings

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                yield VerticalScroll(id="messages")
                yield StatusLine("", id="engine-notice")  # what a long wait is (kernels compiling)
                with Horizontal(id="input-row"):
                    yield ChatInput(id="prompt")
                    with Vertical(id="input-buttons"):
                        yield Button("Send", id="send", variant="primary", compact=True)
                        yield Button("Stop", id="stop", variant="error", compact=True, disabled=True)
            yield Sidebar(id="sidebar", settings=self._settings, deferred=True)
        yield StatusLine("", id="status")
        yield KeyFooter()

    def on_mount(self) -> None:
        self._fit_width(self.app.size.width)
        self.query_one("#messages", VerticalScroll).anchor()
        self.query_one("#prompt", ChatInput).focus()
        self.post_message(self.Ready())

    @property
    def messages(self) -> VerticalScroll:
        return self.query_one("#messages", VerticalScroll)

    @property
    def sidebar(self) -> Sidebar:
        return self.query_one(Sidebar)

    @property
    def chat_input(self) -> ChatInput:
        return self.query_one("#prompt", ChatInput)

    def add_message(self, view: MessageView) -> MessageView:
        self.messages.mount(view)
        return view

    def show_message(self, index: int) -> None:
        """Scroll so that message `index` of the conversation (a preamble view is not one) is at
        the top, and mark it until another chat is shown. The views of the chat shown before go
        and the Markdown above the message renders after this is called, moving it down, so the
        scroll is repeated until its place stops changing."""
        last: list = [None]

        def scroll(tries: int) -> None:
            views = [v for v in self.messages.query(MessageView) if v.role != "preamble"]
            if not 0 <= index < len(views):
                return
            target = views[index]
            for view in views:
                view.set_class(view is target, "-found")
            messages = self.messages
            # a chat that fits the pane keeps the anchor, which shows it at the bottom: released,
            # the offset that puts it there would stay as the Markdown grows, pushing it out of sight
            fits = messages.max_scroll_y <= 0
            if not fits:
                messages.release_anchor()  # else the next layout scrolls back to the end
                messages.scroll_to(y=min(target.virtual_region.y, messages.max_scroll_y), animate=False, immediate=True)
            place = (target.virtual_region.y, messages.virtual_size.height)
            at_top = abs(target.region.y - messages.content_region.y) <= 1 or messages.scroll_y >= messages.max_scroll_y
            settled = place == last[0] and target.region.height > 0 and (fits or at_top)
            if not settled and tries < 60:  # about 3 s: a long chat's Markdown on a busy machine
                last[0] = place
                self.set_timer(0.05, lambda: scroll(tries + 1))

        self.call_after_refresh(scroll, 0)

    def clear_messages(self) -> None:
        self.messages.remove_children()

    def set_generating(self, generating: bool) -> None:
        self.query_one("#stop", Button).disabled = not generating
        self.query_one("#send", Button).disabled = generating

    def show_notice(self, text: str | None) -> None:
        notice = self.query_one("#engine-notice", StatusLine)
        notice.display = bool(text)
        if text:
            notice.show(text)

    def set_status(self, text) -> None:
        """`text`: the line, or a function of the width it has (the app's status_text)."""
        self.query_one("#status", StatusLine).show(text)

    def action_escape(self) -> None:
        """Esc stops a reply and, from anywhere on the screen, returns to the message box."""
        self.post_message(self.StopPressed())
        self.chat_input.focus()

    @on(Sidebar.SettingChanged)
    def _setting_entered(self, event: Sidebar.SettingChanged) -> None:
        if event.submitted:  # Enter in a sidebar field: the next thing typed is a message again
            self.chat_input.focus()

    NARROW = 100  # below this many columns the sidebar starts hidden (Ctrl+B shows it)

    def on_resize(self, event) -> None:
        self._fit_width(event.size.width)

    def _fit_width(self, width: int) -> None:
        narrow = width < self.NARROW
        self.set_class(narrow, "-narrow")
        # at 80 columns the footer's keys ran under its "^p palette" (f1 Help and ^q Quit were
        # hidden): narrow, they go closer together and the palette key (still Ctrl+P) is left out
        footer = self.query_one(KeyFooter)
        footer.compact = narrow
        footer.show_command_palette = not narrow

    def action_toggle_sidebar(self) -> None:
        # on a narrow screen the sidebar is hidden unless asked for, on a wide one shown unless not
        if self.has_class("-narrow"):
            self.toggle_class("-show-sidebar")
        else:
            self.toggle_class("-hide-sidebar")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "send":
            event.stop()
            text = self.chat_input.text
            if text.strip():
                self.chat_input.post_message(ChatInput.Submitted(self.chat_input, text))
        elif event.button.id == "stop":
            event.stop()
            self.post_message(self.StopPressed())
