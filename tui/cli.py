"""The `llamachat` command line: subcommands and llama.cpp `main`-style flags.

`llamachat SUBCOMMAND ...` runs one of the tools below; anything else is llama.cpp's `main`:
a one-shot completion with -p/-f, the chat app on a terminal, or a headless chat when stdin
is piped or --no-tui is given. Each subcommand lives in `commands/NAME.py` with
`configure(parser)` and `run(args) -> int`; it is imported only when used, so the headless
paths never import Textual.

Every `UserError` becomes one line on stderr and its exit code; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from importlib import import_module

from llamachat.runtime.errors import UserError
from llamachat.runtime.params import SETTINGS, check_setting, suggestion

# name -> one-line help; the module is llamachat.tui.commands.<name> (import_ for import)
SUBCOMMANDS = {
    "inspect": "describe a GGUF file (or refuse a broken one)",
    "tokenize": "show how a model's tokenizer splits text, like llama-tokenize",
    "perplexity": "measure perplexity on a text file, like llama-perplexity",
    "bench": "measure prompt processing and generation speed, like llama-bench",
    "quantize": "convert a GGUF file to another quantization type, like llama-quantize",
    "import": "add a model from a GGUF file, a Hugging Face folder or a Meta checkpoint",
    "pull": "download a catalog model (default: smollm2)",
    "models": "list and edit the model library (models.toml)",
    "serve": "serve a model over an OpenAI-compatible HTTP API (like llama-server)",
    "chats": "list, search, show, export or delete the saved chats",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one sentence (a UserError, exit 2), never a usage dump;
    an unknown choice gets a "did you mean". Subparsers inherit the class."""

    def error(self, message: str):
        message = re.sub(r"^argument ", "", message)
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            message = f"{message[:m.start()]}invalid choice {m.group(1)!r}{suggestion(m.group(1), choices)}; choose from {', '.join(choices)}"
        raise UserError(f"{message} (see `{self.prog} --help`)")


def setting_flag(name: str):
    """An argparse type for a flag that sets runtime.params setting `name`: parsed and checked
    by the one rule (finite, in range), so `--temp nan` fails as the flag is read."""
    setting = SETTINGS[name]

    def parse(text: str):
        try:
            value = setting.type(text) if setting.type is not str else text
        except (TypeError, ValueError, OverflowError):
            value = text  # check_setting words the complaint
        try:
            return check_setting(name, value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = setting.type.__name__
    return parse


def _module_for(name: str) -> str:
    return f"llamachat.tui.commands.{'import_' if name == 'import' else name}"


def build_main_parser() -> argparse.ArgumentParser:
    """llama.cpp `main`'s flags. Sampling flags default to None: unset means 'the model's
    library default, else llama.cpp's default' (runtime.params)."""
    p = ArgumentParser(
        prog="llamachat",
        description="Chat with llama-family GGUF models on the CPU. "
        "Subcommands: " + ", ".join(SUBCOMMANDS) + " (llamachat SUBCOMMAND --help).",
    )
    p.add_argument("-m", "--model", help="library model name or path to a .gguf file (default: the library's default)")
    p.add_argument("-p", "--prompt", help="prompt text; without -i/--instruct, complete it and exit")
    p.add_argument("-f", "--file", "--prompt-file", dest="file", help="prompt file: a path or the name of a shipped prompt (alpaca, chat-with-bob, ...)")
    p.add_argument("-n", "--n-predict", dest="n_predict", type=setting_flag("n_predict"), help="tokens to generate (-1 = until end of text)")
    p.add_argument("-c", "--ctx-size", dest="n_ctx", type=setting_flag("n_ctx"), help="context size in tokens")
    p.add_argument("--temp", type=setting_flag("temp"), help="temperature (0 = greedy)")
    p.add_argument("--top-k", dest="top_k", type=setting_flag("top_k"))
    p.add_argument("--top-p", dest="top_p", type=setting_flag("top_p"))
    p.add_argument("--min-p", dest="min_p", type=setting_flag("min_p"))
    p.add_argument("--typical", dest="typical_p", type=setting_flag("typical_p"))
    p.add_argument("--repeat-penalty", dest="repeat_penalty", type=setting_flag("repeat_penalty"))
    p.add_argument("--repeat-last-n", dest="repeat_last_n", type=setting_flag("repeat_last_n"))
    p.add_argument("--presence-penalty", dest="presence_penalty", type=setting_flag("presence_penalty"))
    p.add_argument("--frequency-penalty", dest="frequency_penalty", type=setting_flag("frequency_penalty"))
    p.add_argument("--mirostat", type=setting_flag("mirostat"), help="0 = off, 1 = mirostat, 2 = mirostat 2.0")
    p.add_argument("--mirostat-lr", dest="mirostat_eta", type=setting_flag("mirostat_eta"))
    p.add_argument("--mirostat-ent", dest="mirostat_tau", type=setting_flag("mirostat_tau"))
    p.add_argument("-l", "--logit-bias", dest="logit_bias", action="append", default=[], metavar="TOKEN_ID(+/-)BIAS", help="e.g. 15043+1 or 15043-inf")
    p.add_argument("-s", "--seed", type=setting_flag("seed"), help="random seed (-1 = random)")
    p.add_argument("-t", "--threads", type=setting_flag("threads"), help="CPU threads")
    p.add_argument("-r", "--reverse-prompt", dest="reverse_prompt", action="append", default=[], help="stop (and hand over to the user) at this text; repeatable")
    p.add_argument("--keep", dest="n_keep", type=int, default=0, help="tokens of the prompt kept when the context shifts (-1 = all)")
    p.add_argument("--context-shift", action="store_true", help="when the context is full, drop the older half instead of stopping (= --context-policy shift)")
    p.add_argument("--context-policy", dest="context_policy", type=setting_flag("context_policy"),
                   help="when a chat outgrows the context: drop-oldest (its oldest turns; the default), ask, or shift")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-text")
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    p.add_argument("-i", "--interactive", action="store_true", help="interactive transcript mode (use with -r)")
    p.add_argument("--instruct", action="store_true", help="instruction mode (Alpaca-style turns)")
    p.add_argument("--system", dest="system_prompt", help="system prompt for chats")
    p.add_argument("--chat-format", dest="chat_format", type=setting_flag("chat_format"), help="built-in chat format instead of the model's template")
    p.add_argument("--color", action="store_true", help="colour the user's text apart from the model's (headless)")
    p.add_argument("--no-tui", action="store_true", help="never start the full-screen app")
    p.add_argument("--verbose", action="store_true", help="timings and details on stderr")
    return p


def _run_subcommand(name: str, argv: list[str]) -> int:
    module = import_module(_module_for(name))
    parser = ArgumentParser(prog=f"llamachat {name}", description=SUBCOMMANDS[name])
    module.configure(parser)
    args = parser.parse_args(argv)
    return int(module.run(args) or 0)


def _run_main(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-"):
        # the main command takes flags only, so a leading word is a mistyped subcommand
        word = argv[0] if len(argv[0]) <= 40 else argv[0][:40] + "..."
        raise UserError(f"unknown command {word!r}{suggestion(argv[0], SUBCOMMANDS)}; commands: "
                        f"{', '.join(SUBCOMMANDS)}, or flags such as -m MODEL -p PROMPT (see `llamachat --help`)")
    args = build_main_parser().parse_args(argv)
    headless = args.no_tui or not sys.stdin.isatty() or not sys.stdout.isatty()
    if (args.prompt is not None or args.file is not None) and not (args.interactive or args.instruct):
        from llamachat.tui import oneshot

        return int(oneshot.run(args) or 0)
    if headless:
        from llamachat.tui import headless_chat

        return int(headless_chat.run(args) or 0)
    from llamachat.tui import app

    return int(app.run(args) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            code = _run_subcommand(argv[0], argv[1:])
        else:
            code = _run_main(argv)
    except UserError as err:
        _flush_quietly()
        print(f"llamachat: {err}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        _flush_quietly()
        print(file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): not an error worth a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 141
    if __name__ == "__main__":
        sys.exit(code)
    return code


def _flush_quietly():
    try:
        sys.stdout.flush()
    except Exception:
        pass


def place_numba_cache(environ=None) -> str | None:
    """Put numba's on-disk cache under llamachat's cache folder (`cache/numba`) when
    LLAMACHAT_HOME or LLAMACHAT_CACHE_DIR is set, so everything llamachat writes lives there;
    a user's own NUMBA_CACHE_DIR wins. Must run before numba is imported (numba reads the
    variable once). Returns the folder chosen, or None."""
    environ = os.environ if environ is None else environ
    if environ.get("NUMBA_CACHE_DIR") or not (environ.get("LLAMACHAT_HOME") or environ.get("LLAMACHAT_CACHE_DIR")):
        return None
    from llamachat.model_store.paths import cache_dir

    folder = str(cache_dir() / "numba")
    environ["NUMBA_CACHE_DIR"] = folder
    # importing llamachat.runtime (for UserError, above) checked the sources' stamp in the old
    # place; check it where numba will now read its cache from
    from llamachat.runtime import numba_cache

    numba_cache.drop_stale_engine_caches()
    return folder


def entry_point():  # pragma: no cover - console script wrapper
    from llamachat.runtime.thread_env import apply_thread_env

    apply_thread_env()  # before numpy loads (OpenBLAS reads its setting then)
    place_numba_cache()
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
