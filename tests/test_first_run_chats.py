"""Saved chats (issue 18, bug p and goal 5): the delete question names the chat, a chat can be
renamed, and an export goes to a file the user chooses, never silently over another."""

from __future__ import annotations

import sqlite3

from tui_support import FakeScript, SIZE, make_app, make_library, notifications, ready, reply_done, send, wait_for

from llamachat.tui.chat_store import ChatStore, ExportExists, export_markdown
from llamachat.tui.conversation import Conversation, Message
from llamachat.tui.screens.chats import ChatsScreen
from llamachat.tui.screens.confirm import ConfirmScreen
from llamachat.tui.screens.prompt import PromptScreen

import pytest


async def two_chats_with_one_title(pilot, app):
    for answer in ("Paris.", "Paris again."):
        await send(pilot, app, "Capital of France?")
        await reply_done(pilot, app)
        await pilot.press("ctrl+n")


async def test_delete_question_names_the_chat_and_rename_tells_them_apart(tmp_path):
    make_library(tmp_path)
    app, _ = make_app(script=FakeScript(replies=["Paris.", "Paris again."]), store_path=tmp_path / "c.db")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await two_chats_with_one_title(pilot, app)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatsScreen))
        await pilot.press("tab", "r")  # the screen opens in its search box: Tab to the list
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
        app.screen.query_one("Input").value = "France, second try"
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatsScreen))
        titles = sorted(c.title for c in app.store.list())
        assert titles == ["Capital of France?", "France, second try"]
        await pilot.press("down", "d")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        question = app.screen.question
        assert "“Capital of France?”" in question and "2 messages" in question
        await pilot.press("y")
        await wait_for(pilot, lambda: len(app.store.list()) == 1)
        assert app.store.list()[0].title == "France, second try"


async def test_renamed_chat_keeps_its_title_as_it_goes_on(tmp_path):
    make_library(tmp_path)
    app, _ = make_app(script=FakeScript(replies=["Paris.", "Lyon."]), store_path=tmp_path / "c.db")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "Capital of France?")
        await reply_done(pilot, app)
        app.rename_chat(None, "  Geography  ")
        await send(pilot, app, "Second city?")
        await reply_done(pilot, app)
        assert app.store.list()[0].title == "Geography"
        conv, _ = app.store.load(app.chat_id)
        assert conv.name == "Geography"
        app.rename_chat(app.chat_id, "")  # back to the first message
        conv, _ = app.store.load(app.chat_id)
        assert app.store.list()[0].title == "Capital of France?"


async def test_export_goes_where_the_user_says_and_asks_before_replacing(tmp_path):
    make_library(tmp_path)
    app, _ = make_app(store_path=tmp_path / "c.db")
    target = tmp_path / "out" / "france.md"
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "Capital of France?")
        await reply_done(pilot, app)
        for _ in range(2):
            app.call_later(app.action_export)  # inside the app's loop, as a key press would be
            await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
            app.screen.query_one("Input").value = str(target)
            await pilot.press("enter")
            await pilot.pause(0.2)
        # the second time the file is there: a question, not an overwrite
        assert isinstance(app.screen, ConfirmScreen) and str(target) in app.screen.question
        target.write_text("mine")
        await pilot.press("n")
        await pilot.pause(0.1)
        assert target.read_text() == "mine"
        app.call_later(app.action_export)
        await wait_for(pilot, lambda: isinstance(app.screen, PromptScreen))
        app.screen.query_one("Input").value = str(target)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: target.read_text().startswith("# Capital of France?"))
        assert any(str(target) in n for n in notifications(app))


def test_export_markdown_never_overwrites_silently(tmp_path):
    conv = Conversation(messages=[Message("user", "hi"), Message("assistant", "hello")])
    path = export_markdown(conv, "m", tmp_path / "a.md")
    assert path.read_text().startswith("# hi")
    with pytest.raises(ExportExists):
        export_markdown(conv, "m", path)
    # a folder: a file named after the chat inside it
    assert export_markdown(conv, "m", tmp_path).parent == tmp_path
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_version_1_store_gains_titles(tmp_path):
    db_path = tmp_path / "old.db"
    db = sqlite3.connect(db_path)
    db.executescript("""
        CREATE TABLE chats (id INTEGER PRIMARY KEY, title TEXT NOT NULL, model TEXT NOT NULL DEFAULT '',
            mode TEXT NOT NULL DEFAULT 'chat', preamble TEXT NOT NULL DEFAULT '', preamble_name TEXT NOT NULL DEFAULT '',
            reverse_prompts TEXT NOT NULL DEFAULT '[]', system_prompt TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL, updated_at REAL NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY, chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, stopped INTEGER NOT NULL DEFAULT 0,
            note TEXT NOT NULL DEFAULT '', UNIQUE (chat_id, seq));
        INSERT INTO chats VALUES (1, 'hi', 'm', 'chat', '', '', '[]', '', 0, 0);
        INSERT INTO messages VALUES (1, 1, 0, 'user', 'hi', 0, '');
        PRAGMA user_version=1;
    """)
    db.close()
    store = ChatStore(db_path)
    conv, _ = store.load(1)
    assert conv.name == "" and conv.title() == "hi"
    store.rename(1, "Greeting")
    assert store.list()[0].title == "Greeting" and store.load(1)[0].name == "Greeting"


def test_last_code_block():
    from llamachat.tui.app import last_code_block

    text = "Use this:\n\n```python\nprint('a')\n```\n\nor this:\n\n~~~\nx = 1\n\ny = 2\n~~~\n\ndone"
    assert last_code_block(text) == "x = 1\n\ny = 2"
    assert last_code_block("first\n```c\nint main() {\n  return 0;") == "int main() {\n  return 0;"  # cut short
    assert last_code_block("no code here, only `inline`") is None


async def test_f2_and_f3_copy_the_reply_and_its_code(tmp_path):
    make_library(tmp_path)
    reply = "Here:\n\n```python\nprint('hi')\n```\n\nThat prints hi."
    app, _ = make_app(script=FakeScript(replies=[reply]))
    copied = []
    app.copy_to_clipboard = copied.append
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("f3")
        await pilot.pause(0.1)
        assert copied == [] and any("No code block" in n for n in notifications(app))
        await send(pilot, app, "code please")
        await reply_done(pilot, app)
        await pilot.press("f2")
        await pilot.press("f3")
        await pilot.pause(0.1)
        assert copied == [reply, "print('hi')"]
