"""Generation settings: their names, llama.cpp's defaults and the valid range of each.

One table serves everyone who reads or checks a setting: the command-line flags, the model
library's per-model defaults (`models set NAME temp=0.7`), the app's sidebar and the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: object
    low: float | None = None  # inclusive bounds, None = unbounded
    high: float | None = None
    help: str = ""

    def check(self, value):
        """Return `value` converted to this setting's type, or raise ValueError(sentence)."""
        if self.type is str:
            if not isinstance(value, str):
                raise ValueError(f"{self.name} must be text, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{self.name} must be a number, got {value!r}")
        try:
            number = self.type(value)  # int('3') and float('0.5') parse text too
        except (TypeError, ValueError):
            raise ValueError(f"{self.name} must be {'an integer' if self.type is int else 'a number'}, got {value!r}") from None
        if self.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{self.name} must be an integer, got {value!r}")
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise ValueError(f"{self.name} must be {self._range()}, got {value!r}")
        return number

    def _range(self) -> str:
        def show(bound):  # integer settings print whole bounds (1048576, not 1.04858e+06)
            return str(int(bound)) if self.type is int else f"{bound:g}"

        if self.low is not None and self.high is not None:
            return f"between {show(self.low)} and {show(self.high)}"
        if self.low is not None:
            return f"at least {show(self.low)}"
        return f"at most {show(self.high)}"


# name, type, llama.cpp default, low, high
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("temp", float, 0.8, 0.0, None, "temperature; 0 = greedy"),
        Setting("top_k", int, 40, 0, None, "keep the k most likely tokens; 0 = off"),
        Setting("top_p", float, 0.95, 0.0, 1.0, "nucleus sampling; 1 = off"),
        Setting("min_p", float, 0.05, 0.0, 1.0, "drop tokens below min_p x the top probability; 0 = off"),
        Setting("typical_p", float, 1.0, 0.0, 1.0, "locally typical sampling; 1 = off"),
        Setting("repeat_penalty", float, 1.0, 0.0, None, "penalise recent tokens; 1 = off"),
        Setting("repeat_last_n", int, 64, -1, None, "how many recent tokens the penalties see; -1 = the context"),
        Setting("presence_penalty", float, 0.0, None, None, "0 = off"),
        Setting("frequency_penalty", float, 0.0, None, None, "0 = off"),
        Setting("mirostat", int, 0, 0, 2, "0 = off, 1 = mirostat, 2 = mirostat 2.0"),
        Setting("mirostat_tau", float, 5.0, 0.0, None, "mirostat target entropy"),
        Setting("mirostat_eta", float, 0.1, 0.0, None, "mirostat learning rate"),
        Setting("seed", int, -1, -1, 2**32 - 1, "-1 = random"),
        Setting("n_predict", int, -1, -1, None, "tokens to generate; -1 = until end of text or the context is full"),
        Setting("n_ctx", int, 2048, 1, 1 << 20, "context size in tokens"),
        Setting("threads", int, 0, 0, 1024, "CPU threads; 0 = all cores"),
        Setting("system_prompt", str, "", None, None, "system message for chats"),
        Setting("chat_format", str, "", None, None, "chat template override (a built-in name); empty = the model's own"),
    )
}

SAMPLING_KEYS = (
    "temp", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
    "presence_penalty", "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta", "seed",
)


def check_setting(name: str, value):
    """Validate one setting by name; raises ValueError with a sentence naming it."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
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
