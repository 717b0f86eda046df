"""The parameter sidebar: model picker (with load progress, and the chosen model's quality
figures from import when it has them), the sampling settings, the system prompt, what happens when a chat outgrows n_ctx (context_policy). Every field is checked with runtime.params' rules as it is typed; an invalid value shows
the sentence under the field and is not applied. Valid changes are posted as `SettingChanged`
and apply to the next reply (n_ctx re-creates the context: on Enter, or at the next reply).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.css.query import NoMatches
from textual.message import Message
from textual.widgets import Input, Label, ProgressBar, Select, Static, TextArea

from llamachat.runtime.params import SETTINGS, check_setting

from ..conversation import SIDEBAR_SETTINGS
from .resume_budget import ResumeBudget

# context_policy's choices (runtime.params.CONTEXT_POLICIES) as the picker shows them
POLICY_LABELS = (("drop oldest turns", "drop-oldest"), ("stop and ask", "ask"), ("shift the context", "shift"))


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class Sidebar(VerticalScroll):
    """The fields are made by `build`, not when the chat screen is: about 45 widgets, a sixth of
    a warm start's CPU before the model is ready (Python runs the app's layout and the model
    load on one core at a time), so the app builds them once the model is ready (or after
    BUILD_AFTER seconds of a longer load, or at once when there is none). Until then the
    show_* methods keep what they are given, and `build` shows it."""

    _policy = SETTINGS["context_policy"].default  # the context policy the picker shows
    _quality: dict = {}  # model name -> its quality figures in short ("" or absent: none)
    BUILD_AFTER = 1.5  # seconds: the latest the app builds the fields during a load
    built = False  # the fields are there (build has ended)
    _building = False
    _models: tuple | None = None  # show_models' arguments, kept until built
    _progress: float | None = None  # show_progress's fraction, kept until built
    _resume: tuple | None = None  # show_resume's arguments, kept until built
    _mode: tuple | None = None  # show_mode's arguments, kept until built
    class SettingChanged(Message):
        def __init__(self, name: str, value, submitted: bool = False):
            super().__init__()
            self.name = name
            self.value = value
            self.submitted = submitted

    class ModelChosen(Message):
        """The user picked a model in the picker; name None: "(no model)"."""

        def __init__(self, name: str | None):
            super().__init__()
            self.name = name

    class SystemPromptChanged(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, *args, settings: dict | None = None, deferred: bool = False, **kwargs):
        """settings: the values the fields start with (show_settings changes them later);
        made with them, the fields need no update after they are shown, which restyled each.
        deferred: the fields wait for `build` (the chat screen's); else they are made at once."""
        super().__init__(*args, **kwargs)
        self._initial = settings or {}
        self._building = self.built = not deferred

    def compose(self) -> ComposeResult:
        if not self._building:
            return
        first = self._initial
        yield Label("Model", classes="sidebar-title")
        yield Select([], id="model-select", prompt="(no model)", allow_blank=True, compact=True)
        yield Static("", id="model-quality")
        yield ProgressBar(total=100, show_eta=False, id="load-progress")
        yield Static("", id="mode-info")
        yield Label("Sampling", classes="sidebar-title")
        for name, label in SIDEBAR_SETTINGS:
            with Horizontal(classes="setting-row"):
                yield Label(label, classes="setting-label")
                # (validate_on=[]: the checks are _check's; Textual's own, with no validators,
                # only set and restyled a "-valid" class on every change)
                yield Input(format_value(first[name]) if name in first else "", id=f"setting-{name}", compact=True,
                            classes="setting-input", tooltip=SETTINGS[name].help, validate_on=[])
        yield Label("When the chat outgrows n_ctx", classes="sidebar-title")
        self._take_policy(first)
        yield Select(POLICY_LABELS, value=self._policy, id="context-policy", allow_blank=False, compact=True,
                     tooltip=SETTINGS["context_policy"].help)
        yield Label("System prompt", classes="sidebar-title")
        yield TextArea(first.get("system_prompt", ""), id="system-prompt", soft_wrap=True, compact=True,
                       tab_behavior="focus")
        yield ResumeBudget()

    def build(self) -> None:
        """Make the fields, once (see the class), with what the show_* methods were given."""
        if not self._building and self.is_attached:
            self._building = True
            self.call_later(self._build)

    async def _build(self) -> None:
        await self.recompose()
        self.built = True
        self.show_settings(self._initial)  # (any given while compose ran)
        if self._models is not None:
            self.show_models(*self._models)
        self.show_progress(self._progress)
        if self._mode is not None:
            self.show_mode(*self._mode)
        if self._resume is not None:
            self.show_resume(*self._resume)

    # -- filled in by the app ---------------------------------------------------------------

    # Filling a field posts Changed like a user edit would; the app ignores values it already has.

    def show_settings(self, settings: dict) -> None:
        if not self.built:
            self._initial = dict(settings)  # (what compose fills the fields with)
            return
        for name, _ in SIDEBAR_SETTINGS:
            field, value = self.query_one(f"#setting-{name}", Input), format_value(settings[name])
            if field.value != value:
                field.value = value
            field.remove_class("-invalid")
            self._show_error(name, "")
        policy = self.query_one("#context-policy", Select)
        if self._take_policy(settings):
            if policy.value != self._policy:
                with policy.prevent(Select.Changed):  # filled in, not chosen: nothing to report
                    policy.value = self._policy
        area = self.query_one("#system-prompt", TextArea)
        if area.text != settings.get("system_prompt", ""):
            area.text = settings.get("system_prompt", "")

    def _take_policy(self, settings: dict) -> bool:
        """Make settings' context_policy the one the picker shows, if it is one of its choices."""
        if settings.get("context_policy") in {value for _, value in POLICY_LABELS}:
            self._policy = settings["context_policy"]
            return True
        return False

    def show_models(self, options: list[tuple[str, str]], current: str | None, quality: dict | None = None) -> None:
        """Show the models and which one is in use. Not a user's choice, so no ModelChosen:
        re-filling the list passes through the blank entry, which would unload the model.
        `quality`: model name -> its figures in short (model_store.library.quality_text)."""
        if not self.built:
            self._models = (options, current, quality)
            return
        self._quality = dict(quality or {})
        select = self.query_one("#model-select", Select)
        with select.prevent(Select.Changed):
            select.set_options(options)
            if current is not None and any(value == current for _, value in options):
                select.value = current
            else:
                select.clear()
        self._show_quality(select.value)

    def _show_quality(self, name) -> None:
        text = self._quality.get(name, "") if isinstance(name, str) else ""
        line = self.query_one("#model-quality", Static)
        line.update(f"quality: {text}" if text else "")
        line.display = bool(text)

    def show_progress(self, fraction: float | None) -> None:
        if not self.built:
            self._progress = fraction
            return
        bar = self.query_one("#load-progress", ProgressBar)
        bar.display = fraction is not None
        if fraction is not None:
            bar.update(progress=max(0.0, min(1.0, fraction)) * 100)

    def show_mode(self, text: str, system_prompt: bool) -> None:
        """The chat's mode line; system_prompt: whether the mode reads the system prompt field."""
        if not self.built:
            self._mode = (text, system_prompt)
            return
        info = self.query_one("#mode-info", Static)
        info.update(text)
        # measured again once the screen has settled: set while the sidebar was gaining its
        # scrollbar, the line kept the one-line height it had empty and lost its wrapped end
        self.app.call_after_refresh(info.refresh, layout=True)
        self.query_one("#system-prompt", TextArea).disabled = not system_prompt

    def show_resume(self, mib: int, used_bytes: int, n_chats: int) -> None:
        """The saved contexts' budget and use (ResumeBudget.show)."""
        if not self.built:
            self._resume = (mib, used_bytes, n_chats)
            return
        self.query_one(ResumeBudget).show(mib, used_bytes, n_chats)

    # -- user edits -----------------------------------------------------------------------

    def _check(self, field: Input) -> tuple[str, object] | None:
        name = field.id.removeprefix("setting-")
        try:
            value = check_setting(name, field.value.strip())
        except ValueError as err:
            field.add_class("-invalid")
            self._show_error(name, str(err))
            return None
        field.remove_class("-invalid")
        self._show_error(name, "")
        return name, value

    def _show_error(self, name: str, sentence: str) -> None:
        """The sentence under setting `name`'s row ("": none). Its line is made the first time
        one is shown: nine hidden lines made and styled with the screen were a tenth of its
        widgets."""
        try:
            line = self.query_one(f"#error-{name}", Static)
        except NoMatches:
            if not sentence:
                return
            line = Static("", id=f"error-{name}", classes="setting-error")
            self.mount(line, after=self.query_one(f"#setting-{name}", Input).parent)
        line.update(sentence)
        line.set_class(bool(sentence), "-shown")

    def on_input_changed(self, event: Input.Changed) -> None:
        if not (event.input.id or "").startswith("setting-"):
            return
        event.stop()
        checked = self._check(event.input)
        if checked:
            self.post_message(self.SettingChanged(*checked))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if not (event.input.id or "").startswith("setting-"):
            return
        event.stop()
        checked = self._check(event.input)
        if checked:
            self.post_message(self.SettingChanged(*checked, submitted=True))

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        if event.select.id == "context-policy":
            # the picker reports its first value as it mounts: only a different one is a choice
            if event.value != self._policy:
                self._policy = check_setting("context_policy", event.value)
                self.post_message(self.SettingChanged("context_policy", self._policy))
            return
        # the blank entry (Select.NULL) is "(no model)"
        self._show_quality(event.value)
        self.post_message(self.ModelChosen(str(event.value) if isinstance(event.value, str) else None))

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        if event.text_area.id != "system-prompt":
            return
        event.stop()
        self.post_message(self.SystemPromptChanged(event.text_area.text))
