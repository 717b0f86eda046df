"""Snapshot tests (pytest-textual-snapshot) of the main screens with the scripted fake engine.
Update after an intended change of look with `pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the SVGs before committing them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_tui_app import make_app, ready, reply_done, send, tiny_gguf  # noqa: E402
from tui_fake_engine import FakeScript  # noqa: E402

from llamachat.model_store.library import Library  # noqa: E402
from llamachat.tui.app import ChatApp  # noqa: E402
from llamachat.tui.cli import build_main_parser  # noqa: E402

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
    lib.add(tiny_gguf(tmp_path / "alpha.gguf"), name="alpha", description="a test model", settings={"temp": 0.3, "top_k": 12})
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
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_stopped_reply_and_invalid_setting(snap_compare, library):
    script = FakeScript(replies=["one two three four five six seven eight nine ten " * 40], delay=0.01)
    app, _ = make_app(script=script)

    async def run_before(pilot):
        await ready(pilot, app)
        steady(app)
        await send(pilot, app, "Count for me.")
        while len(app.reply_view.source) < 40:
            await pilot.pause(0.05)
        app.action_stop()
        await reply_done(pilot, app)
        # show a fixed partial reply so the snapshot does not depend on timing
        view = app.chat_screen.messages.children[-1]
        view.finish("one two three four five", stopped=True)
        app.chat_screen.sidebar.query_one("#setting-top_p").value = "1.5"
        app.chat_screen.set_status("alpha │ Q4_1 │ 100.0 tok/s │ ctx 12/2048 (full: stop) │ chat")
        app.set_focus(None)
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_instruct_mode_screen(snap_compare, library):
    app, _ = make_app(["--instruct", "-f", "alpaca", "-n", "64", "--temp", "0"],
                      script=FakeScript(replies=["Jupiter is the largest planet in the solar system."]))

    async def run_before(pilot):
        await ready(pilot, app)
        steady(app)
        await send(pilot, app, "Name the largest planet in the solar system.")
        await reply_done(pilot, app)
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare, library):
    app, _ = make_app()

    async def run_before(pilot):
        await ready(pilot, app)
        steady(app)
        await pilot.press("f1")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_library_screen(snap_compare, library):
    app, _ = make_app()

    async def run_before(pilot):
        await ready(pilot, app)
        steady(app)
        await pilot.press("ctrl+l")
        await pilot.pause(0.3)
        app.screen.query_one("#library-file").update("models.toml")  # the real path is a temp dir
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_first_run_screen(snap_compare):
    app = ChatApp(build_main_parser().parse_args([]), entry=None, llama_factory=FakeScript().factory)

    async def run_before(pilot):
        await pilot.pause(0.3)

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
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
