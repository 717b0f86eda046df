"""Saved chats: round trips, listing order, delete, schema version, and a process killed in
the middle of writing never damages the chats saved before."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from llamachat.runtime.errors import UserError
from llamachat.tui.chat_store import SCHEMA_VERSION, ChatStore
from llamachat.tui.conversation import INTERACTIVE, Conversation, Message


def chat(*texts, **kwargs) -> Conversation:
    conv = Conversation(**kwargs)
    for i, text in enumerate(texts):
        conv.messages.append(Message("user" if i % 2 == 0 else "assistant", text))
    return conv


def test_round_trip_and_update(tmp_path):
    store = ChatStore(tmp_path / "c.sqlite3")
    conv = chat("Hi ünïcode 🦙", "Hello!", mode=INTERACTIVE, preamble="User:", preamble_name="x.txt",
                reverse_prompts=["User:", "Q:"], system_prompt="")
    conv.messages[-1].stopped = True
    conv.messages[-1].note = "context full"
    chat_id = store.save(conv, model="m1")
    back, model = store.load(chat_id)
    assert model == "m1" and back == conv
    conv.messages.append(Message("user", "more"))
    assert store.save(conv, "m1", chat_id) == chat_id
    assert len(store.load(chat_id)[0].messages) == 3
    assert [(c.id, c.title, c.n_messages) for c in store.list()] == [(chat_id, "Hi ünïcode 🦙", 3)]
    store.close()
    # the default location is the data dir
    assert ChatStore().path.parent.name == "data"


def test_list_newest_first_and_delete(tmp_path):
    store = ChatStore(tmp_path / "c.sqlite3")
    a = store.save(chat("first"))
    time.sleep(0.01)
    b = store.save(chat("second"))
    assert [c.id for c in store.list()] == [b, a]
    store.delete(b)
    assert [c.id for c in store.list()] == [a]
    with pytest.raises(UserError, match="no longer exists"):
        store.load(b)


def test_schema_version_and_newer_database_refused(tmp_path):
    path = tmp_path / "c.sqlite3"
    ChatStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(UserError, match="newer llamachat"):
        ChatStore(path)


def test_not_a_database_is_one_sentence(tmp_path):
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(UserError, match="cannot open the saved chats"):
        ChatStore(path)


WRITER = """
import sys
from llamachat.tui.chat_store import ChatStore
from llamachat.tui.conversation import Conversation, Message
store = ChatStore(sys.argv[1])
conv = Conversation()
i = 0
cid = int(sys.argv[2]) if len(sys.argv) > 2 else None
print("ready", flush=True)
while True:  # rewrite one growing chat as fast as possible until killed
    conv.messages.append(Message("user" if i % 2 == 0 else "assistant", "x" * 5000 + str(i)))
    cid = store.save(conv, "m", cid)
    i += 1
"""


def test_kill_during_writes_keeps_earlier_chats(tmp_path):
    path = tmp_path / "c.sqlite3"
    store = ChatStore(path)
    earlier = [store.save(chat(f"question {i}", f"answer {i}"), model="m") for i in range(5)]
    store.close()
    for delay in (0.3, 0.6):
        others = [c.id for c in ChatStore(path).list() if c.id not in earlier]
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), *map(str, others[:1])], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = ChatStore(path)
    assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for i, chat_id in enumerate(earlier):
        conv, model = store.load(chat_id)
        assert [m.content for m in conv.messages] == [f"question {i}", f"answer {i}"]
    # the chat being rewritten is whole: some complete version of it, never a mix
    (other,) = [c.id for c in store.list() if c.id not in earlier]
    conv, _ = store.load(other)
    assert len(conv.messages) > 0
    assert [m.content[-len(str(i)):] for i, m in enumerate(conv.messages)] == [str(i) for i in range(len(conv.messages))]
