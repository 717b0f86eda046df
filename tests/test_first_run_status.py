"""The status line's context meter (issue 18, bug k): it belongs to the chat on screen, not to
the previous one: 0 after Ctrl+N, the opened chat's own size after Ctrl+O."""

from __future__ import annotations

import re

from tui_support import FakeScript, SIZE, make_app, make_library, ready, reply_done, send, wait_for
from tui_fake_engine import FakeLlama, _pieces


class TemplatedFake(FakeLlama):
    """The fake engine with a chat template, as the real Llama has, so the app can count a
    conversation's tokens: one token per word, as the fake's tokenize."""

    class _Template:
        @staticmethod
        def encode(messages, tokenizer, add_generation_prompt=True):
            text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
            return list(range(len(_pieces(text))))

    chat_template = _Template()
    tokenizer = None


def ctx(app) -> tuple[int | None, int]:
    used, n_ctx = re.search(r"ctx (\S+)/(\d+)", app.status_text()).groups()
    return (None if used == "?" else int(used)), int(n_ctx)


async def test_ctx_meter_follows_the_chat_on_screen(tmp_path):
    make_library(tmp_path)
    script = FakeScript(replies=["one two three four five six seven eight", "short"])
    app, _ = make_app(script=script)
    app.engine._factory = lambda path, **kw: TemplatedFake(path, script=script, **kw)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        assert ctx(app)[0] == 0
        await send(pilot, app, "a long question with many many words in it")
        await reply_done(pilot, app)
        first_chat, first_used = app.chat_id, ctx(app)[0]
        assert first_used > 10
        await pilot.press("ctrl+n")
        await pilot.pause(0.1)
        assert ctx(app)[0] == 0
        await send(pilot, app, "hi")
        await reply_done(pilot, app)
        second_used = ctx(app)[0]
        assert 0 < second_used < first_used
        app.open_chat(first_chat)
        await pilot.pause(0.1)
        # the reopened chat's prompt, counted by the template (the reply's own tokens included)
        assert ctx(app)[0] == len(_pieces("<|user|>a long question with many many words in it"
                                          "<|assistant|>one two three four five six seven eight"))
