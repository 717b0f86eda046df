"""Generation settings: their names, llama.cpp's defaults and the valid range of each.

One table serves everyone who reads or checks a setting: the command-line flags, the model
library's per-model defaults (`models set NAME temp=0.7`), the app's sidebar, the server's
JSON and the sampler. `check_setting` is the one rule for a number typed by a user: it must
parse as the setting's type, be finite (NaN and infinities are refused everywhere, so
`temp = nan` can never reach the sampler or models.toml) and lie in the setting's range; a
setting with a fixed set of names (chat_format) must be one of them.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields, replace
from typing import Callable

from .errors import shown as _shown

# Text longer than this is not a value anyone meant to type: echoed shortened, never parsed.
MAX_TEXT = 10_000


def suggestion(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, else ''."""
    if not isinstance(word, str) or len(word) > 200:
        return ""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _builtin_chat_formats() -> tuple[str, ...]:
    from .tokenizer.chat_template import BUILTIN_FORMATS  # jinja2 is loaded only when a format is named

    return BUILTIN_FORMATS


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: object
    low: float | None = None  # inclusive bounds, None = unbounded
    high: float | None = None
    help: str = ""
    choices: Callable[[], tuple[str, ...]] | None = None  # text settings with a fixed set of names
    empty: str | None = None  # what an empty value means for a setting with choices (None: not allowed)

    def check(self, value):
        """Return `value` converted to this setting's type, or raise ValueError(sentence)."""
        if self.type is str:
            if not isinstance(value, str):
                raise ValueError(f"{self.name} must be text, got {_shown(value)}")
            if self.choices is not None and (value or self.empty is None):
                names = self.choices()
                if value not in names:
                    empty = f" (or empty for {self.empty})" if self.empty is not None else ""
                    raise ValueError(f"{self.name} must be one of {', '.join(names)}{empty}, "
                                     f"got {_shown(value)}{suggestion(value, names)}")
            return value
        kind = "an integer" if self.type is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{self.name} must be a number, got {_shown(value)}")
        if isinstance(value, str):
            if len(value) > MAX_TEXT:
                raise ValueError(f"{self.name} must be {kind}, got {_shown(value)}")
            value = value.strip()
        if isinstance(value, float) and self.type is int:
            if not math.isfinite(value) or not value.is_integer():
                raise ValueError(f"{self.name} must be {kind}, got {_shown(value)}")
            number = int(value)
        else:
            try:
                # int('3') and float('0.5') parse text too; float('nan') and float('1e999') as well,
                # which the finiteness test below refuses
                number = self.type(value)
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"{self.name} must be {kind}, got {_shown(value)}") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"{self.name} must be a finite number ({self._range()}), got {_shown(value)}")
        if self.high is not None and number > self.high and self.high >= INT32_MAX:
            raise ValueError(f"{self.name} must be at most {self.high}, got {_shown(value)}")
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise ValueError(f"{self.name} must be {self._range()}, got {_shown(value)}")
        return number

    def _range(self) -> str:
        def show(bound):  # integer settings print whole bounds (1048576, not 1.04858e+06)
            return str(int(bound)) if self.type is int else f"{bound:g}"

        if self.low is not None and self.high is not None and self.high < INT32_MAX:  # not just "fits a C int"
            return f"between {show(self.low)} and {show(self.high)}"
        if self.low is not None:
            return f"at least {show(self.low)}"
        if self.high is not None:
            return f"at most {show(self.high)}"
        return "any finite value"


# What the app does when a chat no longer fits in the context: leave its oldest turns out of the
# request (the system prompt kept), stop and ask the user, or let the engine shift the context
# (drop the older half of the tokens) as llama.cpp's --context-shift does.
CONTEXT_POLICIES = ("drop-oldest", "ask", "shift")

# llama.cpp keeps these counts in a C int
INT32_MAX = 2**31 - 1
# The sampler works in float32: a penalty times a token count (at most the context, 2**20)
# or times a logit must stay far from float32's 3.4e38, or a logit turns infinite and the
# probabilities NaN. No useful setting comes near this bound.
PENALTY_MAX = 1e6

# name, type, llama.cpp default, low, high
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("temp", float, 0.8, 0.0, None, "temperature; 0 = greedy"),
        Setting("top_k", int, 40, 0, INT32_MAX, "keep the k most likely tokens; 0 = off"),
        Setting("top_p", float, 0.95, 0.0, 1.0, "nucleus sampling; 1 = off"),
        Setting("min_p", float, 0.05, 0.0, 1.0, "drop tokens below min_p x the top probability; 0 = off"),
        Setting("typical_p", float, 1.0, 0.0, 1.0, "locally typical sampling; 1 = off"),
        Setting("repeat_penalty", float, 1.0, 0.0, PENALTY_MAX, "penalise recent tokens; 1 = off"),
        Setting("repeat_last_n", int, 64, -1, INT32_MAX, "how many recent tokens the penalties see; -1 = the context"),
        Setting("presence_penalty", float, 0.0, -PENALTY_MAX, PENALTY_MAX, "0 = off"),
        Setting("frequency_penalty", float, 0.0, -PENALTY_MAX, PENALTY_MAX, "0 = off"),
        Setting("mirostat", int, 0, 0, 2, "0 = off, 1 = mirostat, 2 = mirostat 2.0"),
        Setting("mirostat_tau", float, 5.0, 0.0, None, "mirostat target entropy"),
        Setting("mirostat_eta", float, 0.1, 0.0, None, "mirostat learning rate"),
        Setting("seed", int, -1, -1, 2**32 - 1, "-1 = random"),
        Setting("n_predict", int, -1, -1, INT32_MAX, "tokens to generate; -1 = until end of text or the context is full"),
        Setting("n_ctx", int, 2048, 1, 1 << 20, "context size in tokens"),
        Setting("threads", int, 0, 0, 1024, "CPU threads; 0 = all cores"),
        Setting("system_prompt", str, "", None, None, "system message for chats"),
        Setting("chat_format", str, "", None, None, "chat template override (a built-in name); empty = the model's own",
                choices=_builtin_chat_formats, empty="the model's own template"),
        Setting("context_policy", str, "drop-oldest", None, None,
                "when a chat outgrows n_ctx: drop-oldest turns, ask, or shift (the engine's context shift)",
                choices=lambda: CONTEXT_POLICIES),
    )
}

def check_setting(name: str, value):
    """Validate one setting by name; raises ValueError with a sentence naming it."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {_shown(name)}{suggestion(name, SETTINGS)}; known: {', '.join(SETTINGS)}")
    return SETTINGS[name].check(value)


@dataclass(frozen=True)
class SamplingParams:
    """What the sampler needs for one reply. Defaults are llama.cpp's."""

    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int = -1
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False

    def updated(self, **changes) -> "SamplingParams":
        """A copy with `changes` applied (None values ignored), each validated."""
        checked = {}
        for key, value in changes.items():
            if value is None:
                continue
            checked[key] = check_setting(key, value) if key in SETTINGS else value
        return replace(self, **checked)


assert all(f.name in SETTINGS or f.name in ("logit_bias", "ignore_eos") for f in fields(SamplingParams))
