"""Instant resume in the app (tui/resume.py, Engine.save_state and its use before a reply): a
chat's context is saved when the chat is left and loaded when it comes back, so its history is
not processed again; the folder keeps within its budget, least recently used first; the budget
lives in models.toml and the sidebar."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tui_support import wait_for  # noqa: E402
from test_tui_real_model import LOAD, real_app  # noqa: E402

from llamachat.model_store.library import Library  # noqa: E402
from llamachat.runtime.errors import ConfigError, UserError  # noqa: E402
from llamachat.tui.conversation import Conversation, Message  # noqa: E402
from llamachat.tui.resume import ResumeStates  # noqa: E402
from llamachat.tui.widgets.resume_budget import ResumeBudget  # noqa: E402


# -- the folder and its budget -----------------------------------------------------------------

def _state(states: ResumeStates, chat_id: int, size: int, age: int) -> Path:
    path = states.path_for(chat_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    t = 1_700_000_000 + 1000 - age
    os.utime(path, (t, t))
    return path


def test_eviction_drops_the_least_recently_used_first(tmp_path):
    states = ResumeStates(tmp_path / "kv-states", budget_bytes=1000)
    old = _state(states, 1, 400, age=30)
    middle = _state(states, 2, 400, age=20)
    new = _state(states, 3, 400, age=10)
    states.touch(old)  # just used: now the most recent
    assert states.evict(keep=new) == [middle]
    assert sorted(p.name for p in states.files()) == [old.name, new.name] and states.used_bytes() == 800

    states.budget_bytes = 500
    assert states.evict(keep=new) == [old]  # the one just written goes last
    states.budget_bytes = 0
    assert states.evict() == [new] and states.files() == []
    assert not states.fits(1)


def test_budget_lives_in_models_toml_and_is_checked():
    lib = Library.load()
    assert lib.resume_budget_mib == 1024  # the default
    lib.set_resume_budget("256")
    assert Library.load().resume_budget_mib == 256
    assert "resume_budget_mib = 256" in lib.file.read_text()
    with pytest.raises(UserError, match="resume_budget_mib must be a whole number of MiB"):
        lib.set_resume_budget(-1)
    lib.file.write_text(lib.file.read_text().replace("resume_budget_mib = 256", "resume_budget_mib = 1.5"))
    with pytest.raises(ConfigError, match="resume_budget_mib must be a whole number"):
        Library.load()


# -- the app with the real model ---------------------------------------------------------------

HISTORY = [
    ("Tell me about lighthouses.", "Lighthouses are towers with a bright lamp at the top that guide ships at "
     "night and warn them of rocks, reefs and the entrance to harbours. The oldest known one stood at "
     "Alexandria in Egypt. Today most are automatic and run without a keeper."),
    ("How did the keepers live?", "Keepers lived in small cottages beside the tower, often on remote islands. "
     "They trimmed the wicks, wound the clockwork that turned the lens, kept a log of the weather and "
     "the ships, and painted and repaired the tower. Supplies came by boat every few weeks."),
    ("What was the hardest part?", "Loneliness and storms. A keeper might not see anyone for weeks, and in "
     "a gale the lamp had to burn all night whatever happened, so someone stayed awake to tend it."),
]


def _saved_chat(app) -> int:
    conv = Conversation(system_prompt=app.settings["system_prompt"])
    for question, answer in HISTORY:
        conv.messages += [Message("user", question), Message("assistant", answer)]
    return app.store.save(conv, app.entry.name)


async def _send(pilot, app, text: str) -> None:
    n = len(app.conv.messages)
    box = app.chat_screen.chat_input
    box.focus()
    box.text = text
    await pilot.press("enter")
    await wait_for(pilot, lambda: len(app.conv.messages) == n + 2 and not app.generating, "the reply", timeout=LOAD)


@pytest.mark.real_model
@pytest.mark.slow
async def test_a_reopened_chat_is_not_read_again(smollm2_path):
    app = real_app(smollm2_path, "--temp", "0", "-n", "8")
    async with app.run_test(size=(110, 36)) as pilot:
        await wait_for(pilot, lambda: app.engine.loaded and not app.loading and app.chat_screen.sidebar.built, "the model to load", timeout=LOAD)
        llm = app.engine.llm
        chat = _saved_chat(app)
        states = app.engine.resume
        assert states.folder == app.store.path.parent / "kv-states"
        app.open_chat(chat)
        await _send(pilot, app, "Are any still working?")
        first = llm.generator.last_stats
        assert app.engine.last_resume is None and first.prompt_eval_tokens == first.prompt_tokens > 200

        await pilot.press("ctrl+n")  # leaving the chat saves its context
        await wait_for(pilot, lambda: states.path_for(chat).is_file(), "the saved context")
        await _send(pilot, app, "Hello")  # another chat fills the KV cache
        other = app.chat_id
        assert other != chat and app.engine.state_key == other

        app.open_chat(chat)
        await _send(pilot, app, "Which is the tallest?")
        again = llm.generator.last_stats
        # loaded from the file: only the tokens after the saved prefix are evaluated (the end of
        # the last reply as the template writes it, the new question and the assistant header)
        assert app.engine.last_resume >= first.prompt_tokens
        assert again.prompt_tokens > first.prompt_tokens + 10 and again.prompt_eval_tokens < 30
        usage = app.chat_screen.sidebar.query_one("#resume-usage").render()
        await pilot.press("ctrl+q")
    assert app.return_code == 0
    assert states.path_for(other).is_file() and states.path_for(chat).is_file()  # the app's close saved the last chat
    assert re.fullmatch(r"\d+ of 1024 MiB used \(2 chats\)", str(usage))

    # the next run: the chat comes back from its file
    app = real_app(smollm2_path, "--temp", "0", "-n", "8")
    async with app.run_test(size=(110, 36)) as pilot:
        await wait_for(pilot, lambda: app.engine.loaded and not app.loading and app.chat_screen.sidebar.built, "the model to load", timeout=LOAD)
        app.open_chat(chat)
        await _send(pilot, app, "Thank you.")
        stats = app.engine.llm.generator.last_stats
        assert app.engine.last_resume and stats.prompt_eval_tokens < 30 < stats.prompt_tokens
        await pilot.press("ctrl+q")

    # another context size: the saved context is refused and the history processed again
    app = real_app(smollm2_path, "--temp", "0", "-n", "8", "-c", "1024")
    async with app.run_test(size=(110, 36)) as pilot:
        await wait_for(pilot, lambda: app.engine.loaded and not app.loading and app.chat_screen.sidebar.built, "the model to load", timeout=LOAD)
        app.open_chat(chat)
        await _send(pilot, app, "Goodbye.")
        stats = app.engine.llm.generator.last_stats
        assert app.engine.last_resume is None and stats.prompt_eval_tokens == stats.prompt_tokens
        await pilot.press("ctrl+q")


@pytest.mark.real_model
async def test_budget_is_shown_and_edited_in_the_sidebar(smollm2_path):
    app = real_app(smollm2_path, "--temp", "0", "-n", "4")
    async with app.run_test(size=(110, 36)) as pilot:
        await wait_for(pilot, lambda: app.engine.resume is not None and app.chat_screen.sidebar.built, "the saved contexts")
        box = app.chat_screen.sidebar.query_one(ResumeBudget)
        field = box.query_one("#resume-budget")
        assert field.value == "1024" and "0 of 1024 MiB used (0 chats)" in str(box.query_one("#resume-usage").render())
        field.focus()
        await pilot.press("end", *["backspace"] * 4, "x")
        assert "whole number of MiB" in str(box.query_one("#resume-budget-error").render())
        await pilot.press("backspace", "0", "enter")
        await wait_for(pilot, lambda: app.engine.resume.budget_bytes == 0, "the budget to apply")
        assert Library.load().resume_budget_mib == 0
        await wait_for(pilot, lambda: app.engine.loaded and not app.loading and app.chat_screen.sidebar.built, "the model to load", timeout=LOAD)
        chat = _saved_chat(app)
        app.open_chat(chat)
        await _send(pilot, app, "Hi")
        await pilot.press("ctrl+n")
        await pilot.pause(0.5)
        await pilot.press("ctrl+q")
    assert app.engine.resume.files() == []  # a budget of 0: nothing is saved
