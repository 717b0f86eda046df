"""How replies and messages look on screen (issue 18, bugs a and l): a fenced code block renders
the same while it streams, after it ends and when the chat is reopened; a message typed over
several lines keeps its line breaks."""

from __future__ import annotations

from tui_support import FakeScript, SIZE, make_app, make_library, ready, reply_done, send, views, wait_for

from textual.widgets import Markdown, Static

CODE_REPLY = """Here is a program:

```c
#include <stdio.h>
#define MAX 100

# Example usage:
int main() { return 0; }
```

That is all."""


def block_kinds(view) -> list[str]:
    return [type(b).__name__ for b in view.query_one(Markdown).children]


async def test_code_block_renders_right_while_streaming_and_after(tmp_path):
    make_library(tmp_path)
    # word by word with a delay, so the reply reaches the screen over many drain ticks
    app, script = make_app(script=FakeScript(replies=[CODE_REPLY], delay=0.02))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "write C")
        view = views(app, "assistant")[-1]
        # while streaming: once the fence has closed, the blocks are what a full parse gives
        await wait_for(pilot, lambda: "That" in view.source or not app.generating)
        await wait_for(pilot, lambda: view.settled)
        if app.generating:
            assert block_kinds(view)[:2] == ["MarkdownParagraph", "MarkdownFence"]
        await reply_done(pilot, app)
        assert block_kinds(view) == ["MarkdownParagraph", "MarkdownFence", "MarkdownParagraph"]
        fence = view.query_one(Markdown).children[1]
        assert "#include <stdio.h>\n#define MAX 100" in fence.code
        assert "# Example usage:" in fence.code
        # reopened from the saved chats it looks the same
        chat_id = app.chat_id
        app.open_chat(chat_id)
        await pilot.pause(0.3)
        assert block_kinds(views(app, "assistant")[-1]) == ["MarkdownParagraph", "MarkdownFence", "MarkdownParagraph"]


async def test_multi_line_message_keeps_its_line_breaks(tmp_path):
    make_library(tmp_path)
    app, _ = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "first line\nsecond line\nthird line")
        await reply_done(pilot, app)
        user = views(app, "user")[-1]
        body = user.query_one(".message-body")
        assert isinstance(body, Static) and not isinstance(body, Markdown)
        assert str(body.render()).splitlines()[:3] == ["first line", "second line", "third line"]
        # and the same after reopening
        app.open_chat(app.chat_id)
        await pilot.pause(0.3)
        body = views(app, "user")[-1].query_one(".message-body")
        assert str(body.render()).splitlines()[:3] == ["first line", "second line", "third line"]
