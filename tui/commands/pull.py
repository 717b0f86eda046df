"""`llamachat pull [KEY]`: fetch a catalog model (default: smollm2) into the library, with a
progress display; `--list` shows the catalog. The work itself is model_store.pull.pull, which
the app's first run calls too."""

from __future__ import annotations

import argparse

from llamachat.model_store.catalog import CATALOG, DEFAULT_KEY

STAGE_LABELS = {
    "download": "downloading",
    "extract": "extracting",
    "verify": "checking sha256",
    "install": "installing",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", nargs="?", default=DEFAULT_KEY, metavar="MODEL",
                        help=f"catalog model to fetch (default: {DEFAULT_KEY}); known: {', '.join(CATALOG)}")
    parser.add_argument("--list", action="store_true", help="list the catalog and exit")


class RichProgress:
    """A `progress(stage, done, total)` callback drawing one rich bar per stage on stderr."""

    def __init__(self, console):
        from rich.progress import (BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<16}"), BarColumn(),
                                 DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=console, transient=False)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        task = self.tasks.get(stage)
        if task is None:
            task = self.tasks[stage] = self.progress.add_task(STAGE_LABELS.get(stage, stage), total=total or None)
        self.progress.update(task, completed=done, total=total or None)


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
    with RichProgress(Console(stderr=True)) as progress:
        model = pull(args.key, progress)
    lib.reload()
    note = " It is the default model." if lib.default_name == model.name else f" The default model is still {lib.default_name}."
    print(f"Pulled {model.name} into {model.path}.{note}")
    return 0
