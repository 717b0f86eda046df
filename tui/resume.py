"""Instant resume: the saved KV caches of chats, one file per chat beside the chat database
(`kv-states/chat-ID.kvstate`), kept within a disk budget.

The engine worker writes a chat's file when the chat is left (another chat opened, a new
chat, the model switched or unloaded, the app closed) and reads it before the first reply
after the chat is reopened, so the history is not processed again (runtime/model/kv_state.py
refuses a file made for another model file, n_ctx or engine; the prompt is then processed as
usual). The budget is models.toml's `resume_budget_mib` (shown and edited in the sidebar);
the least recently used files go first when the folder outgrows it (a file's modification
time is its last use: written or loaded). Nothing here imports Textual.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from llamachat.model_store.library import DEFAULT_RESUME_BUDGET_MIB

SUFFIX = ".kvstate"
STALE_TEMP_SECONDS = 600  # a temp file this old is a crashed write's, not one in progress


def folder_beside(chat_db: Path | str) -> Path:
    """Where the saved states of the chats in the database `chat_db` live."""
    return Path(chat_db).parent / "kv-states"


class ResumeStates:
    """The folder of saved chat states and its budget (bytes)."""

    def __init__(self, folder: Path | str, budget_bytes: int = DEFAULT_RESUME_BUDGET_MIB << 20):
        self.folder = Path(folder)
        self.budget_bytes = int(budget_bytes)

    def path_for(self, chat_id: int) -> Path:
        return self.folder / f"chat-{int(chat_id)}{SUFFIX}"

    def files(self) -> list[Path]:
        try:
            return [p for p in self.folder.iterdir() if p.name.endswith(SUFFIX) and p.is_file()]
        except OSError:
            return []

    def used_bytes(self) -> int:
        total = 0
        for p in self.files():
            try:
                total += p.stat().st_size
            except OSError:
                pass
        return total

    def touch(self, path: Path) -> None:
        """Mark a file as just used (eviction goes by last use)."""
        try:
            os.utime(path)
        except OSError:
            pass

    def remove(self, chat_id: int) -> None:
        try:
            self.path_for(chat_id).unlink()
        except OSError:
            pass

    def fits(self, n_bytes: int) -> bool:
        return 0 < n_bytes <= self.budget_bytes

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete the least recently used files until the folder is within the budget (`keep`
        goes last); the files deleted. Leftover temp files of a crashed write go too."""
        entries = []
        for p in self.files():
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((p == keep, st.st_mtime_ns, st.st_size, p))
        entries.sort()
        total = sum(e[2] for e in entries)
        gone = []
        for _, _, size, p in entries:
            if total <= self.budget_bytes:
                break
            try:
                p.unlink()
            except OSError:
                continue
            total -= size
            gone.append(p)
        try:
            for p in self.folder.glob(f".chat-*{SUFFIX}.*.tmp"):
                if time.time() - p.stat().st_mtime > STALE_TEMP_SECONDS:
                    p.unlink()
        except OSError:
            pass
        return gone
