"""`llamachat models ...`: list and edit the model library (models.toml).

    list                      table of models (the default with *, missing files marked)
    show NAME                 one model: file, GGUF summary, every setting and where it comes from
    add PATH [--name N] [--description D] [--set KEY=VALUE ...] [--default]
    remove NAME [--delete-file [--force]]
    set NAME KEY=VALUE ... [--unset KEY ...]
    default NAME
    edit                      $VISUAL / $EDITOR on models.toml, checked afterwards
    path                      where the config, data and cache live

The rules (validation, atomic writes, comments kept) are model_store.library's; this module
only parses arguments and prints. Warnings about the file go to stderr on every command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys

from llamachat.runtime.errors import ConfigError, UserError


def configure(parser: argparse.ArgumentParser) -> None:
    from llamachat.runtime.params import SETTINGS

    keys = ", ".join(SETTINGS)
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="list the models (the default; same as no ACTION)")
    p = sub.add_parser("show", help="show one model's file and settings")
    p.add_argument("name")
    p = sub.add_parser("add", help="add a GGUF file to the library (checked first)")
    p.add_argument("path")
    p.add_argument("--name", help="library name (default: made from the file name)")
    p.add_argument("--description", default="", help="free text shown in the list")
    p.add_argument("--set", dest="settings", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"a default setting for this model, e.g. temp=0.7 n_ctx=4096 (keys: {keys})")
    p.add_argument("--default", action="store_true", help="make it the default model")
    p = sub.add_parser("add-remote", help="add a model on an OpenAI-compatible server (checked by listing its models)")
    p.add_argument("name")
    p.add_argument("--url", required=True, help="the server's API root, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--model", help="the server's model name (default: the first it lists)")
    p.add_argument("--api-key-env", metavar="VAR", help="the NAME of the environment variable holding the API key (never the key)")
    p.add_argument("--description", default="", help="free text shown in the list")
    p.add_argument("--set", dest="settings", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help=f"a default setting for this model (keys: {keys})")
    p.add_argument("--default", action="store_true", help="make it the default model")
    p = sub.add_parser("remove", help="remove a model from the library")
    p.add_argument("name")
    p.add_argument("--delete-file", action="store_true",
                   help="also delete its file (only inside llamachat's data dir unless --force)")
    p.add_argument("--force", action="store_true", help="with --delete-file: delete it even outside the data dir")
    p = sub.add_parser("set", help="change a model's settings (values are TOML: 0.7, 42, \"text\")")
    p.add_argument("name")
    p.add_argument("assignments", nargs="*", metavar="KEY=VALUE",
                   help=f"KEY is one of {keys}, path or description; VALUE is a TOML value (text may go unquoted)")
    p.add_argument("--unset", action="append", default=[], metavar="KEY", help="remove a setting (back to llama.cpp's default)")
    p = sub.add_parser("default", help="make a model the default")
    p.add_argument("name")
    sub.add_parser("edit", help="open models.toml in $VISUAL / $EDITOR, check it afterwards")
    sub.add_parser("path", help="print where the config file and the model files live")


def run(args) -> int:
    from llamachat.model_store.library import Library

    action = args.action or "list"
    if action == "path":  # works whatever state the file is in
        return do_path(None, args)
    try:
        lib = Library.load()
    except ConfigError as err:
        if action == "edit":  # the way to repair a broken file
            return do_edit(None, args)
        raise ConfigError(f"{err} (fix it with `llamachat models edit`)") from None
    if lib.read_only and action in WRITING_ACTIONS:  # the refusal says it all; no notice first
        raise ConfigError(lib.read_only_reason)
    _print_warnings(lib.warnings)
    return ACTIONS[action](lib, args)


# ---- helpers ----------------------------------------------------------------------------------

def _console():
    """rich on a terminal; piped, a wide console so paths and rows are never folded."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=400)


def _say(text: str) -> None:
    print(text, flush=True)


def _print_warnings(warnings) -> None:
    for warning in warnings:
        print(f"llamachat: warning: {warning}", file=sys.stderr)


def human_size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def format_setting(value) -> str:
    """As it would be typed after `models set NAME key=`: 0.7, 42, 'text'."""
    if isinstance(value, str):
        return repr(value)
    return str(value) if isinstance(value, int) else f"{value:g}"


def parse_assignment(text: str) -> tuple[str, object]:
    """`key=value` with the value read as a TOML scalar (0.7, 42, true, "text"); anything that
    is not valid TOML is taken as plain text, so `system_prompt=You are terse` works."""
    import tomlkit

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = tomlkit.parse(f"v = {raw.strip()}\n").unwrap()["v"]
    except Exception:
        value = raw
    if isinstance(value, (dict, list)):
        value = raw
    return key, value


def _settings_from(assignments) -> dict:
    settings = {}
    for text in assignments:
        key, value = parse_assignment(text)
        settings[key] = value
    return settings


# ---- actions ----------------------------------------------------------------------------------

def do_list(lib, args) -> int:
    from rich.table import Table

    from llamachat.model_store.library import file_summary, quality_text

    if not lib.models:
        _say(f"The library is empty ({lib.file}). `llamachat pull` fetches the default model; `llamachat models add FILE.gguf` adds one.")
        return 0
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("", "name", "quant", "size", "context", "quality", "path", ""):
        table.add_column(column, overflow="fold")
    for entry in lib.models.values():
        if entry.remote:
            table.add_row("*" if entry.name == lib.default_name else "", entry.name, "remote", "", "", "",
                          f"{entry.base_url} {entry.model or ''}".rstrip(), "")
            continue
        summary = file_summary(entry.path)
        status = "missing" if entry.missing else ("invalid" if summary.error else "")
        table.add_row(
            "*" if entry.name == lib.default_name else "",
            entry.name,
            summary.quant or "",
            human_size(summary.size),
            str(summary.context_length or ""),
            quality_text(entry.quality),
            str(entry.path),
            status,
        )
    console = _console()
    console.print(table)
    if lib.read_only:
        console.print(f"(read-only: {lib.read_only_reason})", markup=False, highlight=False)
    return 0


def do_show(lib, args) -> int:
    from rich.table import Table

    from llamachat.model_store.library import file_summary, quality_details
    from llamachat.runtime.params import SETTINGS

    entry = lib.get(args.name)
    console = _console()
    if entry.remote:
        rows = [("name", entry.name + ("  (default)" if entry.name == lib.default_name else "")),
                ("backend", entry.backend), ("base_url", entry.base_url), ("model", entry.model or "(the server's first)"),
                ("api_key_env", entry.api_key_env or "(none)"), ("description", entry.description)]
        summary = None
    else:
        summary = file_summary(entry.path)
    rows = rows if entry.remote else [
        ("name", entry.name + ("  (default)" if entry.name == lib.default_name else "")),
        ("path", str(entry.path) + ("  (missing)" if entry.missing else "")),
        ("description", entry.description),
    ]
    if quality_details(entry.quality):
        rows.append(("quality", quality_details(entry.quality)))
    if summary is None:
        pass
    elif summary.error and not entry.missing:
        rows.append(("file", f"invalid: {summary.error}"))
    elif not entry.missing:
        rows += [
            ("size", human_size(summary.size)),
            ("architecture", summary.architecture or "?"),
            ("model name", summary.name or ""),
            ("quant", summary.quant or "?"),
            ("trained context", str(summary.context_length or "?")),
        ]
    info = Table(box=None, show_header=False, pad_edge=False)
    info.add_column(style="bold")
    info.add_column(overflow="fold")
    for key, value in rows:
        info.add_row(key, value)
    console.print(info)
    settings = Table("setting", "value", "from", box=None, header_style="bold", pad_edge=False)
    for name, setting in SETTINGS.items():
        if name in entry.settings:
            settings.add_row(name, format_setting(entry.settings[name]), "library")
        else:
            settings.add_row(name, format_setting(setting.default), "llama.cpp default", style="dim")
    console.print()
    console.print(settings)
    return 0


def do_add_remote(lib, args) -> int:
    from llamachat.model_store.library import check_name, check_remote_fields
    from llamachat.tui.remote_backend import RemoteBackend

    check_name(args.name)
    if args.name in lib.models:
        raise UserError(f"a model named {args.name!r} is already in the library; choose another name")
    try:
        check_remote_fields("--url/--model/--api-key-env", args.url, args.model, args.api_key_env)
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.api_key_env and not os.environ.get(args.api_key_env):
        _say(f"note: the environment variable {args.api_key_env} is not set; the check goes without a key")
    backend = RemoteBackend(args.url, args.model, api_key_env=args.api_key_env)
    try:
        backend.connect()  # lists the server's models: the URL, the key and the model checked at once
    finally:
        backend.close()
    entry = lib.add_remote(args.name, args.url, args.model or backend.model, args.api_key_env,
                           description=args.description, settings=_settings_from(args.settings))
    if args.default and lib.default_name != entry.name:
        lib.set_default(entry.name)
    note = " It is the default model." if lib.default_name == entry.name else ""
    ctx = f", context {backend.n_ctx()} tokens" if backend.n_ctx() else ""
    _say(f"Added {entry.name} (model {entry.model!r} at {entry.base_url}{ctx}).{note}")
    return 0


def do_add(lib, args) -> int:
    entry = lib.add(args.path, name=args.name, description=args.description, settings=_settings_from(args.settings))
    if args.default and lib.default_name != entry.name:
        lib.set_default(entry.name)
    note = " It is the default model." if lib.default_name == entry.name else ""
    _say(f"Added {entry.name} ({entry.path}).{note}")
    return 0


def do_remove(lib, args) -> int:
    from llamachat.model_store.library import is_inside_data_dir

    if args.force and not args.delete_file:
        raise UserError("--force only goes with --delete-file")
    entry = lib.get(args.name)
    was_default = lib.default_name == entry.name
    deleted = lib.remove(args.name, delete_file=args.delete_file, force=args.force)
    message = f"Removed {entry.name} from the library."
    if deleted is not None:
        message += f" Deleted {deleted}."
    elif not entry.missing and not entry.remote:
        where = "llamachat's data dir" if is_inside_data_dir(entry.path) else "its place"
        message += f" Its file {entry.path} was kept in {where}."
    if was_default:
        message += " There is no default model now; choose one with `llamachat models default NAME`."
    _say(message)
    return 0


def do_set(lib, args) -> int:
    settings = _settings_from(args.assignments)
    for key in args.unset:
        if key in settings:
            raise UserError(f"{key} is both set and unset")
        settings[key] = None
    if not settings:
        raise UserError("nothing to set: give KEY=VALUE pairs (e.g. temp=0.7) or --unset KEY")
    entry = lib.set(args.name, **settings)
    changed = ", ".join(f"{k}={entry.settings[k]!r}" if k in entry.settings else f"{k} unset" for k in settings if k not in ("path", "description"))
    extra = [f"{k} changed" for k in settings if k in ("path", "description")]
    _say(f"{entry.name}: " + ", ".join(x for x in (changed, *extra) if x) + ".")
    return 0


def do_default(lib, args) -> int:
    entry = lib.set_default(args.name)
    note = f" (its file {entry.path} is missing)" if entry.missing else ""
    _say(f"{entry.name} is the default model now{note}.")
    return 0


def _editor_command() -> list[str]:
    for var in ("VISUAL", "EDITOR"):
        value = os.environ.get(var, "").strip()
        if value:
            return shlex.split(value)
    for fallback in ("nano", "vi"):
        if shutil.which(fallback):
            return [fallback]
    raise UserError("no editor found: set $EDITOR (or $VISUAL), e.g. EDITOR=nano")


def do_edit(lib, args) -> int:
    """Open the file in the user's editor, then read it with the usual rules. A broken result
    is kept as models.toml.rejected (nothing typed is lost) and the previous version put back."""
    from llamachat.model_store.library import Library, write_atomic

    from llamachat.model_store import paths

    if lib is not None and lib.read_only:
        raise ConfigError(lib.read_only_reason)
    file = lib.ensure_file() if lib is not None else paths.config_file()  # None: it does not parse now
    before = file.read_text(encoding="utf-8")
    command = _editor_command()
    try:
        result = subprocess.run([*command, str(file)])
    except OSError as err:
        raise UserError(f"could not start the editor {command[0]!r}: {err.strerror or err}; set $EDITOR to one that exists") from None
    try:
        after = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        after = None
    except UnicodeDecodeError:
        after = file.read_bytes().decode("utf-8", errors="replace")
    if after == before:
        if lib is None:  # it was broken before the editor, and still is
            Library.load(file)  # raises the ConfigError saying why
        _say(f"No changes to {file}.")
        return 0
    rejected = file.with_name(file.name + ".rejected")
    try:
        if after is None:
            raise ConfigError(f"{file} was deleted in the editor")
        new = Library.load(file)
    except ConfigError as err:
        if after is not None:
            write_atomic(rejected, after, backup=False)
        write_atomic(file, before, backup=False)
        kept = f"your edit is kept in {rejected} and " if after is not None else ""
        raise UserError(f"{err}; {kept}{file.name} is back as it was") from None
    # a good edit: keep the version before it as .bak, like every other write
    write_atomic(file.with_name(file.name + ".bak"), before, backup=False)
    _print_warnings(new.warnings)
    note = f" (the editor exited with code {result.returncode})" if result.returncode else ""
    default = f", default {new.default_name}" if new.default_name else ", no default"
    _say(f"Saved {file}: {len(new.models)} model{'s' if len(new.models) != 1 else ''}{default}{note}.")
    return 0


def do_path(lib, args) -> int:
    from llamachat.model_store import paths

    _say(f"config: {paths.config_file()}")
    _say(f"data:   {paths.data_dir()}")
    _say(f"models: {paths.models_dir()}")
    _say(f"cache:  {paths.cache_dir()}")
    return 0


WRITING_ACTIONS = ("add", "add-remote", "remove", "set", "default", "edit")
ACTIONS = {
    "list": do_list,
    "show": do_show,
    "add": do_add,
    "add-remote": do_add_remote,
    "remove": do_remove,
    "set": do_set,
    "default": do_default,
    "edit": do_edit,
    "path": do_path,
}
