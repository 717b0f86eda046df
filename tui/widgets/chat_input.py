"""The message box: a multi-line TextArea where Enter sends and Shift+Enter or Ctrl+J starts a
new line (many terminals send Shift+Enter as plain Enter, so Ctrl+J is the one that always works)."""

from __future__ import annotations

from textual import events
from textual.message import Message
from textual.widgets import TextArea


class ChatInput(TextArea):
    class Submitted(Message):
        def __init__(self, chat_input: "ChatInput", text: str):
            super().__init__()
            self.chat_input = chat_input
            self.text = text

    def __init__(self, **kwargs):
        # short enough for an 80-column terminal; F1 has the rest
        kwargs.setdefault("placeholder", "Message · Enter sends · Ctrl+J new line · F1 help")
        kwargs.setdefault("soft_wrap", True)
        kwargs.setdefault("show_line_numbers", False)
        kwargs.setdefault("tab_behavior", "focus")
        super().__init__(**kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self, self.text))
            return
        if event.key in ("shift+enter", "ctrl+j", "alt+enter"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)
