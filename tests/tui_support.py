"""Shared helpers for the app's Pilot tests: a tiny library, an app on the fake engine
(tests/tui_fake_engine.py), and waits that poll a condition rather than sleep."""

from __future__ import annotations

import asyncio
import inspect
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tui_fake_engine import FakeScript  # noqa: E402

from llamachat.model_store.library import Library  # noqa: E402
from llamachat.runtime.gguf.writer import write_gguf  # noqa: E402
from llamachat.tui.app import ChatApp  # noqa: E402
from llamachat.tui.cli import build_main_parser  # noqa: E402
from llamachat.tui.widgets.message_view import MessageView  # noqa: E402

SIZE = (110, 36)


def tiny_gguf(path: Path) -> Path:
    write_gguf(path, {"general.architecture": "llama", "general.name": path.stem},
               [("x", (32,), 0, np.zeros(32, np.float32))])
    return path


def make_library(folder: Path) -> Library:
    lib = Library.load()
    lib.add(tiny_gguf(folder / "alpha.gguf"), name="alpha", settings={"temp": 0.3})
    lib.add(tiny_gguf(folder / "beta.gguf"), name="beta", settings={"n_ctx": 256})
    return lib


def make_app(args_list=(), script=None, model="alpha", **kwargs):
    args = build_main_parser().parse_args(list(args_list))
    entry = Library.load().resolve(model) if model else None
    script = script or FakeScript(replies=["Paris is the capital of France."])
    app = ChatApp(args, entry=entry, llama_factory=script.factory, **kwargs)
    return app, script


async def wait_for(pilot, condition, what: str | None = None, timeout: float = 60.0, showing=None):
    """Let the app run until `condition()` holds, checking every 10 ms; after `timeout` seconds
    (generous: a fake reply takes milliseconds, but the machine is shared and the longest reply
    here, 2000 words of Markdown, took over 30 s to show with 2 cores under load) fail naming
    the condition, and what `showing()` returns then."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            if what is None:
                try:
                    what = inspect.getsource(condition).strip()
                except (OSError, TypeError):
                    what = repr(condition)
            now = f"; instead: {showing()!r}" if showing is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for: {what}{now}")
        await pilot.pause(0.01)


async def ready(pilot, app):
    """The model loaded and the sidebar's fields made (the app makes them once it is loaded)."""
    await wait_for(pilot, lambda: app.engine.loaded and not app.loading and app.chat_screen.sidebar.built)


async def send(pilot, app, text):
    app.chat_screen.chat_input.focus()
    app.chat_screen.chat_input.text = text
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.generating or (app.conv.messages and app.conv.messages[-1].role == "assistant"))


async def reply_done(pilot, app):
    await wait_for(pilot, lambda: not app.generating and app.conv.messages and app.conv.messages[-1].role == "assistant")
    await wait_for(pilot, lambda: all(v.settled for v in views(app)))


def views(app, role=None):
    return [v for v in app.chat_screen.messages.query(MessageView) if role is None or v.role == role]


def notifications(app):
    return [n.message for n in app._notifications]


class _Template:
    @staticmethod
    def encode(messages, tokenizer, add_generation_prompt=True):
        from tui_fake_engine import _pieces

        text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        return list(range(len(_pieces(text))))


def templated_factory(script):
    """The fake engine with a chat template, as the real Llama has, so the app can count a
    conversation's tokens (one per word, as the fake's tokenize)."""
    from tui_fake_engine import FakeLlama

    def make(path, **kwargs):
        llm = FakeLlama(path, script=script, **kwargs)
        llm.chat_template = _Template()
        llm.tokenizer = None
        return llm

    return make
