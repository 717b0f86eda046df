"""Files that appear whole or not at all (model files, saved KV states)."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def make_temp_file(folder: str | os.PathLike, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new, hidden, uniquely named file in `folder`, open for writing: (fd, path). Created
    0666 so the kernel applies the user's umask, as to any file a program creates (mkstemp's
    0600 would hide a model or the library from the user's other accounts and tools)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")  # pragma: no cover


@contextmanager
def atomic_output(path: str | os.PathLike, mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` only if the block ends without an error: written to a
    temp file beside it (same file system, so the rename is atomic), fsynced, renamed over
    `path`, then the folder fsynced. On any error, or a kill mid-write, `path` is untouched and
    the temp file is removed (a kill leaves only a dot-file ending in .tmp). `mode`: the file's
    permissions (a chat's saved state stays 0600); None keeps those of the file it replaces
    (e.g. a user's 600), and a new file gets the umask's."""
    path = Path(path)
    fd, tmp = make_temp_file(path.parent, f".{path.name}.", ".tmp")
    try:
        if mode is None:
            try:
                mode = path.stat().st_mode & 0o7777
            except FileNotFoundError:
                pass
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (where the file system allows opening folders)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
