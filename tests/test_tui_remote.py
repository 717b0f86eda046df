"""The app chatting through a remote library entry (Pilot, the fake OpenAI server on
127.0.0.1): the reply streams in, the status shows tokens/s and the context the server
reports, a server error is a notification with the question taken back for a retry."""

from __future__ import annotations

import asyncio

from llamachat.model_store.library import Library
from llamachat.tui.app import ChatApp
from llamachat.tui.cli import build_main_parser
from test_remote_backend import fake, fake_server  # noqa: F401 - fixtures
from llamachat.tui.remote_backend import RemoteBackend

SIZE = (110, 36)


async def wait_for(pilot, condition, timeout=60.0):
    end = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError("timed out waiting")
        await pilot.pause(0.05)


async def test_app_chats_with_a_remote_model(fake):  # noqa: F811
    fake_, url = fake
    Library.load().add_remote("far", url, "fake-1")
    app = ChatApp(build_main_parser().parse_args([]), entry=Library.load().resolve("far"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.engine.loaded and not app.loading)
        assert isinstance(app.engine.backend, RemoteBackend) and app.engine.n_ctx() == 4096

        async def ask(text):
            app.chat_screen.chat_input.focus()
            app.chat_screen.chat_input.text = text
            await pilot.press("enter")
            await pilot.pause(0.1)

        fake_.mode = "500"
        await ask("hello?")
        await wait_for(pilot, lambda: not app.generating and any("HTTP 500" in n.message for n in app._notifications))
        assert app.conv.messages == []  # taken back: the user can send it again
        fake_.mode = "ok"
        await ask("hello?")
        await wait_for(pilot, lambda: not app.generating and app.conv.messages and app.conv.messages[-1].role == "assistant")
        assert [m.content for m in app.conv.messages] == ["hello?", "Hello there, friend."]
        assert fake_.bodies[-1]["messages"][-1] == {"role": "user", "content": "hello?"}
        status = app.status_text()
        assert "/4096" in status and "tok/s" in status
        await pilot.press("ctrl+q")


async def test_a_long_chat_with_a_remote_model_drops_its_oldest_turns(fake):  # noqa: F811
    """The server says no context size for fake-2: the n_ctx setting (-c) stands in, and the
    request is counted by its characters (remote_backend.CHARS_PER_TOKEN)."""
    fake_, url = fake
    Library.load().add_remote("far2", url, "fake-2")
    app = ChatApp(build_main_parser().parse_args(["-c", "100"]), entry=Library.load().resolve("far2"))
    question = "q" * 80  # 27 tokens by the estimate, 32 with the message's share of the template
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.engine.loaded and not app.loading)
        assert app.engine.n_ctx() == 0 and "/100" in app.status_text()
        for i in range(4):
            app.chat_screen.chat_input.focus()
            app.chat_screen.chat_input.text = f"{i} {question}"
            await pilot.press("enter")
            await wait_for(pilot, lambda: not app.generating and app.conv.messages[-1].role == "assistant"
                           and len(app.conv.messages) == 2 * (i + 1))
        sent = fake_.bodies[-1]["messages"]
        assert app.conv.memory_start > 0 and sent[0]["content"] != f"0 {question}"
        assert sent[-1]["content"] == f"3 {question}"
        assert app.engine.count_tokens(app.conv.request()) <= 100
        await wait_for(pilot, lambda: len(app.chat_screen.messages.query(".memory-start")) == 1)
        assert "oldest turns dropped" in app.status_text()
        await pilot.press("ctrl+q")
