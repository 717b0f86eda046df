"""Chat without the full-screen app (`--no-tui`, or stdin/stdout not a terminal).

Each stdin line is a user turn and EOF ends the chat; replies stream to stdout as they are
generated. All three modes of the app work here (see conversation.py): chat (the model's chat
template), `--instruct` (Alpaca turns after the prompt file) and `-i` (a raw transcript the
prompt file opens, handing over to the user at the reverse prompt). As in llama.cpp, the prompt
file is shown first, "> " marks the user's turn in chat and instruct modes, and `--color` shows
the prompt in yellow and the user's text in bold green. When stdin is piped the user's lines
are echoed so the screen reads as the whole transcript.

When stdout is not a terminal (a script reads it), it carries the replies only: the "> "
prompts and the echoed user lines go to stderr if that is a terminal, and nowhere otherwise.

When a chat outgrows the context it follows the setting context_policy as the app does:
drop-oldest leaves the oldest turns out (the system prompt stays) and says so on stderr; shift
lets the engine shift a full context; ask asks on the terminal (drop the oldest turns, start
over with the message, or do not send it), and with piped input, where nobody can answer, ends
the chat with a sentence saying which flag to give.

Ctrl-C during a reply stops that reply (it keeps what was generated); Ctrl-C while waiting for
input ends the chat. Never imports Textual.
"""

from __future__ import annotations

import sys
import threading

from llamachat.runtime.errors import UserError

from .conversation import (
    CHAT,
    INTERACTIVE,
    Conversation,
    Message,
    call_kwargs,
    context_overflow,
    fit_context,
    interactive_user_line,
    load_kwargs,
    merged_settings,
    parse_logit_bias,
    resolve_model,
)
from .engine_worker import Engine, GenerationResult

# The longest stdin line taken as one turn, in characters: far more than any context holds (the
# largest is 2**20 tokens, about 4 characters each, so this is a quarter of it), and a bound on
# the memory a never-ending line (`cat /dev/zero |`) takes before it is refused.
MAX_LINE_CHARS = 1 << 20

# llama.cpp's console colours (common/console.cpp)
PROMPT_COLOR = "\x1b[33m"
USER_COLOR = "\x1b[1m\x1b[32m"
RESET = "\x1b[0m"


class _Output:
    def __init__(self, stream, color: bool):
        self.stream = stream
        self.color = color

    def write(self, text: str, color: str | None = None) -> None:
        if not text:
            return
        if self.color and color:
            text = color + text + RESET
        self.stream.write(text)
        self.stream.flush()


class _TrimmedReply:
    """Streams a chat or instruct reply but holds back trailing whitespace, so a reply that
    ends in blank lines does not push the next "> " down the screen."""

    def __init__(self, out: _Output):
        self.out = out
        self.pending = ""

    def __call__(self, text: str) -> None:
        text = self.pending + text
        shown = text.rstrip()
        self.pending = text[len(shown):]
        self.out.write(shown)


def _generate(engine: Engine, conv: Conversation, sampling: dict, bias: dict, out: _Output) -> GenerationResult:
    """Run one reply in a thread so Ctrl-C in the main thread can cancel it cleanly."""
    box: dict = {}
    done = threading.Event()
    # an interactive transcript is shown exactly as the model sees it
    write = (lambda text: out.write(text)) if conv.mode == INTERACTIVE else _TrimmedReply(out)

    def work():
        try:
            box["result"] = engine.generate(conv.request(), sampling, write, bias)
        finally:
            done.set()

    # Wait on an Event, not Thread.join: a Ctrl-C that interrupts join() can make later joins
    # return while the thread still runs (CPython before 3.13).
    threading.Thread(target=work, name="llamachat-generate", daemon=True).start()
    while True:
        try:
            while not done.wait(0.1):
                pass
            break
        except KeyboardInterrupt:
            engine.cancel()  # the reply stops within a token and keeps its text; wait for that
    return box.get("result") or GenerationResult(error="the generation did not finish")


def _report(result: GenerationResult, verbose: bool) -> None:
    if result.error:
        print(f"\nllamachat: {result.error}", file=sys.stderr, flush=True)
    elif result.stop_reason == "loop":
        print("\nllamachat: the reply was stopped because it was repeating itself", file=sys.stderr, flush=True)
    elif result.stop_reason == "context_full":
        print(f"\nllamachat: the context is full ({result.n_ctx} tokens): the reply stopped; "
              "use a larger -c/--ctx-size or --context-shift", file=sys.stderr, flush=True)
    if verbose and result.stats:
        s = result.stats
        tps = result.tokens_per_second
        print(f"\nllamachat: prompt {s.get('prompt_tokens', 0)} tokens in {s.get('prompt_ms', 0):.0f} ms; "
              f"generated {s.get('completion_tokens', 0)} tokens in {s.get('eval_ms', 0):.0f} ms"
              f"{f' ({tps:.1f} tokens/s)' if tps else ''}; context {result.n_tokens}/{result.n_ctx}",
              file=sys.stderr, flush=True)


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def run(args, llama_factory=None, stdin=None, stdout=None, stderr=None) -> int:
    stdin = stdin or sys.stdin
    color = bool(getattr(args, "color", False))
    out = _Output(stdout or sys.stdout, color)
    # the conversation's own furniture ("> ", the user's lines echoed): beside the replies on a
    # terminal, out of the way of a script reading stdout
    side = stderr or sys.stderr
    prompts = out if _is_tty(out.stream) else (_Output(side, color) if _is_tty(side) else None)
    entry = resolve_model(getattr(args, "model", None))
    settings = merged_settings(args, entry.settings)
    conv = Conversation.from_args(args, system_prompt=settings["system_prompt"])
    bias = parse_logit_bias(getattr(args, "logit_bias", None))
    engine = Engine(llama_factory)
    from .compile_progress import StderrProgress

    with StderrProgress():  # a first run compiles the kernels here: say so on a terminal
        engine.load_entry(entry, **load_kwargs(settings, args))
    sampling = call_kwargs(settings, args)
    verbose = bool(getattr(args, "verbose", False))
    echo = not stdin.isatty() if hasattr(stdin, "isatty") else True

    policy = settings.get("context_policy") or "drop-oldest"
    ask_out = side if _is_tty(side) else None

    def fit() -> bool:
        """Before a chat reply: make the request fit the context by the policy. False if the
        message is not sent (the user cancelled it); UserError when nobody can be asked."""
        n_ctx, n_predict = engine.n_ctx(), settings.get("n_predict")
        chosen = policy
        if policy == "ask":
            need = context_overflow(conv, engine.count_tokens, n_ctx, "ask", n_predict)
            if need is None:
                return True
            if echo or ask_out is None:
                raise UserError(f"the chat no longer fits in the context ({need} tokens needed with room for the "
                                f"reply, {n_ctx} held) and its context_policy is ask, which needs a terminal to ask: "
                                "give --context-policy drop-oldest (or shift), or a larger -c/--ctx-size")
            choice = ""
            while choice not in ("d", "n", "c"):
                ask_out.write(f"\nllamachat: the chat no longer fits in the context ({need} of {n_ctx} tokens). "
                              "[d]rop the oldest turns, start a [n]ew chat with this message, or [c]ancel it? ")
                answer = stdin.readline()
                choice = answer.strip().lower()[:1] if answer else "c"
            if choice == "c":
                conv.messages.pop()
                return False
            if choice == "n":
                conv.messages[:] = conv.messages[-1:]
                conv.memory_start = 0
                return True
            chosen = "drop-oldest"
        if fit_context(conv, engine.count_tokens, n_ctx, chosen, n_predict):
            first = conv.messages[conv.memory_start].content.strip().splitlines()[0]
            print(f"\nllamachat: the chat outgrew the context ({n_ctx} tokens): its {conv.memory_start} oldest "
                  f"messages are left out; the model's memory now begins at {first[:40]!r}", file=sys.stderr, flush=True)
        return True

    def reply() -> None:
        if conv.mode == CHAT and conv.messages and not fit():
            return
        result = _generate(engine, conv, sampling, bias, out)
        notice = engine.take_notice()  # the model's template refused: once, before anything else said
        if notice:
            print(f"\nllamachat: {notice}", file=sys.stderr, flush=True)
        if result.error:
            _report(result, verbose)
            if conv.messages and conv.messages[-1].role == "user":
                conv.messages.pop()  # the turn failed; the user can try again
            return
        msg = conv.reply_message(result.text, result.stop_reason, result.cancelled, result.stop_text)
        conv.messages.append(msg)
        if conv.mode == INTERACTIVE:
            out.write(msg.content[len(result.text):])  # the reverse prompt that hands over, as llama.cpp shows it
        else:
            out.write("\n")
        _report(result, verbose)

    try:
        if conv.mode != CHAT and conv.preamble:
            out.write(conv.preamble, PROMPT_COLOR)
            if conv.mode != INTERACTIVE and prompts is not out:
                out.write("\n")  # the "> " that would end its line is not on stdout
        if not conv.user_speaks_first():
            reply()
        marker = "\n> "
        while True:
            if conv.mode != INTERACTIVE and prompts is not None:
                prompts.write(marker)
            marker = "\n> "
            if out.color and not echo and prompts is out:
                out.stream.write(USER_COLOR)  # the terminal echoes what the user types in this colour
                out.stream.flush()
            try:
                line = stdin.readline(MAX_LINE_CHARS + 1)
                if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
                    raise UserError(f"a line of input is longer than {MAX_LINE_CHARS} characters, more than llamachat "
                                    "takes as one message; split it, or give a long text with -f FILE")
            except KeyboardInterrupt:
                line = ""
            finally:
                if out.color and not echo and prompts is out:
                    out.stream.write(RESET)
                    out.stream.flush()
            if not line:
                if prompts is not None and conv.mode != INTERACTIVE:
                    prompts.write("\n")
                elif conv.mode == INTERACTIVE:
                    out.write("\n")
                break
            line = line.rstrip("\r\n")
            if not line.strip():
                marker = "> " if not echo else ""  # a terminal shows the empty line; ask again
                continue
            if echo and conv.mode == INTERACTIVE:  # the user's line is part of the raw transcript
                out.write(interactive_user_line(conv.transcript(), line), USER_COLOR)
            elif echo and prompts is not None:
                prompts.write(line + "\n", USER_COLOR)
            conv.messages.append(Message("user", line))
            reply()
    except BrokenPipeError:
        engine.cancel()
        raise
    finally:
        engine.close()
    return 0


__all__ = ["run", "UserError"]
