"""Long chats (issue 18, goal 3): when a chat outgrows n_ctx, the oldest turns are left out of
the request (the system prompt kept), the chat shows where the model's memory begins, and the
chat goes on instead of being refused."""

from __future__ import annotations

from first_run_support import FakeScript, SIZE, make_app, make_library, ready, reply_done, send, templated_factory, wait_for

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
