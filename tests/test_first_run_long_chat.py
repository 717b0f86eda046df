"""Long chats (issue 18, goal 3): when a chat outgrows n_ctx, the oldest turns are left out of
the request (the system prompt kept), the chat shows where the model's memory begins, and the
chat goes on instead of being refused."""

from __future__ import annotations

from tui_support import FakeScript, SIZE, make_app, make_library, ready, reply_done, send, templated_factory, wait_for

from llamachat.tui.conversation import Conversation, Message


def test_forget_oldest_turn_keeps_the_system_prompt_and_the_newest_message():
    conv = Conversation(system_prompt="Be brief.", messages=[
        Message("user", "one"), Message("assistant", "1"), Message("user", "two"), Message("assistant", "2"),
        Message("user", "three")])
    assert conv.forget_oldest_turn() and conv.memory_start == 2
    assert [m["content"] for m in conv.request().messages] == ["Be brief.", "two", "2", "three"]
    assert conv.forget_oldest_turn() and conv.memory_start == 4
    assert [m["content"] for m in conv.request().messages] == ["Be brief.", "three"]
    assert not conv.forget_oldest_turn()  # the newest message always stays


async def test_a_chat_past_n_ctx_goes_on_with_the_cut_shown(tmp_path):
    make_library(tmp_path)
    words = " ".join(f"w{i}" for i in range(30))
    script = FakeScript(replies=[words] * 8)
    # n_ctx 128, one token per word: about three question-and-answer turns fit
    app, _ = make_app(["-c", "128", "-n", "16", "--system", "Be brief."], script=script)
    app.engine._factory = templated_factory(script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        for i in range(6):
            await send(pilot, app, f"question {i} " + words)
            await reply_done(pilot, app)
            assert app.conv.messages[-1].note != "context full" or i == 0
        assert app.conv.memory_start > 0
        sent = script.calls[-1]["messages"]
        assert sent[0] == {"role": "system", "content": "Be brief."}
        assert sent[1]["content"].startswith("question ") and not sent[1]["content"].startswith("question 0")
        assert sent[-1]["content"].startswith("question 5")
        # every turn is still on screen, with a line where the model's memory begins
        await wait_for(pilot, lambda: len(app.chat_screen.messages.query(".memory-start")) == 1)
        children = list(app.chat_screen.messages.children)
        line = app.chat_screen.messages.query_one(".memory-start")
        after = children[children.index(line) + 1]
        assert after.role == "user" and after.source == app.conv.messages[app.conv.memory_start].content
        assert "oldest turns dropped" in app.status_text()
        assert len(app.conv.messages) == 12


def test_context_policy_is_a_library_field_checked_in_one_sentence(tmp_path, capsys):
    from llamachat.model_store.library import Library
    from llamachat.tui.cli import main

    make_library(tmp_path)
    assert main(["models", "set", "alpha", "context_policy=ask"]) == 0
    assert 'context_policy = "ask"' in Library.load().file.read_text()
    assert Library.load().models["alpha"].settings["context_policy"] == "ask"
    capsys.readouterr()
    assert main(["models", "set", "alpha", "context_policy=shfit"]) != 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert err.strip() == ("llamachat: model 'alpha': context_policy must be one of drop-oldest, ask, shift, "
                           "got 'shfit' (did you mean 'shift'?)")
    assert Library.load().models["alpha"].settings["context_policy"] == "ask"  # unchanged


async def test_ask_policy_stops_and_asks_drop_cancel_or_new_chat(tmp_path):
    from textual.widgets import Select

    from tui_support import notifications
    from llamachat.model_store.library import Library
    from llamachat.tui.screens.context_full import ContextFullScreen

    make_library(tmp_path)
    Library.load().set("alpha", context_policy="ask")
    words = " ".join(f"w{i}" for i in range(30))
    script = FakeScript(replies=[words] * 12)
    app, _ = make_app(["-c", "128", "-n", "16"], script=script)
    app.engine._factory = templated_factory(script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        assert app.chat_screen.sidebar.query_one("#context-policy", Select).value == "ask"  # the library's

        async def type_and_send(text):  # `send` would wait for a reply that the dialog holds back
            app.chat_screen.chat_input.focus()
            app.chat_screen.chat_input.text = text
            await pilot.press("enter")

        async def ask(text):  # send; True once the dialog is up, False once the reply is done
            await type_and_send(text)
            await wait_for(pilot, lambda: isinstance(app.screen, ContextFullScreen)
                           or (not app.generating and app.conv.messages[-1].role == "assistant"))
            if isinstance(app.screen, ContextFullScreen):
                return True
            await reply_done(pilot, app)
            return False

        asked_at = 0
        while not await ask(f"question {asked_at} " + words):
            asked_at += 1
            assert asked_at < 6, "the chat never outgrew the context"
        assert asked_at >= 1 and app.conv.memory_start == 0
        calls = len(script.calls)
        assert not app.generating and calls == asked_at  # nothing was sent
        await pilot.click("#drop")
        await reply_done(pilot, app)
        assert app.conv.memory_start > 0 and len(script.calls) == calls + 1
        assert not script.calls[-1]["messages"][0]["content"].startswith("question 0")
        await wait_for(pilot, lambda: len(app.chat_screen.messages.query(".memory-start")) == 1)
        assert app.ctx_used == app.engine.n_tokens() <= 128

        # cancel: nothing is sent, the message goes back into the box for editing
        before = list(app.conv.messages)
        await type_and_send("another question " + words)
        await wait_for(pilot, lambda: isinstance(app.screen, ContextFullScreen))
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, ContextFullScreen))
        assert app.conv.messages == before and len(script.calls) == calls + 1
        assert app.chat_screen.chat_input.text == "another question " + words

        # new chat: the message opens a new chat of its own; the old one is kept without it
        old_id = app.chat_id
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ContextFullScreen))
        await pilot.click("#new")
        await reply_done(pilot, app)
        assert app.chat_id != old_id and [m.role for m in app.conv.messages] == ["user", "assistant"]
        assert app.conv.messages[0].content == "another question " + words
        assert [m["content"] for m in script.calls[-1]["messages"]] == ["another question " + words]
        assert app.store.load(old_id)[0].messages[-1].role == "assistant"
        assert f"ctx {app.engine.n_tokens()}/128" in app.status_text() and "New chat." in notifications(app)


async def test_shift_policy_from_the_sidebar_lets_the_reply_run_past_n_ctx(tmp_path):
    from textual.widgets import Select

    make_library(tmp_path)
    script = FakeScript(replies=[" ".join(f"w{i}" for i in range(150))])
    app, _ = make_app(["-c", "64"], script=script)
    app.engine._factory = templated_factory(script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        assert app.settings["context_policy"] == "drop-oldest"  # the default
        app.chat_screen.sidebar.query_one("#context-policy", Select).value = "shift"
        await wait_for(pilot, lambda: app.settings["context_policy"] == "shift")
        assert "(full: shift)" in app.status_text()
        await send(pilot, app, "tell me a long story")
        await reply_done(pilot, app)
        assert app.conv.messages[-1].note == "" and app.conv.messages[-1].content.endswith("w149")
        assert script.instances[-1].last_stats["context_shifts"] > 0
        assert len(script.instances) == 1  # the policy goes with each reply: no reload for it
        # the meter: what the context holds after the shifts, never more than n_ctx
        assert app.ctx_used == app.engine.n_tokens() <= 64
        assert f"ctx {app.engine.n_tokens()}/64 (full: shift)" in app.status_text()


async def test_the_meter_after_dropping_a_new_chat_and_reopening(tmp_path):
    make_library(tmp_path)
    words = " ".join(f"w{i}" for i in range(30))
    script = FakeScript(replies=[words] * 8)
    app, _ = make_app(["-c", "128", "-n", "16"], script=script)
    app.engine._factory = templated_factory(script)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        for i in range(5):
            await send(pilot, app, f"question {i} " + words)
            await reply_done(pilot, app)
            # after each reply (and each drop): what the engine holds, within n_ctx
            assert app.ctx_used == app.engine.n_tokens() <= 128
            assert f"ctx {app.ctx_used}/128" in app.status_text()
        assert app.conv.memory_start > 0
        long_id, start = app.chat_id, app.conv.memory_start
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: not app.conv.messages)
        assert app.ctx_used == 0 and "ctx 0/128" in app.status_text() and "oldest turns dropped" not in app.status_text()
        await send(pilot, app, "short")
        await reply_done(pilot, app)
        short_id = app.chat_id
        # reopening the long chat: the cut is worked out again and shown, the meter is what it fills
        app.open_chat(long_id)
        await pilot.pause()
        assert app.conv.memory_start == start
        assert app.ctx_used == app.engine.count_tokens(app.conv.request()) <= 128 - 16
        assert f"ctx {app.ctx_used}/128" in app.status_text() and "oldest turns dropped" in app.status_text()
        await wait_for(pilot, lambda: len(app.chat_screen.messages.query(".memory-start")) == 1)
        app.open_chat(short_id)
        await pilot.pause()
        assert app.conv.memory_start == 0 and not app.chat_screen.messages.query(".memory-start")
        assert app.ctx_used == app.engine.count_tokens(app.conv.request()) and "oldest turns dropped" not in app.status_text()


def test_the_shift_policy_reaches_the_engine_from_either_flag_or_the_library():
    """What a model is loaded with (headless chat and one-shot rely on it; the app also says it
    per reply): shift from --context-shift, --context-policy shift or the library's field."""
    from llamachat.tui.cli import build_main_parser
    from llamachat.tui.conversation import load_kwargs, merged_settings

    def shifts(argv, library=None):
        args = build_main_parser().parse_args(argv)
        return load_kwargs(merged_settings(args, library), args)["context_shift"]

    assert shifts([]) is False and merged_settings(None)["context_policy"] == "drop-oldest"
    assert shifts(["--context-shift"]) is True
    assert shifts(["--context-policy", "shift"]) is True
    assert shifts([], {"context_policy": "shift"}) is True
    assert shifts(["--context-policy", "ask"], {"context_policy": "shift"}) is False  # the flag wins
