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
