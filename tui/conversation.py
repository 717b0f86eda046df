"""What a chat is, independent of any UI: the three llama.cpp modes, the settings a reply is
generated with, and the request each turn sends to the engine.

Shared by the Textual app and the headless chat (so this module never imports Textual):

- chat: the model's chat template (or the library's chat_format) with an optional system prompt;
- instruct (`--instruct`): llama.cpp's instruction mode: the prompt file is the preamble and each
  user message is sent as "### Instruction:\n\n{message}\n\n### Response:\n\n"; a reply ends at
  end-of-text or at the next "### Instruction:";
- interactive (`-i -r "User:" -f chat-with-bob.txt`): a raw transcript that the prompt file opens;
  generation stops at a reverse prompt and the user's line follows.

Settings are merged as: command-line flag > the model's library settings > llama.cpp's default
(runtime.params.SETTINGS), each validated with the same rules everywhere.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from llamachat.runtime.errors import UserError
from llamachat.runtime.params import SETTINGS, check_setting

CHAT, INSTRUCT, INTERACTIVE = "chat", "instruct", "interactive"

LOOP_NOTE = "it was repeating itself"  # a reply the engine stopped because it looped

INSTRUCT_TURN = "### Instruction:\n\n{message}\n\n### Response:\n\n"
INSTRUCT_STOP = "### Instruction:"

# The settings the app's sidebar shows, in order, with the label the user sees.
SIDEBAR_SETTINGS = (
    ("temp", "temperature"),
    ("top_k", "top_k"),
    ("top_p", "top_p"),
    ("min_p", "min_p"),
    ("repeat_penalty", "repeat penalty"),
    ("repeat_last_n", "repeat_last_n"),
    ("n_predict", "n_predict"),
    ("n_ctx", "n_ctx"),
    ("seed", "seed"),
)

# setting name -> keyword of Llama.__call__ / create_chat_completion
_CALL_KEYWORDS = {
    "temp": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "mirostat": "mirostat_mode",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}

# settings that need the model re-created (not just the next call) when they change
LOAD_SETTINGS = ("n_ctx", "threads", "chat_format")


def merged_settings(args=None, library_settings: dict | None = None) -> dict:
    """Every setting's value: flag > library setting > llama.cpp default. Bad values raise UserError."""
    values = {name: s.default for name, s in SETTINGS.items()}
    for name, value in (library_settings or {}).items():
        if name in SETTINGS and value is not None:
            try:
                values[name] = check_setting(name, value)
            except ValueError as err:
                raise UserError(f"model library: {err}") from None
    for name in SETTINGS:
        value = getattr(args, name, None) if args is not None else None
        if value is None:
            continue
        try:
            values[name] = check_setting(name, value)
        except ValueError as err:
            raise UserError(f"{err} (command-line flag)") from None
    if getattr(args, "context_shift", False) and getattr(args, "context_policy", None) is None:
        values["context_policy"] = "shift"  # llama.cpp's --context-shift
    return values


def parse_logit_bias(items) -> dict[int, float]:
    """llama.cpp's `-l TOKEN_ID(+/-)BIAS` (e.g. 15043+1, 15043-inf) -> {token: bias}."""
    bias: dict[int, float] = {}
    for item in items or ():
        m = re.fullmatch(r"\s*(\d+)\s*([+-])\s*(inf|[0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*", item)
        if not m:
            raise UserError(f"--logit-bias {item!r}: expected TOKEN_ID+BIAS or TOKEN_ID-BIAS, e.g. 15043+1 or 15043-inf")
        value = math.inf if m.group(3) == "inf" else float(m.group(3))
        bias[int(m.group(1))] = value if m.group(2) == "+" else -value
    return bias


def call_kwargs(settings: dict, args=None) -> dict:
    """The sampling keywords of one Llama call for these settings (seed handled by the caller)."""
    kwargs = {kw: settings[name] for name, kw in _CALL_KEYWORDS.items()}
    if getattr(args, "ignore_eos", False):
        kwargs["ignore_eos"] = True
    n_predict = settings["n_predict"]
    kwargs["max_tokens"] = n_predict if n_predict > 0 else None
    return kwargs


def load_kwargs(settings: dict, args=None) -> dict:
    """Keywords for constructing the Llama (the context) from these settings."""
    threads = settings.get("threads") or 0
    return dict(
        n_ctx=settings["n_ctx"],
        n_threads=threads if threads > 0 else None,
        seed=settings["seed"],
        chat_format=settings.get("chat_format") or None,
        # the app also says it per reply, from its policy
        context_shift=settings.get("context_policy") == "shift" or bool(getattr(args, "context_shift", False)),
        n_keep=int(getattr(args, "n_keep", 0) or 0),
    )


def read_prompt_file(name_or_path: str) -> tuple[str, str]:
    """(text, display name) of a prompt file given by path or shipped name; UserError if absent."""
    from llamachat.prompts import find_prompt_file, shipped_prompt_names

    path = find_prompt_file(name_or_path)
    if path is None:
        raise UserError(
            f"prompt file {name_or_path!r} not found: give a path or one of the shipped prompts "
            f"({', '.join(shipped_prompt_names())})"
        )
    from llamachat.runtime.tokenizer.tokenizer import MAX_PROMPT_BYTES, read_text_input

    try:
        text = read_text_input(path, "a prompt file", MAX_PROMPT_BYTES).decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: cannot read the prompt file ({err.__class__.__name__}: {err})") from None
    return text, Path(path).name


@dataclass
class Message:
    role: str  # "user" | "assistant"
    content: str  # for assistant replies in interactive mode: the raw text incl. the reverse prompt that ended it
    stopped: bool = False  # cancelled by the user before it finished
    note: str = ""  # why it ended, when worth telling (context full, length)


@dataclass
class Request:
    """One generation: a chat completion (messages) or a raw completion (prompt)."""

    messages: list[dict] | None = None
    prompt: str | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Conversation:
    mode: str = CHAT
    preamble: str = ""  # instruct / interactive: the prompt file's text
    preamble_name: str = ""
    reverse_prompts: list[str] = field(default_factory=list)
    system_prompt: str = ""
    messages: list[Message] = field(default_factory=list)
    name: str = ""  # a title the user gave the chat (empty: made from its first message)
    # chat mode: the first message the model still sees; the ones before it no longer fit in the
    # context and were dropped from the request (the system prompt always stays)
    memory_start: int = 0

    @classmethod
    def from_args(cls, args, system_prompt: str = "") -> "Conversation":
        """The conversation llama.cpp's flags describe (-i/--instruct, -f/-p, -r, --system)."""
        mode = INSTRUCT if getattr(args, "instruct", False) else INTERACTIVE if getattr(args, "interactive", False) else CHAT
        preamble, name = "", ""
        if mode != CHAT:
            if getattr(args, "file", None):
                preamble, name = read_prompt_file(args.file)
                if preamble.endswith("\n"):  # llama.cpp drops the file's final newline (common/arg.cpp, -f)
                    preamble = preamble[:-1]
            elif getattr(args, "prompt", None):
                preamble, name = args.prompt, "-p"
        reverse = [r for r in (getattr(args, "reverse_prompt", None) or []) if r]
        return cls(mode=mode, preamble=preamble, preamble_name=name, reverse_prompts=reverse, system_prompt=system_prompt)

    # -- what the engine is asked ---------------------------------------------------------

    def stop_strings(self) -> list[str]:
        stops = list(self.reverse_prompts)
        if self.mode == INSTRUCT and INSTRUCT_STOP not in stops:
            stops.insert(0, INSTRUCT_STOP)
        return stops

    def transcript(self) -> str:
        """The raw text of an instruct or interactive conversation so far (what the model sees)."""
        if self.mode == INSTRUCT:
            text = self.preamble.rstrip("\n") if self.preamble.strip() else ""
            for msg in self.messages:
                if msg.role == "user":
                    text += ("\n\n" if text else "") + INSTRUCT_TURN.format(message=msg.content)
                else:
                    text += msg.content.strip()
            return text
        text = self.preamble
        for msg in self.messages:
            if msg.role == "user":
                text += interactive_user_line(text, msg.content)
            else:
                text += msg.content
        return text

    def request(self) -> Request:
        """The generation that produces the next assistant reply."""
        if self.mode == CHAT:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
            start = min(self.memory_start, max(0, len(self.messages) - 1))  # never past the newest message
            messages += [{"role": m.role, "content": m.content} for m in self.messages[start:]]
            return Request(messages=messages, stop=list(self.reverse_prompts))
        return Request(prompt=self.transcript(), stop=self.stop_strings())

    def forget_oldest_turn(self) -> bool:
        """Chat mode: move the start of the model's memory past the oldest turn it still sees
        (to the next user message), keeping at least the newest user message; False if there
        is nothing left to drop."""
        if self.mode != CHAT:
            return False
        users = [i for i, m in enumerate(self.messages) if m.role == "user" and i > self.memory_start]
        if not users:
            return False
        self.memory_start = users[0]
        return True

    def user_speaks_first(self) -> bool:
        """Interactive mode: the model writes first unless the transcript already hands over to
        the user (it ends with a reverse prompt) or there is nothing to continue."""
        if self.mode != INTERACTIVE or self.messages:
            return True
        if not self.preamble.strip():
            return True
        tail = self.preamble.rstrip()
        return any(tail.endswith(r.rstrip()) for r in self.reverse_prompts if r.strip())

    def reply_message(self, text: str, stop_reason: str | None, cancelled: bool = False,
                      stop_text: str | None = None) -> Message:
        """The assistant message for a finished (or stopped) generation. In interactive mode the
        reverse prompt that handed over to the user is part of the transcript, as in llama.cpp,
        which also injects the first reverse prompt when the model ends its text."""
        content = text
        if self.mode == INTERACTIVE and not cancelled and self.reverse_prompts and stop_reason in ("stop", "eos"):
            content = text + (stop_text if stop_text in self.reverse_prompts else self.reverse_prompts[0])
        note = ""
        if stop_reason == "context_full":
            note = "context full"
        elif stop_reason == "length":
            note = "n_predict reached"
        elif stop_reason == "loop":
            return Message("assistant", content, stopped=True, note=LOOP_NOTE)
        return Message("assistant", content, stopped=cancelled, note=note)

    def display_text(self, msg: Message) -> str:
        """What the chat pane shows for a message (interactive replies without the trailing reverse prompt)."""
        text = msg.content
        if msg.role == "assistant" and self.mode == INTERACTIVE:
            stripped = text.rstrip()
            for r in self.reverse_prompts:
                if r.strip() and stripped.endswith(r.strip()):
                    stripped = stripped[: -len(r.strip())]
                    break
            text = stripped
        return text.strip()

    def title(self) -> str:
        if self.name.strip():
            return self.name.strip()
        for msg in self.messages:
            if msg.role == "user" and msg.content.strip():
                line = msg.content.strip().splitlines()[0]
                return line[:60] + ("…" if len(line) > 60 else "")
        return "New chat"

    def to_markdown(self, model_name: str = "") -> str:
        lines = [f"# {self.title()}", ""]
        meta = [f"mode: {self.mode}"]
        if model_name:
            meta.append(f"model: {model_name}")
        if self.preamble_name:
            meta.append(f"prompt file: {self.preamble_name}")
        lines += ["*" + ", ".join(meta) + "*", ""]
        if self.mode == CHAT and self.system_prompt.strip():
            lines += ["**System:**", "", self.system_prompt.strip(), ""]
        if self.mode != CHAT and self.preamble.strip():
            lines += ["**Prompt:**", "", "```text", self.preamble.rstrip(), "```", ""]
        for msg in self.messages:
            who = "You" if msg.role == "user" else "Assistant"
            mark = " *(stopped)*" if msg.stopped else ""
            lines += [f"**{who}:**{mark}", "", self.display_text(msg), ""]
        return "\n".join(lines).rstrip() + "\n"


def reply_room(n_ctx: int, policy: str, n_predict: int | None) -> int:
    """Tokens left free for the reply when a request is fitted: n_predict, or an eighth of the
    context; with shift one token (the engine makes room as the reply grows)."""
    if policy == "shift":
        return 1
    n_predict = n_predict or -1
    return n_predict if 0 < n_predict < n_ctx // 2 else n_ctx // 8


def context_overflow(conv: Conversation, count_tokens, n_ctx: int, policy: str, n_predict: int | None) -> int | None:
    """The tokens the next request needs with room for the reply, if that is more than the
    context holds; None if it fits (or cannot be counted). `count_tokens(request)`: the
    engine's count of what a request fills the context with."""
    used = count_tokens(conv.request())
    room = reply_room(n_ctx, policy, n_predict)
    if used is None or not n_ctx or used + room <= n_ctx:
        return None
    return used + room


def fit_context(conv: Conversation, count_tokens, n_ctx: int, policy: str, n_predict: int | None) -> bool:
    """Leave the oldest turns out of the request until it fits in n_ctx with room for the
    reply; the system prompt stays. Acts for drop-oldest, and for shift when the chat alone
    outgrows the context ("ask" asks first: its caller decides). The app and headless chat
    share it, so both cut at the same turn. True if the model's memory now starts later."""
    if policy not in ("drop-oldest", "shift"):
        return False
    moved = False
    while context_overflow(conv, count_tokens, n_ctx, policy, n_predict) is not None and conv.forget_oldest_turn():
        moved = True
    return moved


def interactive_user_line(transcript: str, line: str) -> str:
    """The user's line as llama.cpp appends it: the text and a newline. A space separates it from
    a reverse prompt such as "User:" (llama.cpp users pass --in-prefix ' ' for that)."""
    sep = " " if transcript and not transcript[-1].isspace() and line and not line[0].isspace() else ""
    return sep + line + "\n"


def resolve_model(name_or_path: str | None):
    """The library entry for -m (a name, a .gguf path, or None for the default); UserError otherwise.
    A missing file is refused here with its path, before anything starts."""
    from llamachat.model_store.library import Library

    entry = Library.load().resolve(name_or_path)
    if getattr(entry, "remote", False):
        return entry  # a model on a server: no file here
    if getattr(entry, "missing", False) or not Path(entry.path).is_file():
        raise UserError(f"{entry.path}: model file not found (library model {entry.name!r}); fix it with `llamachat models` or pull it again")
    return entry
