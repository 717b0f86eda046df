"""The sidebar's "Saved contexts" section: how much disk the chats' saved KV caches use (instant
resume, tui/resume.py) and the budget, editable (MiB; 0 turns saving off). A value is checked
as it is typed, with the same rule as models.toml's `resume_budget_mib`, and posted as
`ResumeBudget.Changed` on Enter."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Input, Label, Static

from llamachat.model_store.library import check_resume_budget


class ResumeBudget(Vertical):
    DEFAULT_CSS = """
    ResumeBudget { height: auto; }
    """

    class Changed(Message):
        def __init__(self, mib: int):
            super().__init__()
            self.mib = mib

    def compose(self) -> ComposeResult:
        yield Label("Saved contexts", classes="sidebar-title")
        with Horizontal(classes="setting-row"):
            yield Label("budget MiB", classes="setting-label")
            yield Input(id="resume-budget", compact=True, classes="setting-input",
                        tooltip="Disk for chats' saved contexts, so a reopened chat is not read again "
                                "(least recently used go first; 0: off). Enter applies.")
        yield Static("", id="resume-budget-error", classes="setting-error")
        yield Static("", id="resume-usage")

    def show(self, mib: int, used_bytes: int, n_chats: int) -> None:
        field = self.query_one("#resume-budget", Input)
        if not field.has_focus:
            field.value = str(mib)
        self.query_one("#resume-usage", Static).update(
            f"{used_bytes / 2**20:.0f} of {mib} MiB used ({n_chats} chat{'s' if n_chats != 1 else ''})" if mib
            else "off: chats are read again when reopened")

    def _check(self, field: Input) -> int | None:
        error = self.query_one("#resume-budget-error", Static)
        try:
            mib = check_resume_budget(field.value)
        except ValueError as err:
            field.add_class("-invalid")
            error.update(str(err))
            error.add_class("-shown")
            return None
        field.remove_class("-invalid")
        error.update("")
        error.remove_class("-shown")
        return mib

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._check(event.input)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        mib = self._check(event.input)
        if mib is not None:
            self.post_message(self.Changed(mib))
