"""Keys that stop and quit (issue 18, bugs b, g, h): Ctrl+Q mid-reply keeps the partial reply
marked stopped, Ctrl+C stops a reply and a second Ctrl+C quits, Esc and Ctrl+N bring the focus
back to the message box, F1 and `?` open help."""

from __future__ import annotations

from tui_support import FakeScript, SIZE, make_app, make_library, ready, reply_done, send, wait_for

from llamachat.tui.chat_store import ChatStore


LONG = " ".join(f"w{i}" for i in range(400))


async def test_ctrl_q_mid_reply_keeps_the_partial_reply(tmp_path):
    make_library(tmp_path)
    store = tmp_path / "chats.db"
    app, _ = make_app(["-n", "1000"], script=FakeScript(replies=[LONG], delay=0.01), store_path=store)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "go on and on")
        await wait_for(pilot, lambda: app.reply_view is not None and len(app.reply_view.source) > 20)
        await pilot.press("ctrl+q")
        await wait_for(pilot, lambda: app.return_code is not None)
    assert app.return_code == 0
    conv, _ = ChatStore(store).load(ChatStore(store).list()[0].id)
    last = conv.messages[-1]
    assert last.role == "assistant" and last.stopped
    assert 0 < len(last.content) < len(LONG) and LONG.startswith(last.content)


async def test_ctrl_c_stops_a_reply_then_a_second_quits(tmp_path):
    make_library(tmp_path)
    app, _ = make_app(["-n", "1000"], script=FakeScript(replies=[LONG], delay=0.01))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "go on and on")
        await wait_for(pilot, lambda: app.reply_view is not None and len(app.reply_view.source) > 20)
        await pilot.press("ctrl+c")
        await reply_done(pilot, app)
        assert app.conv.messages[-1].stopped
        assert app.return_code is None  # the first Ctrl+C only stopped the reply
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: app.return_code is not None)
    assert app.return_code == 0


async def test_ctrl_c_when_idle_asks_first_then_quits(tmp_path):
    make_library(tmp_path)
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+c")
        await pilot.pause(0.1)
        assert app.return_code is None
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: app.return_code is not None)


async def test_esc_ctrl_n_and_enter_in_a_setting_return_to_the_message_box(tmp_path):
    make_library(tmp_path)
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        box = app.chat_screen.chat_input
        temp = app.chat_screen.sidebar.query_one("#setting-temp")
        for key in ("escape", "ctrl+n", "enter"):
            temp.focus()
            await pilot.pause()
            assert app.focused is temp
            await pilot.press(key)
            await pilot.pause(0.1)
            assert app.focused is box, key
        # so the next message goes where it belongs
        await pilot.press("h", "i")
        assert box.text == "hi" and temp.value == "0.3"


async def test_f1_opens_help_from_the_message_box(tmp_path):
    from llamachat.tui.screens.help import HelpScreen

    make_library(tmp_path)
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        assert app.focused is app.chat_screen.chat_input
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen))
        # `?` outside the message box opens it too; inside, it is typed
        app.chat_screen.query_one("#messages").focus()
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
