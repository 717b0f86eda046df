"""One message in the chat pane: a header line (who, and whether the reply was stopped) and the
text rendered as Markdown (code fences highlighted), or as plain text where line breaks matter
(a prompt file, an interactive transcript). A reply streams in through `append`.

Textual's `Markdown.append` works out where to resume parsing when it runs, not when it is
called, so two appends in flight at once garble the blocks (a code fence split into paragraphs,
`# comment` lines as headings). Streamed pieces therefore queue up and one task at a time hands
them to the widget; `finish` renders the whole reply once more, so a finished reply looks exactly
as it does when the chat is reopened."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Static


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
        self._queued = ""  # streamed text not yet handed to the Markdown widget
        self._final: str | None = None  # the finished text, rendered once the queue is empty
        self._flushing = False
        self._placeholder = not text  # the "…" shown until the first streamed text replaces it

    def compose(self) -> ComposeResult:
        yield Label(self._header(), classes="message-header")
        text = self._text or ("…" if self.streaming else "")
        if self.markdown:
            from textual.widgets import Markdown  # (here, not at the top: markdown-it and the code highlighter
            # take 25 ms of a 1 s start, and the first screen of a new chat shows no message)

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
        self.source += text
        self._queued += text
        self._kick()

    def finish(self, text: str, stopped: bool = False, note: str = "") -> None:
        self.streaming = False
        self.stopped = stopped
        self.note = note
        self.set_class(stopped, "stopped")
        self.query_one(".message-header", Label).update(self._header())
        self.source = text
        if not self.markdown:
            self.query_one(".message-body", Static).update(text)
            return
        self._final = text
        self._kick()

    @property
    def settled(self) -> bool:
        """True once everything appended or finished is on screen."""
        return not self._flushing and not self._queued and self._final is None

    def _kick(self) -> None:
        if not self._flushing:
            self._flushing = True
            self.run_worker(self._flush, group="markdown-stream")

    async def _flush(self) -> None:
        from textual.widgets import Markdown

        markdown = self.query_one(Markdown)
        try:
            while self._queued or self._final is not None:
                if self._queued:
                    chunk, self._queued = self._queued, ""
                    if self._placeholder:
                        self._placeholder = False
                        await markdown.update(chunk)
                    else:
                        await markdown.append(chunk)
                else:
                    final, self._final = self._final, None
                    self._placeholder = False
                    await markdown.update(final)
        finally:
            self._flushing = False
