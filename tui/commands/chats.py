"""`llamachat chats list | search TEXT | show ID | export ID [PATH] | delete ID`: the saved
chats (the app's Ctrl+O screen) from the command line.

- `list` prints one line per chat, newest first: its id, when it was last used, how many
  messages, the model and the title.
- `search TEXT` prints the chats holding every word of TEXT (as word starts, case and accents
  ignored) with the best-matching message; like grep, it exits 1 when nothing matches.
- `show ID` prints a chat as Markdown (the export's text).
- `export ID [PATH]` writes that Markdown to PATH (a folder: a file named after the chat in it;
  default: the data dir's exports/) and prints where; an existing file is replaced only with
  --force, as `cp` asks before clobbering only when told.
- `delete ID` asks first when standard input is a terminal; otherwise (a script) it needs
  --yes, so a pipe never deletes by accident.

Only the chat store is imported: no Textual, no engine. A database that is not there yet is
read as no chats (nothing is created by looking).
"""

from __future__ import annotations

import sys
import time

from llamachat.runtime.errors import UserError

from ..chat_store import (MATCH_END, MATCH_START, ChatStore, ExportExists, default_export_path, default_path, export_markdown,
                          search_terms)


def configure(parser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="list the saved chats, newest first")
    search = actions.add_parser("search", help="find the chats holding every word of TEXT")
    search.add_argument("text", nargs="+", metavar="TEXT", help="words to look for (word starts, case and accents ignored)")
    show = actions.add_parser("show", help="print a chat as Markdown")
    show.add_argument("id", metavar="ID", help="the chat's id, as `llamachat chats list` shows it")
    export = actions.add_parser("export", help="write a chat as a Markdown file")
    export.add_argument("id", metavar="ID", help="the chat's id, as `llamachat chats list` shows it")
    export.add_argument("path", nargs="?", metavar="PATH", help="file or folder to write to (default: the data dir's exports/)")
    export.add_argument("-f", "--force", action="store_true", help="replace PATH if it exists")
    delete = actions.add_parser("delete", help="delete a chat (asks first on a terminal; --yes otherwise)")
    delete.add_argument("id", metavar="ID", help="the chat's id, as `llamachat chats list` shows it")
    delete.add_argument("-y", "--yes", action="store_true", help="do not ask")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _chat_id(text: str) -> int:
    try:
        chat_id = int(text)
    except ValueError:
        chat_id = -1
    if chat_id < 1:
        raise UserError(f"{text!r} is not a chat id: give the number `llamachat chats list` shows")
    return chat_id


def _open_store() -> ChatStore | None:
    path = default_path()
    return ChatStore(path) if path.exists() else None


def _summary(store: ChatStore | None, chat_id: int):
    chat = store.summary(chat_id) if store is not None else None
    if chat is None:
        raise UserError(f"there is no saved chat {chat_id} (see `llamachat chats list`)")
    return chat


def _describe(chat) -> str:
    return f"chat {chat.id} “{chat.title}” ({chat.n_messages} messages, {chat.model or 'no model'}, last used {_when(chat.updated_at)})"


def _marked(text: str, terminal: bool) -> str:
    """Matched words in bold on a terminal, as they are; elsewhere unmarked."""
    start, end = ("\x1b[1m", "\x1b[22m") if terminal else ("", "")
    return text.replace(MATCH_START, start).replace(MATCH_END, end)


def _print_list(store) -> int:
    chats = store.list() if store is not None else []
    if not chats:
        print("No saved chats yet: the app saves them as you talk.", file=sys.stderr)
        return 0
    for chat in chats:
        print(f"{chat.id:>5}  {_when(chat.updated_at)}  {chat.n_messages:>4} msgs  {chat.model or '-':<20}  {chat.title}")
    return 0


def _search(store, text: str) -> int:
    search_terms(text)  # an empty search is a mistake even before there are chats
    hits = store.search(text) if store is not None else []
    if not hits:
        print(f"no saved chat matches {text!r}", file=sys.stderr)
        return 1
    terminal = sys.stdout.isatty()
    for hit in hits:
        print(f"{hit.id:>5}  {_when(hit.updated_at)}  {_marked(hit.title, terminal)}")
        if hit.seq is not None:
            more = f" (+{hit.n_matches - 1} more)" if hit.n_matches > 1 else ""
            print(f"       message {hit.seq + 1} ({hit.role}): {_marked(hit.snippet, terminal)}{more}")
    return 0


def _delete(store, chat_id: int, yes: bool) -> int:
    chat = _summary(store, chat_id)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError(f"not deleting {_describe(chat)} without confirmation: pass --yes")
        try:
            answer = input(f"Delete {_describe(chat)}? This cannot be undone. [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("Not deleted.", file=sys.stderr)
            return 1
    store.delete(chat_id)
    from ..resume import ResumeStates, folder_beside

    ResumeStates(folder_beside(store.path)).remove(chat_id)  # its saved context goes with it, as in the app
    print(f"Deleted {_describe(chat)}.", file=sys.stderr)
    return 0


def run(args) -> int:
    store = _open_store()
    try:
        if args.action == "list":
            return _print_list(store)
        if args.action == "search":
            return _search(store, " ".join(args.text))
        chat_id = _chat_id(args.id)
        if args.action == "delete":
            return _delete(store, chat_id, args.yes)
        _summary(store, chat_id)
        conv, model = store.load(chat_id)
        if args.action == "show":
            sys.stdout.write(conv.to_markdown(model))
            return 0
        target = args.path if args.path else default_export_path(conv, chat_id)
        try:
            written = export_markdown(conv, model, target, overwrite=args.force)
        except ExportExists as err:
            raise UserError(f"{err}; pass --force to replace it or give another PATH") from None
        print(written)
        return 0
    finally:
        if store is not None:
            store.close()
