"""Pilot tests of the chat app (App.run_test) with the scripted fake engine: streaming, stop,
sidebar edits reaching the sampler, flags over library defaults, n_ctx re-creation, model
switch, library edits, saved chats, the three modes, errors as notifications, quitting."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tui_fake_engine import FakeScript  # noqa: E402
from tui_support import SIZE, make_app, notifications, ready, send, tiny_gguf, views, wait_for  # noqa: E402

from llamachat.model_store.library import Library  # noqa: E402
from llamachat.tui.app import ChatApp  # noqa: E402
from llamachat.tui.cli import build_main_parser  # noqa: E402
from llamachat.tui.screens.chats import ChatsScreen  # noqa: E402
from llamachat.tui.screens.confirm import ConfirmScreen  # noqa: E402
from llamachat.tui.screens.first_run import FirstRunScreen  # noqa: E402
from llamachat.tui.screens.help import HelpScreen  # noqa: E402
from llamachat.tui.screens.library import LibraryScreen  # noqa: E402


@pytest.fixture
def library(tmp_path):
    lib = Library.load()
    lib.add(tiny_gguf(tmp_path / "alpha.gguf"), name="alpha", settings={"temp": 0.3, "top_k": 12})
    lib.add(tiny_gguf(tmp_path / "beta.gguf"), name="beta", settings={"n_ctx": 256})
    return lib


async def reply_done(pilot, app):
    await wait_for(pilot, lambda: not app.generating and app.conv.messages and app.conv.messages[-1].role == "assistant",
                   "the reply to be done")


async def test_reply_streams_in_batches_and_is_saved(library):
    words = " ".join(f"word{i}" for i in range(60))
    # 20 ms a token: at 10 ms the whole reply (0.6 s) could end, on a slow CI machine, before
    # `send` returned, leaving no reply view to watch
    script = FakeScript(replies=[words], delay=0.02)
    app, _ = make_app(script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        appends = []
        await send(pilot, app, "Tell me sixty words")
        view = app.reply_view
        original = view.append
        view.append = lambda text: (appends.append(text), original(text))
        await wait_for(pilot, lambda: len(view.source) > 0)
        assert app.generating  # text is on screen while the reply is still being written
        await reply_done(pilot, app)
        assert app.conv.messages[-1].content == words
        assert view.source.strip() == words
        # 60 tokens at 20 ms each (~1.2 s), drained every 0.1 s: a handful of updates, not one per token
        assert 1 <= len(appends) <= 30
        assert "tok/s" in app.status_text() and "ctx " in app.status_text()
        assert app.store.list()[0].n_messages == 2


async def test_escape_stops_and_keeps_partial_reply(library):
    long = " ".join(f"w{i}" for i in range(400))
    script = FakeScript(replies=[long], delay=0.01)
    app, _ = make_app(script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "go on and on")
        await wait_for(pilot, lambda: len(app.reply_view.source) > 20 if app.reply_view else False)
        await pilot.press("escape")
        await reply_done(pilot, app)
        msg = app.conv.messages[-1]
        assert msg.stopped and 0 < len(msg.content) < len(long)
        assert long.startswith(msg.content)
        view = views(app, "assistant")[-1]
        assert view.stopped and view.has_class("stopped")
        assert "stopped" in str(view.query_one(".message-header").render())
        # the next message works as usual after a stop
        script.replies.append("fine")
        await send(pilot, app, "again")
        await reply_done(pilot, app)
        assert app.conv.messages[-1].content == "fine"


async def test_flags_override_library_defaults_and_sidebar_edits_reach_sampler(library):
    script = FakeScript(replies=["one", "two"])
    app, _ = make_app(["--temp", "0", "--repeat-penalty", "1.1"], script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        sidebar = app.chat_screen.sidebar
        assert sidebar.query_one("#setting-temp").value == "0"  # the flag wins over the library's 0.3
        assert sidebar.query_one("#setting-top_k").value == "12"  # the library's default
        await send(pilot, app, "first")
        await reply_done(pilot, app)
        call = script.calls[-1]
        assert call["temperature"] == 0.0 and call["top_k"] == 12 and call["repeat_penalty"] == 1.1
        assert call["max_tokens"] is None

        # edit in the sidebar: valid values apply to the next reply, invalid ones are refused
        sidebar.query_one("#setting-top_p").value = "0.5"
        sidebar.query_one("#setting-n_predict").value = "7"
        sidebar.query_one("#setting-temp").value = "-1"
        # (the line under a field is made when it first has a sentence)
        await wait_for(pilot, lambda: sidebar.query("#error-temp") and
                       "temp must be at least 0" in str(sidebar.query_one("#error-temp").render()))
        error = sidebar.query_one("#error-temp")
        await wait_for(pilot, lambda: app.settings["top_p"] == 0.5 and app.settings["n_predict"] == 7)
        assert error.has_class("-shown")
        await send(pilot, app, "second")
        await reply_done(pilot, app)
        call = script.calls[-1]
        assert call["top_p"] == 0.5 and call["max_tokens"] == 7
        assert call["temperature"] == 0.0  # the invalid -1 was not applied


async def test_seed_and_system_prompt_apply_to_next_reply(library):
    script = FakeScript(replies=["a", "b", "c"])
    app, _ = make_app(script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        sidebar = app.chat_screen.sidebar
        sidebar.query_one("#setting-seed").value = "42"
        sidebar.query_one("#system-prompt").text = "Be brief."
        await wait_for(pilot, lambda: app.settings["seed"] == 42 and app.conv.system_prompt == "Be brief.")
        await send(pilot, app, "hi")
        await reply_done(pilot, app)
        call = script.calls[-1]
        assert call["seed"] == 42
        assert call["messages"][0] == {"role": "system", "content": "Be brief."}
        await send(pilot, app, "more")
        await reply_done(pilot, app)
        assert "seed" not in script.calls[-1]  # seeded once, as llama.cpp does


async def test_n_ctx_change_recreates_context_and_keeps_chat(library):
    script = FakeScript(replies=["x", "y"])
    app, _ = make_app(script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        assert script.instances[-1].n_ctx() == 2048
        await send(pilot, app, "hello")
        await reply_done(pilot, app)
        field = app.chat_screen.sidebar.query_one("#setting-n_ctx")
        field.focus()
        field.value = "1024"
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(script.instances) == 2 and not app.loading)
        assert script.instances[-1].n_ctx() == 1024
        await wait_for(pilot, lambda: any("Re-creating the context with n_ctx=1024" in n for n in notifications(app)))
        assert len(app.conv.messages) == 2  # the chat is kept
        await send(pilot, app, "still here?")
        await reply_done(pilot, app)
        assert [m["content"] for m in script.calls[-1]["messages"]] == ["hello", "x", "still here?"]


async def test_model_switch_loads_in_worker_with_progress(library):
    script = FakeScript(replies=["from beta"], load_delay=0.6)
    app, _ = make_app(script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        select = app.chat_screen.sidebar.query_one("#model-select")
        labels = [str(prompt) for prompt, _ in select._options]
        assert any("alpha" in label and "★" in label for label in labels)
        select.value = "beta"
        await wait_for(pilot, lambda: app.loading)
        bar = app.chat_screen.sidebar.query_one("#load-progress")
        assert bar.display  # progress is visible while the UI stays live
        assert "loading" in app.status_text()
        await ready(pilot, app)
        assert not bar.display
        assert app.entry.name == "beta" and Path(script.instances[-1].model_path).name == "beta.gguf"
        assert script.instances[-1].n_ctx() == 256  # beta's library default
        assert app.chat_screen.sidebar.query_one("#setting-n_ctx").value == "256"
        await send(pilot, app, "who are you")
        await reply_done(pilot, app)
        assert app.conv.messages[-1].content == "from beta"


async def test_missing_model_is_marked_and_refused(library, tmp_path):
    gone = tiny_gguf(tmp_path / "gone.gguf")
    Library.load().add(gone, name="gone")
    gone.unlink()
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        select = app.chat_screen.sidebar.query_one("#model-select")
        assert any("gone" in str(p) and "missing" in str(p) for p, _ in select._options)
        select.value = "gone"
        await wait_for(pilot, lambda: any("gone" in n and "is gone" in n for n in notifications(app)))
        assert app.entry.name == "alpha" and not app.loading


async def test_engine_errors_become_notifications(library):
    script = FakeScript(fail_load="the tensor blk.0 is broken")
    app, _ = make_app(script=script)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: not app.loading)
        assert not app.engine.loaded
        await wait_for(pilot, lambda: any("cannot load the model" in n and "blk.0" in n for n in notifications(app)))
        app.chat_screen.chat_input.text = "hello?"
        app.chat_screen.chat_input.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("No model is loaded" in n for n in notifications(app)))
        assert app.chat_screen.chat_input.text == "hello?" and not app.conv.messages
    assert app.return_code in (None, 0)


async def test_regenerate_and_edit_last(library):
    script = FakeScript(replies=["first answer", "second answer", "third answer"])
    app, _ = make_app(script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "question one")
        await reply_done(pilot, app)
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.conv.messages[-1].content == "second answer" and not app.generating)
        assert [m.content for m in app.conv.messages] == ["question one", "second answer"]
        assert len(views(app)) == 2
        await pilot.press("ctrl+e")
        await wait_for(pilot, lambda: app.conv.messages == [] and views(app) == [])
        assert app.chat_screen.chat_input.text == "question one"
        app.chat_screen.chat_input.text = "question one, edited"
        await pilot.press("enter")
        await reply_done(pilot, app)
        assert [m.content for m in app.conv.messages] == ["question one, edited", "third answer"]


async def test_enter_sends_ctrl_j_is_newline(library):
    script = FakeScript(replies=["ok"])
    app, _ = make_app(script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        box = app.chat_screen.chat_input
        box.focus()
        await pilot.press("a", "ctrl+j", "b")
        assert box.text == "a\nb" and not app.conv.messages
        await pilot.press("enter")
        await reply_done(pilot, app)
        assert app.conv.messages[0].content == "a\nb" and box.text == ""


async def test_saved_chats_reopen_delete_export(library, tmp_path):
    store = tmp_path / "chats.sqlite3"
    script = FakeScript(replies=["Paris.", "Berlin.", "Rome."])
    app, _ = make_app(script=script, store_path=store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "Capital of France?")
        await reply_done(pilot, app)
        await send(pilot, app, "And Germany?")
        await reply_done(pilot, app)
        await pilot.press("ctrl+n")
        await send(pilot, app, "Capital of Italy?")
        await reply_done(pilot, app)
    # a new app (a new process, as far as the store knows) lists and reopens them
    app2, script2 = make_app(script=FakeScript(replies=["Madrid."]), store_path=store)
    async with app2.run_test(size=SIZE) as pilot:
        await ready(pilot, app2)
        chats = app2.store.list()
        assert [c.title for c in chats] == ["Capital of Italy?", "Capital of France?"]
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app2.screen, ChatsScreen) and app2.screen.query_one("#chats-table").row_count == 2)
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: len(views(app2)) == 4)
        assert [m.content for m in app2.conv.messages] == ["Capital of France?", "Paris.", "And Germany?", "Berlin."]
        await send(pilot, app2, "And Spain?")
        await reply_done(pilot, app2)
        assert [m["content"] for m in script2.calls[-1]["messages"]][-3:] == ["And Germany?", "Berlin.", "And Spain?"]
        assert app2.store.list()[0].n_messages == 6

        path = app2.export_chat()
        text = path.read_text()
        assert text.startswith("# Capital of France?") and "**You:**" in text and "Madrid." in text

        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app2.screen, ChatsScreen) and app2.screen.query_one("#chats-table").row_count == 2)
        await pilot.press("tab", "d")  # the screen opens in its search box: Tab to the list
        await wait_for(pilot, lambda: isinstance(app2.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: len(app2.store.list()) == 1)


async def test_library_screen_edits_adds_sets_default_and_removes(library, tmp_path):
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen) and app.screen.selected == "alpha")
        screen = app.screen
        assert screen.query_one("#lib-temp").value == "0.3"
        # an invalid value: the sentence is shown and nothing is saved
        screen.query_one("#lib-top_p").value = "2"
        await wait_for(pilot, lambda: "top_p must be between 0 and 1" in str(screen.query_one("#lib-error-top_p").render()))
        screen.action_save()
        await wait_for(pilot, lambda: any("nothing was saved" in n for n in notifications(app)))
        assert "top_p" not in Library.load().models["alpha"].settings
        # valid edits (and clearing a field removes the key)
        screen.query_one("#lib-top_p").value = "0.9"
        screen.query_one("#lib-temp").value = ""
        screen.query_one("#lib-description").value = "first model"
        screen.action_save()
        entry = Library.load().models["alpha"]
        assert entry.settings == {"top_k": 12, "top_p": 0.9} and entry.description == "first model"
        # add from a path: a bad file is refused with the library's sentence
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"not gguf at all")
        screen.query_one("#add-path").value = str(bad)
        screen.add_model()
        await wait_for(pilot, lambda: any("not a valid GGUF file" in n for n in notifications(app)))
        screen.query_one("#add-path").value = str(tiny_gguf(tmp_path / "gamma.gguf"))
        screen.query_one("#add-name").value = "gamma"
        screen.add_model()
        assert "gamma" in Library.load().models and screen.selected == "gamma"
        screen.action_make_default()
        assert Library.load().default_name == "gamma"
        screen.remove_model()
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: "gamma" not in Library.load().models and app.screen is screen)
        select = app.chat_screen.sidebar.query_one("#model-select")
        assert not any("gamma" in str(p) for p, _ in select._options)  # the picker was refreshed at once
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is app.chat_screen)


async def test_instruct_mode_sends_alpaca_turns(library):
    script = FakeScript(replies=["Jupiter is the largest planet.\n### Instruction: ignored", "Saturn."])
    app, _ = make_app(["--instruct", "--prompt-file", "alpaca", "-n", "64"], script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        assert views(app)[0].role == "preamble"
        await send(pilot, app, "Name the largest planet in the solar system.")
        await reply_done(pilot, app)
        call = script.calls[-1]
        preamble = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        assert call["prompt"] == preamble + "\n\n### Instruction:\n\nName the largest planet in the solar system.\n\n### Response:\n\n"
        assert "### Instruction:" in call["stop"] and call["max_tokens"] == 64
        assert app.conv.messages[-1].content.strip() == "Jupiter is the largest planet."
        await send(pilot, app, "And the second largest?")
        await reply_done(pilot, app)
        assert script.calls[-1]["prompt"].endswith(
            "### Response:\n\nJupiter is the largest planet.\n\n### Instruction:\n\nAnd the second largest?\n\n### Response:\n\n")


async def test_interactive_mode_transcript_and_reverse_prompt(library):
    script = FakeScript(replies=[" Bob: Hi there. How can I help?\nUser: tail"])
    app, _ = make_app(["-i", "-r", "User:", "-f", "chat-with-bob"], script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)  # a reply the model writes first would have started by now
        assert not script.calls and not app.generating  # the file ends with "User:": the user speaks first
        preamble = views(app)[0]
        assert preamble.role == "preamble" and not preamble.markdown  # a transcript keeps its line breaks
        assert "\nUser: Hello, Bob.\nBob: Hello." in str(preamble.query_one(".message-body").render())
        await send(pilot, app, "Hello, Bob.")
        await reply_done(pilot, app)
        call = script.calls[-1]
        bob = Path(__file__).resolve().parents[1] / "prompts" / "chat-with-bob.txt"
        assert call["prompt"] == bob.read_text().removesuffix("\n") + " Hello, Bob.\n"
        assert call["stop"] == ["User:"]
        msg = app.conv.messages[-1]
        assert msg.content == " Bob: Hi there. How can I help?\nUser:"
        assert views(app, "assistant")[-1].source == "Bob: Hi there. How can I help?"


async def test_interactive_mode_model_writes_first_without_reverse_prompt(library):
    script = FakeScript(replies=["Once upon a time."])
    app, _ = make_app(["-i", "-p", "Tell a story:"], script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await reply_done(pilot, app)
        assert script.calls[0]["prompt"] == "Tell a story:"


async def test_context_full_is_told(library):
    script = FakeScript(replies=[" ".join(["x"] * 50)])
    app, _ = make_app(["-c", "20"], script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        assert "(full: stop)" in app.status_text()
        await send(pilot, app, "fill it")
        await reply_done(pilot, app)
        assert app.conv.messages[-1].note == "context full"
        await wait_for(pilot, lambda: any("The context is full (20 tokens)" in n for n in notifications(app)))


async def test_quit_while_generating_exits_zero(library):
    script = FakeScript(replies=[" ".join(["z"] * 1000)], delay=0.01)
    app, _ = make_app(script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "talk")
        await wait_for(pilot, lambda: app.reply_view is not None and len(app.reply_view.source) > 5)
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: app.return_code is not None, "the app to exit")
    assert app.return_code == 0
    assert script.instances[0].last_stats["stop_reason"] == "cancelled"


async def test_help_and_palette_commands(library):
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is app.chat_screen)
        app.set_focus(None)
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for title in ("New chat", "Saved chats", "Export chat", "Regenerate", "Model library", "Help"):
            assert title in titles


async def test_first_run_pulls_default_model_then_chats(tmp_path):
    model = tiny_gguf(tmp_path / "pulled.gguf")
    seen = []

    def fake_pull(key, progress):
        seen.append(key)
        for i in range(5):
            progress("download", i * 10, 40)
        Library.load().add(model, name="smollm2-135m-instruct")
        lib = Library.load()
        lib.set("smollm2-135m-instruct", system_prompt="Give short answers.")  # as the catalog's defaults are
        return Library.load().models["smollm2-135m-instruct"]

    args = build_main_parser().parse_args([])
    script = FakeScript(replies=["hello!"])
    app = ChatApp(args, entry=None, llama_factory=script.factory, puller=fake_pull)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, FirstRunScreen) and app.screen.query("#pull")
                       and app.screen.query_one("#pull").region.width > 0, "the first-run screen's button to be drawn")
        assert await pilot.click("#pull")
        await ready(pilot, app)
        assert seen == ["smollm2"] and app.entry.name == "smollm2-135m-instruct"
        assert type(app.screen).__name__ == "ChatScreen"
        await send(pilot, app, "hi")
        await reply_done(pilot, app)
        assert app.conv.messages[-1].content == "hello!"
        # the first chat already has the pulled entry's system prompt (it had none: SmolLM2's
        # template then put in its own, and the first answer came in French)
        assert script.calls[0]["messages"][0] == {"role": "system", "content": "Give short answers."}


async def test_first_run_quit_button_quits():
    """The first-run screen reports Quit by dismissing with None (it used to call the app's async
    quit action without awaiting it, which did nothing)."""
    app = ChatApp(build_main_parser().parse_args([]), entry=None, llama_factory=FakeScript().factory,
                  puller=lambda key, progress: None)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, FirstRunScreen) and app.screen.query("#quit")
                       and app.screen.query_one("#quit").region.width > 0, "the first-run screen's button to be drawn")
        assert await pilot.click("#quit")
        await wait_for(pilot, lambda: app.return_code is not None, "the app to quit")
    assert app.return_code == 0


async def test_a_bug_ends_in_one_sentence_and_a_log_not_a_traceback(library, isolated_home):
    app, _ = make_app()
    app.quiet_crashes = True  # as run() sets it
    with pytest.raises(ZeroDivisionError):  # run_test re-raises for the test; run() does not
        async with app.run_test(size=SIZE) as pilot:
            await ready(pilot, app)
            app.call_later(lambda: 1 / 0)
            await wait_for(pilot, lambda: app.crash_message is not None, "the crash to be handled")
    assert app.crash_message.startswith("internal error (ZeroDivisionError: division by zero); details in ")
    log = isolated_home / "data" / "crash.log"
    assert "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()
    assert not app._exit_renderables  # nothing printed to the terminal


async def test_autoscroll_follows_until_the_user_scrolls_up(library):
    lines = "\n\n".join(f"Paragraph {i} of a long reply." for i in range(80))
    script = FakeScript(replies=[lines, "short"], delay=0.01)
    app, _ = make_app(script=script)
    async with app.run_test(size=(90, 24)) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "write a lot")
        pane = app.chat_screen.messages
        await wait_for(pilot, lambda: pane.max_scroll_y > 10)
        await wait_for(pilot, lambda: app.generating and pane.max_scroll_y > 20 and pane.scroll_y >= pane.max_scroll_y - 3,
                       "the pane to follow the reply as it grows")
        for _ in range(5):
            pane._scroll_up_for_pointer(animate=False)  # what a mouse wheel turn does
        await wait_for(pilot, lambda: pane.scroll_y < pane.max_scroll_y - 3, "the pane to scroll up")
        held = pane.scroll_y
        # two more screenfuls arrive: the pane would have followed them by now if it still did
        await wait_for(pilot, lambda: pane.max_scroll_y > held + 40)
        assert pane.scroll_y <= held + 1  # the user's position is kept while text keeps coming
        await reply_done(pilot, app)
        await send(pilot, app, "and now?")
        await reply_done(pilot, app)
        await wait_for(pilot, lambda: pane.scroll_y >= pane.max_scroll_y - 1, "the pane to follow the new message")


async def test_a_turn_that_gets_no_reply_goes_back_into_the_box(library):
    script = FakeScript(replies=["never"])
    app, _ = make_app(["-c", "4"], script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        box = app.chat_screen.chat_input
        box.focus()
        box.text = "a question that is much too long for four tokens"
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("more than the context size" in n for n in notifications(app)))
        await wait_for(pilot, lambda: not app.generating and views(app) == [])
        assert app.conv.messages == []
        assert box.text == "a question that is much too long for four tokens"


async def test_library_edit_of_the_model_in_use_reaches_the_sidebar_and_reloads(library):
    script = FakeScript(replies=["ok"])
    app, _ = make_app(script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, LibraryScreen) and app.screen.selected == "alpha")
        screen = app.screen
        screen.query_one("#lib-top_p").value = "0.5"
        screen.query_one("#lib-chat_format").value = "chatml"
        screen.action_save()
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.screen is app.chat_screen)
        assert app.chat_screen.sidebar.query_one("#setting-top_p").value == "0.5"
        await send(pilot, app, "hi")
        await reply_done(pilot, app)
        assert len(script.instances) == 2 and script.instances[-1].load_kwargs["chat_format"] == "chatml"
        assert script.calls[-1]["top_p"] == 0.5


async def test_quick_second_switch_wins(library):
    script = FakeScript(replies=["from beta"], load_delay=0.4)
    app, _ = make_app(script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        select = app.chat_screen.sidebar.query_one("#model-select")
        select.value = "beta"
        await wait_for(pilot, lambda: app.loading)
        select.value = "alpha"
        await wait_for(pilot, lambda: app.entry.name == "alpha", "the second switch to be taken")
        await ready(pilot, app)
        await wait_for(pilot, lambda: len(script.instances) == 3 and not app.loading)
        assert app.entry.name == "alpha" and Path(app.engine.llm.model_path).name == "alpha.gguf"
        assert app.loaded_settings["n_ctx"] == 2048


async def test_typing_stays_responsive_while_a_fast_reply_streams(library):
    import time as _time

    # paragraphs of 40 words, as replies come; ~2000 tokens/s, far faster than the real engine
    words = "\n\n".join(" ".join(f"w{i}" for i in range(p, p + 40)) for p in range(0, 2000, 40))
    script = FakeScript(replies=[words], delay=0.0005)
    app, _ = make_app(["-c", "8192"], script=script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "go")
        await wait_for(pilot, lambda: app.reply_view is not None and len(app.reply_view.source) > 100)
        box = app.chat_screen.chat_input
        box.focus()
        start = _time.monotonic()
        for key in "hey":  # as a terminal delivers keys (pilot.press would wait for the app to go idle)
            app.simulate_key(key)
        while box.text != "hey":
            await asyncio.sleep(0.01)
        typed = _time.monotonic() - start
        # the keys were handled while the reply was still streaming (no wall-clock bound: CI
        # machines are shared; a UI thread blocked by the stream would only see them at the end)
        assert app.generating, f"keys reached the box only after the reply ended ({typed:.2f} s)"
        await reply_done(pilot, app)
        assert app.conv.messages[-1].content == words


def test_starting_the_app_does_not_import_the_markdown_renderer():
    """The app's modules leave Textual's Markdown widget (markdown-it, the code highlighter: 25-45
    ms of a 1 s warm start) to the first message or help screen that shows it: a new chat's first
    screen has neither."""
    import subprocess

    code = ("import sys, llamachat.tui.cli, llamachat.tui.app, llamachat.tui.screens.chat, llamachat.tui.screens.help, "
            "llamachat.tui.widgets.message_view; print(sorted(m for m in sys.modules if m.startswith(('markdown_it', "
            "'textual.widgets._markdown'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_sidebar_fields_are_made_once_the_model_is_ready(library):
    """The sidebar's fields (about 45 widgets, a sixth of a warm start's CPU before the model is
    ready) are made after the load, and show what the app gave the sidebar before: the settings,
    the model picked, the mode line, the saved contexts' budget; the load's bar is hidden."""
    from textual.widgets import Input, Select, Static

    from llamachat.tui.widgets.resume_budget import ResumeBudget

    app, _ = make_app(script=FakeScript(replies=["Paris."], load_delay=0.5))
    async with app.run_test(size=SIZE) as pilot:
        sidebar = app.chat_screen.sidebar
        await wait_for(pilot, lambda: app.loading)
        await pilot.pause(0.1)
        assert not sidebar.built and not sidebar.query(Input)  # no fields while the model loads
        await ready(pilot, app)
        assert sidebar.query_one("#setting-temp", Input).value == "0.3"  # alpha's library settings
        assert sidebar.query_one("#setting-top_k", Input).value == "12"
        assert sidebar.query_one("#model-select", Select).value == "alpha"
        assert "mode: chat" in str(sidebar.query_one("#mode-info", Static).render())
        assert not sidebar.query_one("#load-progress").display
        await wait_for(pilot, lambda: "MiB used" in str(sidebar.query_one(ResumeBudget).query_one("#resume-usage").render()))


async def test_sidebar_fields_are_made_during_a_long_load(library, monkeypatch):
    """A load longer than Sidebar.BUILD_AFTER (a first run's compile) does not leave the sidebar
    empty: its fields come after that many seconds, with the load's bar."""
    from llamachat.tui.widgets.sidebar import Sidebar

    monkeypatch.setattr(Sidebar, "BUILD_AFTER", 0.3)
    app, _ = make_app(script=FakeScript(replies=["Paris."], load_delay=30))
    async with app.run_test(size=SIZE) as pilot:
        sidebar = app.chat_screen.sidebar
        await wait_for(pilot, lambda: sidebar.built, timeout=20)
        assert app.loading and sidebar.query_one("#load-progress").display
        await pilot.press("ctrl+q")
