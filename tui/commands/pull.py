"""`llamachat pull [KEY]`: fetch a catalog model (default: smollm2) into the library, with one
progress line on stderr when it is a terminal; `--list` shows the catalog. The work itself is
model_store.pull.pull, which the app's first run calls too."""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

from llamachat.model_store.catalog import CATALOG, DEFAULT_KEY

STAGE_LABELS = {
    "download": "downloading",
    "extract": "unpacking",
    "verify": "checking",
    "install": "installing",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", nargs="?", default=DEFAULT_KEY, metavar="MODEL",
                        help=f"catalog model to fetch (default: {DEFAULT_KEY}); known: {', '.join(CATALOG)}")
    parser.add_argument("--list", action="store_true", help="list the catalog and exit")


class PullLine:
    """A `progress(stage, done, total)` callback drawing the whole pull as one line on stderr when
    that is a terminal, and nothing otherwise (the command's final sentence says what happened).
    Downloading, unpacking, checking and installing are phases of one figure
    (model_store.pull.OverallProgress), so the bar never runs back when a phase starts at 0; the
    line is cleared at the end, whatever ends the pull, so a message that follows stands alone."""

    INTERVAL = 0.1  # seconds between redraws: the copy reports every MiB, far more often

    def __init__(self, name: str, stream=None):
        from llamachat.model_store.pull import OverallProgress

        self.name = name
        self.stream = stream or sys.stderr
        self.overall = OverallProgress()
        self.tty = False
        self._drawn_at: float | None = None
        self._stage: str | None = None

    def __enter__(self):
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        return self

    def __exit__(self, *exc):
        if self.tty and self._drawn_at is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        return False

    def __call__(self, stage: str, done: int, total: int) -> None:
        fraction = self.overall(stage, done, total)
        if not self.tty:
            return
        now = time.monotonic()
        # redraw at most every INTERVAL, but always at a new phase and at a phase's end
        if (self._drawn_at is not None and stage == self._stage and (not total or done < total)
                and now - self._drawn_at < self.INTERVAL):
            return
        self._drawn_at, self._stage = now, stage
        self.stream.write("\r\x1b[K" + self.line(stage, fraction, done, total, _width(self.stream)))
        self.stream.flush()

    def line(self, stage: str, fraction: float, done: int, total: int, width: int) -> str:
        """`NAME [━━━━──] 63% unpacking 62/98 MB`, at most width - 1 characters."""
        amount = f"{done / 1e6:.0f}/{total / 1e6:.0f} MB" if total else f"{done / 1e6:.0f} MB"
        head = f"{self.name} "
        tail = f" {fraction * 100:3.0f}% {STAGE_LABELS.get(stage, stage)} {amount}"
        room = min(30, width - 1 - len(head) - len(tail) - 2)
        if room < 5:  # a narrow terminal: the figures without the bar
            return (head.strip() + tail)[:width - 1]
        fill, empty = ("\u2501", "\u2500") if _can_draw(self.stream) else ("#", "-")
        filled = int(fraction * room)
        return f"{head}[{fill * filled}{empty * (room - filled)}]{tail}"


def _width(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return 80


def _can_draw(stream) -> bool:
    try:
        "\u2501\u2500".encode(getattr(stream, "encoding", None) or "ascii")
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def run(args) -> int:
    from rich.console import Console

    from llamachat.model_store.library import Library
    from llamachat.model_store.pull import add_missing_defaults, already_pulled, catalog_entry, missing_defaults, pull

    if args.list:
        from rich.table import Table

        table = Table("key", "library name", "size", "description", box=None)
        for entry in CATALOG.values():
            table.add_row(entry.key, entry.library_name, f"{entry.size_bytes / 1e6:.0f} MB", entry.description)
        console = Console()
        (console if console.is_terminal else Console(width=400)).print(table)
        return 0

    entry = catalog_entry(args.key)
    lib = Library.load()
    for warning in lib.warnings:
        Console(stderr=True).print(f"llamachat: warning: {warning}", markup=False, highlight=False)
    done = already_pulled(entry, lib)
    if done is not None:
        new = missing_defaults(entry, done)
        if new and not lib.read_only:
            add_missing_defaults(entry, lib)
            shown = ", ".join(f"{k}={v!r}" for k, v in new.items())
            print(f"{done.name} is already pulled ({done.path}); it now has the catalog's defaults {shown} "
                  f"(change them with `llamachat models set {done.name} KEY=VALUE`).")
            return 0
        print(f"{done.name} is already pulled ({done.path}).")
        return 0
    with PullLine(entry.library_name) as progress:
        model = pull(args.key, progress)
    lib.reload()
    note = " It is the default model." if lib.default_name == model.name else f" The default model is still {lib.default_name}."
    print(f"Pulled {model.name} into {model.path}.{note}")
    return 0
