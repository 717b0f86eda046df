"""The one exception type for mistakes a user can cause.

Anything raised as `UserError` reaches the user as one line, `llamachat: MESSAGE`, with the
exit code it carries, and never as a traceback. The message names the file, field or flag
at fault and says what to do. Subclasses exist only where callers need to tell them apart.
"""

import os
import stat

# How much of a value taken from a file or typed by a user a message repeats: enough to
# recognise it, never a megabyte on the terminal.
SHOWN_CHARS = 60


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """repr(value) for a message, shortened past `limit` characters, its full length said."""
    if isinstance(value, (str, bytes)):
        if len(value) <= limit:
            return repr(value)
        # never the repr of the whole: for a huge string that alone could be megabytes
        return repr(value[:limit]) + f"... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def stat_regular_file(path, what: str):
    """os.stat(path) of a regular file the user named, or one UserError saying why it is not
    read as `what` ("a GGUF file", "a prompt file"): missing, unreadable, a directory, or a
    device, FIFO or socket (opening one of those could block or never end)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path} is a directory, not {what}")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path} is not a regular file (a device, FIFO or socket), so it is not read as {what}")
    return st


class UserError(Exception):
    """A problem the user can fix; `str(err)` is the whole sentence shown to them."""

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class GGUFError(UserError):
    """A file that is not a valid GGUF file: `FILE: not a valid GGUF file: REASON`."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: not a valid GGUF file: {reason}")


class ModelError(UserError):
    """A valid GGUF file that this engine cannot run (architecture, tensors, shapes)."""


class ConfigError(UserError):
    """A problem in the model library's TOML config (file, model, field named)."""
