"""Search over the saved chats (issue 20, part 2): the store's FTS5 index kept in step with
every write and built for a database from before search, the scan it falls back to where
FTS5 is missing, and `llamachat chats list | search | show | export | delete`."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from llamachat.runtime.errors import UserError
from llamachat.tui import chat_store
from llamachat.tui.chat_store import MATCH_END, MATCH_START, ChatStore, default_path
from llamachat.tui.resume import ResumeStates, folder_beside
from llamachat.tui.cli import main
from llamachat.tui.conversation import Conversation, Message


def chat(*texts, **kwargs) -> Conversation:
    conv = Conversation(**kwargs)
    for i, text in enumerate(texts):
        conv.messages.append(Message("user" if i % 2 == 0 else "assistant", text))
    return conv


def ids(hits):
    return [h.id for h in hits]


def unmarked(text: str) -> str:
    return text.replace(MATCH_START, "").replace(MATCH_END, "")


@pytest.fixture(params=["fts5", "scan"])
def store(request, tmp_path, monkeypatch):
    """Every search test runs on FTS5 and on the scan a Python without FTS5 falls back to."""
    if request.param == "scan":
        monkeypatch.setattr(chat_store, "fts5_available", lambda db: False)
    s = ChatStore(tmp_path / "c.sqlite3")
    assert s.fts == (request.param == "fts5")
    yield s
    s.close()


def test_fts5_is_there():
    # this Python's SQLite has FTS5; without it the store falls back to a scan (tested below too)
    db = sqlite3.connect(":memory:")
    assert chat_store.fts5_available(db)


def test_search_finds_every_word_as_word_starts_and_marks_them(store):
    a = store.save(chat("What is the capital of France?", "Paris is the capital of France. Café crème is good."), "m")
    b = store.save(chat("Tell me about llamas", "Llamas live in the Andes.", "And alpacas?", "Alpacas too."), "m")
    assert ids(store.search("andes")) == [b]
    (hit,) = store.search("ANDES")  # case ignored
    assert (hit.seq, hit.role, hit.n_matches) == (1, "assistant", 1)
    assert hit.snippet == f"Llamas live in the {MATCH_START}Andes{MATCH_END}."
    (hit,) = store.search("par")  # a word start: what is typed so far finds Paris
    assert hit.id == a and hit.seq == 1 and f"{MATCH_START}Paris{MATCH_END}" in hit.snippet
    assert store.search("aris") == []  # not the middle of a word
    # every word must be in one message; the title is marked too
    (hit,) = store.search("capital france")
    assert hit.id == a and hit.n_matches == 2 and hit.title == f"What is the {MATCH_START}capital{MATCH_END} of {MATCH_START}France{MATCH_END}?"
    assert store.search("llamas france") == []
    # the chat holding more matches is one hit; newest chat first
    assert ids(store.search("the")) == [b, a]
    assert store.search("alpacas")[0].n_matches == 2
    # a snippet is one line, about a dozen words around the match
    store.save(chat("Geese:\n\n" + "honk " * 40 + "\n\nThe goslings follow.\n" + "honk " * 40), "m")
    (hit,) = store.search("goslings")
    assert "\n" not in hit.snippet and hit.snippet.startswith("…") and hit.snippet.endswith("…")
    assert f"{MATCH_START}goslings{MATCH_END} follow." in hit.snippet and len(hit.snippet.split()) <= 14


def test_accents_are_ignored_with_fts5(tmp_path):
    store = ChatStore(tmp_path / "c.sqlite3")
    a = store.save(chat("café crème"), "m")
    assert ids(store.search("cafe")) == [a] and ids(store.search("CRÈME")) == [a]


def test_index_follows_edits_renames_and_deletes(store):
    a = store.save(chat("a question about owls", "Owls hunt at night."), "m")
    b = store.save(chat("unrelated"), "m")
    conv, _ = store.load(a)
    conv.messages[1].content = "Owls sleep by day."  # an edit rewrites the chat
    store.save(conv, "m", a)
    assert store.search("night") == [] and ids(store.search("sleep")) == [a]
    store.rename(b, "Kestrels and falcons")
    (hit,) = store.search("falcon")
    assert hit.id == b and hit.seq is None and unmarked(hit.title) == "Kestrels and falcons"
    store.rename(b, "")  # back to its first message: the old title no longer matches
    assert store.search("falcon") == []
    store.delete(a)
    assert store.search("owls") == [] and store.search("sleep") == []
    if store.fts:  # the index itself holds nothing of the deleted chat (the search above joins it away)
        assert store._db.execute("SELECT COUNT(*) FROM messages_fts WHERE messages_fts MATCH 'owls'").fetchone()[0] == 0


def test_empty_or_wordless_search_is_one_sentence(store):
    for query in ("", "   ", "?!"):
        with pytest.raises(UserError, match="nothing to search for"):
            store.search(query)


def test_database_from_before_search_gets_its_index(tmp_path, monkeypatch):
    """A database written by the code before search (same schema, no index) is indexed when
    opened, nothing lost; one written without FTS5 is indexed the next time FTS5 is there."""
    path = tmp_path / "c.sqlite3"
    store = ChatStore(path)
    kept = [store.save(chat(f"question {i} about zebras", f"answer {i}"), "m") for i in range(3)]
    store.close()
    # what the store wrote before this change: the same tables and user_version, no index
    db = sqlite3.connect(path)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    db.execute("DROP TABLE messages_fts")
    db.execute("DROP TABLE chats_fts")
    db.commit()
    db.close()

    store = ChatStore(path)
    assert store.fts and sorted(ids(store.search("zebras"))) == sorted(kept)
    assert [m.content for m in store.load(kept[0])[0].messages] == ["question 0 about zebras", "answer 0"]
    assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.close()

    # opened by a Python whose SQLite lacks FTS5: the triggers go (they could not run), writes work
    monkeypatch.setattr(chat_store, "fts5_available", lambda db: False)
    store = ChatStore(path)
    late = store.save(chat("zebras again, written without the index"), "m")
    assert late in ids(store.search("zebras"))
    store.close()
    monkeypatch.undo()
    store = ChatStore(path)  # FTS5 again: rebuilt, the chat written meanwhile included
    assert store.fts and sorted(ids(store.search("zebras"))) == sorted([*kept, late])


DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def test_database_written_by_the_code_before_search(tmp_path):
    """tests/data/chats_before_search.sqlite3 was written by the chat store as it was before
    search (commit a16d346): three chats, one renamed "Birds", one an interactive transcript.
    Opened now it gains the index and keeps every chat whole."""
    path = tmp_path / "chats.sqlite3"
    shutil.copy(os.path.join(DATA, "chats_before_search.sqlite3"), path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM sqlite_master WHERE name LIKE '%fts%'").fetchone()[0] == 0
    db.close()
    store = ChatStore(path)
    assert [(c.title, c.n_messages) for c in store.list()] == [
        ("Bob, what is a llama?", 2), ("Birds", 4), ("How far is the Moon?", 2)]
    (hit,) = store.search("moon")
    assert hit.seq == 0 and store.search("384")[0].seq == 1
    (hit,) = store.search("birds")
    assert hit.seq is None and hit.title == f"{MATCH_START}Birds{MATCH_END}"
    (hit,) = store.search("falcon")
    assert (hit.title, hit.seq) == ("Birds", 3)
    conv, model = store.load(hit.id)
    assert model == "tinyllama" and conv.name == "Birds" and conv.messages[3].stopped
    conv, _ = store.load(store.search("camelid")[0].id)
    assert conv.preamble_name == "chat-with-bob" and conv.reverse_prompts == ["User:"]


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """Two chats in the store at LLAMACHAT_HOME (conftest points it at a temp dir)."""
    store = ChatStore()
    moon = store.save(chat("How far is the Moon?", "About 384,400 km on average."), "smollm2")
    birds = store.save(chat("Name a bird of prey", "The kestrel hovers.", "A fast one?", "The peregrine falcon."), "tinyllama")
    store.close()
    return {"moon": moon, "birds": birds}


def run_cli(capsys, *argv):
    code = main(["chats", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_sentence(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llamachat: "), err
    return lines[0]


def test_cli_list_search_show(saved, capsys):
    code, out, _ = run_cli(capsys, "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].split()[0] == str(saved["birds"]) and lines[0].endswith("Name a bird of prey") and "tinyllama" in lines[0]
    assert lines[1].split()[0] == str(saved["moon"]) and "2 msgs" in lines[1]

    code, out, _ = run_cli(capsys, "search", "peregrine", "FALC")
    assert code == 0
    assert out.splitlines()[0].split()[0] == str(saved["birds"])
    assert "message 4 (assistant): The peregrine falcon." in out  # not a terminal: no marks
    assert MATCH_START not in out and "\x1b" not in out

    code, out, err = run_cli(capsys, "search", "zebra")
    assert (code, out) == (1, "") and "no saved chat matches 'zebra'" in err  # as grep: 1 when nothing matches

    code, out, _ = run_cli(capsys, "show", str(saved["moon"]))
    assert code == 0 and out.startswith("# How far is the Moon?") and "384,400 km" in out


def test_cli_export(saved, capsys, tmp_path):
    target = tmp_path / "moon.md"
    code, out, _ = run_cli(capsys, "export", str(saved["moon"]), str(target))
    assert code == 0 and out.strip() == str(target) and "384,400" in target.read_text()
    target.write_text("mine")
    code, out, err = run_cli(capsys, "export", str(saved["moon"]), str(target))
    assert code != 0 and "already exists; pass --force" in one_sentence(err) and target.read_text() == "mine"
    code, _, _ = run_cli(capsys, "export", str(saved["moon"]), str(target), "--force")
    assert code == 0 and "384,400" in target.read_text()
    # no PATH: the data dir's exports/, named after the chat
    code, out, _ = run_cli(capsys, "export", str(saved["birds"]))
    written = out.strip()
    assert code == 0 and os.path.dirname(written) == str(default_path().parent / "exports") and "falcon" in open(written).read()


def test_cli_mistakes_are_one_sentence(saved, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [
        (("show", "999"), "there is no saved chat 999"),
        (("export", "999"), "there is no saved chat 999"),
        (("delete", "999", "--yes"), "there is no saved chat 999"),
        (("show", "moon"), "'moon' is not a chat id"),
        (("show", "0"), "'0' is not a chat id"),
        (("export", str(saved["moon"]), str(blocker / "out.md")), "could not write the export"),
        (("search", "  "), "nothing to search for"),
        (("search", "?!"), "nothing to search for in '?!'"),
        ((), "required"),
        (("frobnicate",), "invalid choice"),
    ]
    for argv, expected in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code != 0 and expected in one_sentence(err), (argv, err)
    assert len(ChatStore().list()) == 2


def test_cli_delete_asks_on_a_terminal_and_needs_yes_otherwise(saved, capsys, monkeypatch):
    # not a terminal (pytest's stdin): refused without --yes
    code, _, err = run_cli(capsys, "delete", str(saved["moon"]))
    assert code != 0 and "without confirmation: pass --yes" in one_sentence(err)
    assert len(ChatStore().list()) == 2
    # a terminal: asked, naming the chat; anything but yes keeps it
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    questions = []
    for answer, left in (("n", 2), ("", 2), ("y", 1)):
        monkeypatch.setattr("builtins.input", lambda q, a=answer: questions.append(q) or a)
        code, _, _ = run_cli(capsys, "delete", str(saved["moon"]))
        assert code == (0 if answer == "y" else 1) and len(ChatStore().list()) == left
    assert "“How far is the Moon?” (2 messages, smollm2" in questions[0]
    states = ResumeStates(folder_beside(ChatStore().path))
    states.folder.mkdir(parents=True, exist_ok=True)
    states.path_for(saved["birds"]).write_bytes(b"a saved context")
    code, _, _ = run_cli(capsys, "delete", str(saved["birds"]), "--yes")
    assert code == 0 and ChatStore().list() == []
    assert not states.path_for(saved["birds"]).exists()  # its saved context went with it


def test_cli_without_a_database_creates_none(capsys):
    code, out, err = run_cli(capsys, "list")
    assert code == 0 and out == "" and "No saved chats yet" in err
    assert run_cli(capsys, "search", "moon")[0] == 1
    code, _, err = run_cli(capsys, "show", "1")
    assert code != 0 and "there is no saved chat 1" in one_sentence(err)
    assert not default_path().exists()


def test_cli_as_a_program_honours_llamachat_home(tmp_path):
    home = tmp_path / "elsewhere"
    env = {**os.environ, "LLAMACHAT_HOME": str(home)}
    subprocess.run([sys.executable, "-c", "from llamachat.tui.chat_store import ChatStore;"
                    "from llamachat.tui.conversation import Conversation, Message;"
                    "ChatStore().save(Conversation(messages=[Message('user', 'saved at home')]))"], env=env, check=True)
    assert (home / "data" / "chats.sqlite3").exists()
    result = subprocess.run([sys.executable, "-m", "llamachat.tui.cli", "chats", "search", "home"], env=env,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and "saved at home" in result.stdout
    result = subprocess.run([sys.executable, "-m", "llamachat.tui.cli", "chats", "delete", "1"], env=env,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode != 0 and result.stderr.strip().startswith("llamachat: not deleting chat 1")
    assert "Traceback" not in result.stderr


# -- the saved-chats screen -----------------------------------------------------------------------


def long_chat(n_turns: int, needle_at: int) -> Conversation:
    """A chat of 2 * n_turns messages; only message `needle_at` mentions a peregrine."""
    conv = Conversation()
    for i in range(2 * n_turns):
        text = f"Line {i} about kestrels.\n\n" + "More words about hawks. " * 6
        if i == needle_at:
            text = "The peregrine falcon is the fastest bird."
        conv.messages.append(Message("user" if i % 2 == 0 else "assistant", text))
    return conv


async def test_screen_filters_highlights_and_opens_at_the_match(tmp_path):
    from tui_support import SIZE, make_app, make_library, ready, views, wait_for
    from textual.widgets import DataTable, Input, Label

    from llamachat.tui.screens.chats import ChatsScreen

    make_library(tmp_path)
    db = tmp_path / "c.db"
    store = ChatStore(db)
    birds = store.save(long_chat(15, needle_at=11), "alpha")
    store.save(chat("How far is the Moon?", "About 384,400 km."), "alpha")
    store.close()
    app, _ = make_app(store_path=db)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatsScreen) and app.screen.query_one(DataTable).row_count == 2)
        screen = app.screen
        table = screen.query_one(DataTable)
        assert screen.focused is screen.query_one("#chats-search", Input)  # typing goes to the search
        await pilot.press(*"PEREGR")
        await wait_for(pilot, lambda: table.row_count == 1)
        title, _, match = table.get_row_at(0)
        # the match column: which message, then its snippet with the matched word highlighted
        assert match.plain.startswith("12. ") and "peregrine falcon" in match.plain
        marked = [match.plain[s.start:s.end] for s in match.spans if "reverse" in str(s.style)]
        assert marked == ["peregrine"]
        await pilot.press("backspace", "backspace", "backspace", "backspace", "backspace", "backspace", *"zebra")
        await wait_for(pilot, lambda: table.row_count == 0)
        assert "No saved chat holds “zebra”" in str(screen.query_one("#chats-empty", Label).render())
        await pilot.press("escape")  # clears the search, the screen stays
        await wait_for(pilot, lambda: table.row_count == 2)
        assert app.screen is screen
        await pilot.press(*"falcon", "enter")
        await wait_for(pilot, lambda: app.chat_id == birds and len(views(app)) == 30)
        found = views(app)[11]
        messages = app.chat_screen.messages
        await wait_for(pilot, lambda: found.has_class("-found") and messages.scroll_y > 0)
        await pilot.pause(0.2)  # a later layout must not scroll back to the end
        # the message is at the top of the chat pane, not the end of the chat
        assert found.region.y - messages.region.y <= 1 and messages.scroll_y < messages.max_scroll_y
        assert [v for v in views(app) if v.has_class("-found")] == [found]


async def test_screen_opens_without_a_search_at_the_end(tmp_path):
    from tui_support import SIZE, make_app, make_library, ready, views, wait_for
    from textual.widgets import DataTable

    from llamachat.tui.screens.chats import ChatsScreen

    make_library(tmp_path)
    db = tmp_path / "c.db"
    store = ChatStore(db)
    store.save(long_chat(15, needle_at=3), "alpha")
    store.close()
    app, _ = make_app(store_path=db)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatsScreen) and app.screen.query_one(DataTable).row_count == 1)
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(views(app)) == 30)
        messages = app.chat_screen.messages
        await wait_for(pilot, lambda: messages.max_scroll_y > 0 and messages.scroll_y == messages.max_scroll_y)
        assert not [v for v in views(app) if v.has_class("-found")]


async def test_screen_opens_a_short_chat_at_the_match_in_sight(tmp_path):
    """A chat shorter than the pane, opened at its second message from an empty pane, shows
    whole (scrolling it would leave it out of sight: its offset was set before it was drawn)."""
    from tui_support import SIZE, make_app, make_library, ready, views, wait_for

    from llamachat.tui.screens.chats import ChatsScreen

    make_library(tmp_path)
    db = tmp_path / "c.db"
    store = ChatStore(db)
    store.save(chat("How far is the Moon?", "About 384,400 km."), "alpha")
    store.close()
    app, _ = make_app(store_path=db)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatsScreen))
        await pilot.press(*"384", "enter")
        await wait_for(pilot, lambda: len(views(app)) == 2 and views(app)[1].has_class("-found"))
        await pilot.pause(0.5)
        messages = app.chat_screen.messages
        for view in views(app):
            assert view.region.height > 0 and messages.region.contains_region(view.region), (view.region, messages.region)
