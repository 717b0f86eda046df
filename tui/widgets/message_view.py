"""One message in the chat pane: a header line (who, and whether the reply was stopped) and the
text rendered as Markdown (code fences highlighted), or as plain text where line breaks matter
(a prompt file, an interactive transcript). A reply streams in through `append`."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Markdown, Static


class MessageView(Vertical):
    def __init__(self, role: str, text: str = "", *, name_label: str = "", stopped: bool = False,
                 note: str = "", streaming: bool = False, markdown: bool = True, **kwargs):
        super().__init__(classes=f"message {role}", **kwargs)
        self.role = role
        self.name_label = name_label or ("You" if role == "user" else "Assistant")
        self._text = text
        self.stopped = stopped
        self.note = note
        self.streaming = streaming
        self.markdown = markdown
        self.source = text  # what has been shown so far (the raw streamed text while streaming)

    def compose(self) -> ComposeResult:
        yield Label(self._header(), classes="message-header")
        text = self._text or ("…" if self.streaming else "")
        if self.markdown:
            yield Markdown(text, classes="message-body")
        else:
            yield Static(text, markup=False, classes="message-body plain")

    def _header(self) -> str:
        header = self.name_label
        if self.streaming:
            header += "  ⋯ generating"
        if self.stopped:
            header += "  ■ stopped"
        if self.note:
            header += f"  ({self.note})"
        return header

    def append(self, text: str) -> None:
        """Add streamed text (called a handful of times per second with what has accumulated)."""
        if not text:
            return
        if not self.markdown:
            self.source += text
            self.query_one(".message-body", Static).update(self.source)
            return
        markdown = self.query_one(Markdown)
        if not self.source:
            markdown.update(text)
        else:
            markdown.append(text)
        self.source += text

    def finish(self, text: str, stopped: bool = False, note: str = "") -> None:
        self.streaming = False
        self.stopped = stopped
        self.note = note
        self.set_class(stopped, "stopped")
        self.query_one(".message-header", Label).update(self._header())
        # Markdown ignores the whitespace around a text, and re-rendering a long reply costs
        if not self.markdown or text.strip() != self.source.strip():
            self.query_one(".message-body").update(text)
        self.source = text
