"""Saved chats: one sqlite database (`chats.sqlite3` in the data dir), schema versioned.

Durability: WAL journal with synchronous=FULL, and every change is one transaction, so a crash
or a kill in the middle of a write loses at most that write and never damages earlier chats.
The schema version lives in `PRAGMA user_version`; a database from a newer llamachat is refused
with a sentence instead of being misread.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llamachat.runtime.errors import UserError

from .conversation import Conversation, Message

SCHEMA_VERSION = 2  # 2: chats.titled (the title is the user's, not made from the first message)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id          INTEGER PRIMARY KEY,
    title       TEXT NOT NULL,
    model       TEXT NOT NULL DEFAULT '',
    mode        TEXT NOT NULL DEFAULT 'chat',
    preamble    TEXT NOT NULL DEFAULT '',
    preamble_name TEXT NOT NULL DEFAULT '',
    reverse_prompts TEXT NOT NULL DEFAULT '[]',
    system_prompt TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    titled      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS messages (
    id       INTEGER PRIMARY KEY,
    chat_id  INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    seq      INTEGER NOT NULL,
    role     TEXT NOT NULL,
    content  TEXT NOT NULL,
    stopped  INTEGER NOT NULL DEFAULT 0,
    note     TEXT NOT NULL DEFAULT '',
    UNIQUE (chat_id, seq)
);
"""


def default_path() -> Path:
    from llamachat.model_store.paths import data_dir

    return data_dir() / "chats.sqlite3"


@dataclass
class ChatSummary:
    id: int
    title: str
    model: str
    mode: str
    updated_at: float
    n_messages: int


class ChatStore:
    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=5.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UserError(f"{self.path}: saved chats were written by a newer llamachat (schema {version}, this one reads {SCHEMA_VERSION})")
            if version < SCHEMA_VERSION:
                with self._transaction():
                    if version == 1:  # chats from before renaming: every title was made from the chat
                        self._db.execute("ALTER TABLE chats ADD COLUMN titled INTEGER NOT NULL DEFAULT 0")
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as err:
            raise UserError(f"{self.path}: cannot open the saved chats ({err})") from None

    def _transaction(self):
        db = self._db

        class _Tx:
            def __enter__(self_inner):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, exc_type, exc, tb):
                db.execute("COMMIT" if exc_type is None else "ROLLBACK")
                return False

        return _Tx()

    def close(self) -> None:
        try:
            self._db.close()
        except sqlite3.Error:
            pass

    # -- writing ----------------------------------------------------------------------------

    def save(self, conversation: Conversation, model: str = "", chat_id: int | None = None) -> int:
        """Write the whole conversation (one transaction); returns its id (new if chat_id is None)."""
        now = time.time()
        fields = (conversation.title(), model, conversation.mode, conversation.preamble,
                  conversation.preamble_name, json.dumps(conversation.reverse_prompts),
                  conversation.system_prompt, int(bool(conversation.name.strip())))
        try:
            with self._transaction():
                if chat_id is None or not self._exists(chat_id):
                    cur = self._db.execute(
                        "INSERT INTO chats (title, model, mode, preamble, preamble_name, reverse_prompts,"
                        " system_prompt, titled, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (*fields, now, now),
                    )
                    chat_id = int(cur.lastrowid)
                else:
                    self._db.execute(
                        "UPDATE chats SET title=?, model=?, mode=?, preamble=?, preamble_name=?,"
                        " reverse_prompts=?, system_prompt=?, titled=?, updated_at=? WHERE id=?",
                        (*fields, now, chat_id),
                    )
                    self._db.execute("DELETE FROM messages WHERE chat_id=?", (chat_id,))
                self._db.executemany(
                    "INSERT INTO messages (chat_id, seq, role, content, stopped, note) VALUES (?,?,?,?,?,?)",
                    [(chat_id, i, m.role, m.content, int(m.stopped), m.note) for i, m in enumerate(conversation.messages)],
                )
        except sqlite3.Error as err:
            raise UserError(f"{self.path}: could not save the chat ({err})") from None
        return chat_id

    def rename(self, chat_id: int, title: str) -> None:
        """Give a saved chat the user's title (an empty one: made from its first message again)."""
        title = " ".join(title.split())
        try:
            with self._transaction():
                if not self._exists(chat_id):
                    raise UserError(f"saved chat {chat_id} no longer exists")
                if title:
                    self._db.execute("UPDATE chats SET title=?, titled=1 WHERE id=?", (title, chat_id))
                else:
                    conv, _ = self.load(chat_id)
                    conv.name = ""
                    self._db.execute("UPDATE chats SET title=?, titled=0 WHERE id=?", (conv.title(), chat_id))
        except sqlite3.Error as err:
            raise UserError(f"{self.path}: could not rename the chat ({err})") from None

    def delete(self, chat_id: int) -> None:
        try:
            with self._transaction():
                self._db.execute("DELETE FROM messages WHERE chat_id=?", (chat_id,))
                self._db.execute("DELETE FROM chats WHERE id=?", (chat_id,))
        except sqlite3.Error as err:
            raise UserError(f"{self.path}: could not delete the chat ({err})") from None

    # -- reading ----------------------------------------------------------------------------

    def _exists(self, chat_id: int) -> bool:
        return self._db.execute("SELECT 1 FROM chats WHERE id=?", (chat_id,)).fetchone() is not None

    def list(self) -> list[ChatSummary]:
        rows = self._db.execute(
            "SELECT c.id, c.title, c.model, c.mode, c.updated_at, COUNT(m.id) FROM chats c"
            " LEFT JOIN messages m ON m.chat_id = c.id GROUP BY c.id ORDER BY c.updated_at DESC, c.id DESC"
        ).fetchall()
        return [ChatSummary(*row) for row in rows]

    def load(self, chat_id: int) -> tuple[Conversation, str]:
        """(conversation, model name) of a saved chat; UserError if it is gone."""
        row = self._db.execute(
            "SELECT mode, preamble, preamble_name, reverse_prompts, system_prompt, model, title, titled FROM chats WHERE id=?",
            (chat_id,),
        ).fetchone()
        if row is None:
            raise UserError(f"saved chat {chat_id} no longer exists")
        mode, preamble, preamble_name, reverse, system, model, title, titled = row
        messages = [
            Message(role, content, bool(stopped), note)
            for role, content, stopped, note in self._db.execute(
                "SELECT role, content, stopped, note FROM messages WHERE chat_id=? ORDER BY seq", (chat_id,)
            )
        ]
        try:
            reverse_prompts = list(json.loads(reverse))
        except ValueError:
            reverse_prompts = []
        conv = Conversation(mode=mode, preamble=preamble, preamble_name=preamble_name,
                            reverse_prompts=reverse_prompts, system_prompt=system, messages=messages,
                            name=title if titled else "")
        return conv, model


def default_export_path(conv: Conversation, chat_id: int | None) -> Path:
    """Where an export goes unless the user says otherwise: the data dir's exports/."""
    import re

    from llamachat.model_store.paths import data_dir

    slug = re.sub(r"[^A-Za-z0-9]+", "-", conv.title()).strip("-").lower()[:40] or "chat"
    return data_dir() / "exports" / f"chat-{chat_id if chat_id is not None else 'new'}-{slug}.md"


class ExportExists(UserError):
    """The export's target file is there already: the caller asks before replacing it."""


def export_markdown(conv: Conversation, model: str, path: Path | str, overwrite: bool = False) -> Path:
    """Write a chat as Markdown to `path` (a folder: a file named after the chat inside it).
    An existing file is replaced only with overwrite=True (ExportExists otherwise); the file
    appears whole or not at all."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / default_export_path(conv, None).name.replace("chat-new-", "")
    if path.exists() and not overwrite:
        raise ExportExists(f"{path} already exists")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(conv.to_markdown(model))
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # fails if the file appeared meanwhile: never a silent overwrite
                except FileExistsError:
                    raise
                except OSError:  # a file system without hard links: check, then rename
                    if path.exists():
                        raise FileExistsError(path) from None
                    os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except FileExistsError:
        raise ExportExists(f"{path} already exists") from None
    except OSError as err:
        raise UserError(f"{path}: could not write the export ({err.strerror or err})") from None
    return path
