"""Saved chats: one sqlite database (`chats.sqlite3` in the data dir), schema versioned.

Durability: WAL journal with synchronous=FULL, and every change is one transaction, so a crash
or a kill in the middle of a write loses at most that write and never damages earlier chats.
The schema version lives in `PRAGMA user_version`; a database from a newer llamachat is refused
with a sentence instead of being misread.

Search: an SQLite FTS5 index over message texts and chat titles (external-content tables that
hold only the index, the text stays in `messages`/`chats`). Triggers keep it in step with every
write (save, rename, delete, a cascade), whoever writes. The index is derived data, not part of
the versioned schema: a database without it (written before search, or by a Python whose SQLite
lacks FTS5) gets it built when it is opened, so older llamachats keep reading and writing the
same file. Where FTS5 is missing the triggers are dropped (they could not run) and search
scans every message with a Python function that matches as the index does.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
import re
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


# Kept as separate statements: each runs in the store's transaction. The triggers feed the
# external-content tables the old text on delete/update, as FTS5 requires.
_SEARCH_SCHEMA = [
    "CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(content, content='messages', content_rowid='id',"
    " tokenize='unicode61 remove_diacritics 2')",
    "CREATE VIRTUAL TABLE IF NOT EXISTS chats_fts USING fts5(title, content='chats', content_rowid='id',"
    " tokenize='unicode61 remove_diacritics 2')",
    "CREATE TRIGGER IF NOT EXISTS messages_fts_ai AFTER INSERT ON messages BEGIN"
    " INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END",
    "CREATE TRIGGER IF NOT EXISTS messages_fts_ad AFTER DELETE ON messages BEGIN"
    " INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content); END",
    "CREATE TRIGGER IF NOT EXISTS messages_fts_au AFTER UPDATE OF content ON messages BEGIN"
    " INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);"
    " INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END",
    "CREATE TRIGGER IF NOT EXISTS chats_fts_ai AFTER INSERT ON chats BEGIN"
    " INSERT INTO chats_fts(rowid, title) VALUES (new.id, new.title); END",
    "CREATE TRIGGER IF NOT EXISTS chats_fts_ad AFTER DELETE ON chats BEGIN"
    " INSERT INTO chats_fts(chats_fts, rowid, title) VALUES ('delete', old.id, old.title); END",
    "CREATE TRIGGER IF NOT EXISTS chats_fts_au AFTER UPDATE OF title ON chats BEGIN"
    " INSERT INTO chats_fts(chats_fts, rowid, title) VALUES ('delete', old.id, old.title);"
    " INSERT INTO chats_fts(rowid, title) VALUES (new.id, new.title); END",
]
_SEARCH_TRIGGERS = ("messages_fts_ai", "messages_fts_ad", "messages_fts_au", "chats_fts_ai", "chats_fts_ad", "chats_fts_au")

# Marks around the matched words in SearchHit.title and .snippet: control characters that
# typed or generated chat text does not hold.
MATCH_START, MATCH_END = "\x02", "\x03"


def fts5_available(db: sqlite3.Connection) -> bool:
    try:
        db.execute("CREATE VIRTUAL TABLE temp.fts5_probe USING fts5(x)")
        db.execute("DROP TABLE temp.fts5_probe")
        return True
    except sqlite3.OperationalError:
        return False


def search_terms(query: str) -> list[str]:
    """The words of a search: what the FTS index would take as words (letters, digits), so
    `don't?` is `don`, `t`. UserError if there are none."""
    terms = re.findall(r"\w+", query)
    if not terms:
        raise UserError(f"nothing to search for in {query.strip()!r}: give one or more words (letters or digits)"
                        if query.strip() else "nothing to search for: give one or more words")
    return terms


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


@dataclass
class SearchHit(ChatSummary):
    """A chat that matches a search: its best-matching message (seq = its place in the chat,
    None when only the title matched) with a one-line snippet of it around the match; the
    matched words in the title and the snippet are marked with MATCH_START/MATCH_END."""

    seq: int | None
    role: str
    snippet: str
    n_matches: int  # messages of the chat that match


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
            self.fts = fts5_available(self._db)
            self._keep_search_index()
        except sqlite3.DatabaseError as err:
            raise UserError(f"{self.path}: cannot open the saved chats ({err})") from None

    def _keep_search_index(self) -> None:
        """Build the search index if its triggers are missing (a database from before search, or
        last opened without FTS5); without FTS5, drop triggers that could not run."""
        present = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        if self.fts and not present.issuperset(_SEARCH_TRIGGERS):
            with self._transaction():
                for statement in _SEARCH_SCHEMA:
                    self._db.execute(statement)
                self._db.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")
                self._db.execute("INSERT INTO chats_fts(chats_fts) VALUES ('rebuild')")
        elif not self.fts and present & set(_SEARCH_TRIGGERS):
            with self._transaction():
                for name in _SEARCH_TRIGGERS:
                    self._db.execute(f"DROP TRIGGER IF EXISTS {name}")

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

    def summary(self, chat_id: int) -> ChatSummary | None:
        row = self._db.execute(
            "SELECT c.id, c.title, c.model, c.mode, c.updated_at, COUNT(m.id) FROM chats c"
            " LEFT JOIN messages m ON m.chat_id = c.id WHERE c.id=? GROUP BY c.id", (chat_id,)
        ).fetchone()
        return ChatSummary(*row) if row else None

    def search(self, query: str) -> list[SearchHit]:
        """Chats with a message (or a title) holding every word of `query`, each word also as the
        start of a longer one (`par` finds Paris), case and accents ignored; newest chat first.
        UserError if the query has no words."""
        terms = search_terms(query)
        try:
            hits = self._search_fts(terms) if self.fts else self._search_scan(terms)
        except sqlite3.Error as err:
            raise UserError(f"{self.path}: could not search the saved chats ({err})") from None
        return hits

    def _search_fts(self, terms: list[str]) -> list[SearchHit]:
        match = " ".join('"' + t.replace('"', '""') + '"*' for t in terms)
        summaries = {c.id: c for c in self.list()}
        best: dict[int, tuple] = {}  # chat id -> (seq, role, snippet) of its best-ranked message
        counts: dict[int, int] = {}
        for chat_id, seq, role, snip in self._db.execute(
            "SELECT m.chat_id, m.seq, m.role,"
            " snippet(messages_fts, 0, char(2), char(3), '…', 12)"
            " FROM messages_fts f JOIN messages m ON m.id = f.rowid WHERE messages_fts MATCH ?"
            " ORDER BY f.rank, m.seq", (match,)
        ):
            counts[chat_id] = counts.get(chat_id, 0) + 1
            best.setdefault(chat_id, (seq, role, " ".join(snip.split())))  # one line, as the scan's
        titles = {chat_id: title for chat_id, title in self._db.execute(
            "SELECT rowid, highlight(chats_fts, 0, char(2), char(3)) FROM chats_fts WHERE chats_fts MATCH ?", (match,))}
        return self._hits(summaries, best, counts, titles)

    def _search_scan(self, terms: list[str]) -> list[SearchHit]:
        """The same search without FTS5, word starts with case and accents ignored as the index
        does, by a Python function over every message: slower on many chats, same answers."""
        folded = [_fold(t) for t in terms]

        def matches(text: str) -> int:
            plain = _fold(text)
            return int(all(re.search(r"(?<!\w)" + re.escape(t), plain) for t in folded))

        self._db.create_function("llamachat_matches", 1, matches, deterministic=True)
        summaries = {c.id: c for c in self.list()}
        best: dict[int, tuple] = {}
        counts: dict[int, int] = {}
        for chat_id, seq, role, content in self._db.execute(
            "SELECT chat_id, seq, role, content FROM messages WHERE llamachat_matches(content) ORDER BY chat_id, seq"
        ):
            counts[chat_id] = counts.get(chat_id, 0) + 1
            best.setdefault(chat_id, (seq, role, _mark(content, terms, window=12)))
        titles = {chat_id: _mark(title, terms)
                  for chat_id, title in self._db.execute("SELECT id, title FROM chats WHERE llamachat_matches(title)")}
        return self._hits(summaries, best, counts, titles)

    @staticmethod
    def _hits(summaries, best, counts, titles) -> list[SearchHit]:
        hits = []
        for chat_id, chat in summaries.items():  # newest first, as list()
            if chat_id not in best and chat_id not in titles:
                continue
            seq, role, snip = best.get(chat_id, (None, "", ""))
            hits.append(SearchHit(chat.id, titles.get(chat_id, _clean(chat.title)), chat.model, chat.mode, chat.updated_at,
                                  chat.n_messages, seq, role, snip, counts.get(chat_id, 0)))
        return hits

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


def _clean(text: str) -> str:
    return text.replace(MATCH_START, "").replace(MATCH_END, "")


def _fold(text: str) -> str:
    """Lower case without accents, as the index's unicode61 tokenizer with remove_diacritics."""
    import unicodedata

    return "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))


def _mark(text: str, terms: list[str], window: int | None = None) -> str:
    """`text` with each word starting with one of `terms` marked (case and accents ignored), as
    FTS5 marks a prefix match; with `window`, only about that many words around the first
    match, as FTS5's snippet()."""
    text = " ".join(_clean(text).split()) if window else _clean(text)
    # fold character by character, so a match in the folded text maps back to the original
    folded, origin = [], []
    for i, c in enumerate(text):
        f = _fold(c)
        folded.append(f)
        origin.extend([i] * len(f))
    folded_text = "".join(folded)
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(_fold(t)) for t in sorted(terms, key=len, reverse=True)) + r")\w*")
    spans = [(origin[m.start()], origin[m.end() - 1] + 1) for m in pattern.finditer(folded_text) if m.end() > m.start()]
    lo, hi = 0, len(text)
    if window and spans:
        words = [m.span() for m in re.finditer(r"\S+", text)]
        at = next(i for i, (_, end) in enumerate(words) if end > spans[0][0])
        first = max(0, at - window // 2)
        last = min(len(words), first + window) - 1
        lo, hi = words[first][0], words[last][1]
    out = ["…" if lo > 0 else ""]
    pos = lo
    for start, end in spans:
        if start >= lo and end <= hi:
            out += [text[pos:start], MATCH_START, text[start:end], MATCH_END]
            pos = end
    out += [text[pos:hi], "…" if hi < len(text) else ""]
    return "".join(out)


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
    except FileExistsError:  # a file where a folder of the path should be: not "already exists"
        raise UserError(f"{path}: could not write the export (a file is in the way of its folder)") from None
    except OSError as err:
        raise UserError(f"{path}: could not write the export ({err.strerror or err})") from None
    try:
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
