"""Snapshot tests (pytest-textual-snapshot) of the main screens with the scripted fake engine.
Update after an intended change of look with `pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the SVGs before committing them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_tui_app import make_app, ready, reply_done, send, tiny_gguf, wait_for  # noqa: E402
from tui_fake_engine import FakeScript  # noqa: E402

from llamachat.model_store.library import Library  # noqa: E402
from llamachat.tui.app import ChatApp  # noqa: E402
from llamachat.tui.cli import build_main_parser  # noqa: E402
from llamachat.tui.screens.chats import ChatsScreen  # noqa: E402
from llamachat.tui.screens.first_run import FirstRunScreen  # noqa: E402
from llamachat.tui.screens.help import HelpScreen  # noqa: E402
from llamachat.tui.screens.library import LibraryScreen  # noqa: E402

SIZE = (100, 32)

REPLY = """The capital of France is **Paris**.

```python
capitals = {"France": "Paris"}
print(capitals["France"])
```
"""


def steady(app):
    """No blinking cursor in a snapshot (its phase would decide the picture)."""
    app.chat_screen.chat_input.cursor_blink = False


@pytest.fixture
def library(tmp_path):
    lib = Library.load()
    # alpha with the figures `import --report` stores (the table, the form and the picker show them), beta without
    lib.add(tiny_gguf(tmp_path / "alpha.gguf"), name="alpha", description="a test model", settings={"temp": 0.3, "top_k": 12},
            quality={"ppl": 18.2345, "source_ppl": 17.9012, "kl": 0.012345, "top_agree": 0.9612, "tokens": 2048, "source": "F16"})
    lib.add(tiny_gguf(tmp_path / "beta.gguf"), name="beta", settings={"n_ctx": 256})
    return lib


def test_chat_screen_after_a_reply(snap_compare, library):
    app, _ = make_app(["--temp", "0"], script=FakeScript(replies=[REPLY]))

    async def run_before(pilot):
        await ready(pilot, app)
        steady(app)
        await send(pilot, app, "What is the capital of France? Answer in one word.")
        await reply_done(pilot, app)
        app.chat_screen.chat_input.focus()
        await wait_for(pilot, lambda: app.chat_screen.chat_input.has_focus)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_stopped_reply_and_invalid_setting(snap_compare, library):
    """Esc while the reply is written keeps the text so far, marked stopped; an invalid value typed
    into the sidebar shows its sentence. The fake holds the sixth word until the stop, so the
    picture is the same on any machine; the status bar is the app's own (the fake runs at 100 tok/s)."""
    script = FakeScript(replies=["one two three four five six seven eight nine ten " * 40], hold_after=5)
    app, _ = make_app(script=script)

    async def run_before(pilot):
        await ready(pilot, app)
        steady(app)
        await send(pilot, app, "Count for me.")
        await wait_for(pilot, lambda: app.reply_view is not None and app.reply_view.source == "one two three four five")
        await pilot.press("escape")
        await reply_done(pilot, app)
        assert app.conv.messages[-1].stopped
        field = app.chat_screen.sidebar.query_one("#setting-top_p")
        field.focus()
        field.cursor_blink = False
        await pilot.press("end", *["backspace"] * len(field.value), "1", ".", "5")
        await wait_for(pilot, lambda: "top_p must be between 0 and 1" in str(app.chat_screen.sidebar.query_one("#error-top_p").render()))
        app.set_focus(None)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_instruct_mode_screen(snap_compare, library):
    app, _ = make_app(["--instruct", "-f", "alpaca", "-n", "64", "--temp", "0"],
                      script=FakeScript(replies=["Jupiter is the largest planet in the solar system."]))

    async def run_before(pilot):
        await ready(pilot, app)
        steady(app)
        await send(pilot, app, "Name the largest planet in the solar system.")
        await reply_done(pilot, app)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare, library):
    app, _ = make_app()

    async def run_before(pilot):
        await ready(pilot, app)
        steady(app)
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_library_screen(snap_compare, library):
    app, _ = make_app()

    async def run_before(pilot):
        await ready(pilot, app)
        steady(app)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen) and app.screen.selected == "alpha")
        app.screen.query_one("#library-file").update("models.toml")  # the real path is a temp dir

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_first_run_screen(snap_compare):
    app = ChatApp(build_main_parser().parse_args([]), entry=None, llama_factory=FakeScript().factory)

    async def run_before(pilot):
        await wait_for(pilot, lambda: isinstance(app.screen, FirstRunScreen))

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_saved_chats_screen(snap_compare, library, monkeypatch):
    import llamachat.tui.screens.chats as chats_screen

    monkeypatch.setattr(chats_screen, "_when", lambda ts: "2026-01-01 12:00")  # the clock is not part of the picture
    app, _ = make_app(script=FakeScript(replies=["Paris.", "Rome."]))

    async def run_before(pilot):
        await ready(pilot, app)
        steady(app)
        await send(pilot, app, "Capital of France?")
        await reply_done(pilot, app)
        await pilot.press("ctrl+n")
        await send(pilot, app, "Capital of Italy?")
        await reply_done(pilot, app)
        app.clear_notifications()  # the "New chat." toast would depend on timing
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatsScreen) and app.screen.query_one("#chats-table").row_count == 2)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
