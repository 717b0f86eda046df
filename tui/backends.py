"""The one seam between the front ends (the app, headless chat, one-shot) and whatever makes the
text: parameters in, typed events out, cancel from any thread.

- in: a `GenerationRequest` (chat messages or a raw prompt, runtime.params.SamplingParams, the
  reply cap, stop strings);
- out: `Backend.stream(request)` yields `TextPiece`s and ends with one `Finished` carrying
  `ReplyStats` (tokens, timings and so tokens/s, the context used, why it stopped and which stop
  string did it);
- `cancel()` from any thread ends the running stream within a token (a remote stream: the
  connection is closed); the text made so far stays.

`LocalBackend` runs the engine's own Generator on a loaded `runtime.Llama` (its tokenizer, chat
template and KV cache), without the llama-cpp-python shaped dicts; `LlamaApiBackend` adapts any
other object with Llama's call API (llama-cpp-python's `Llama`, the tests' stand-in). A remote
backend (an OpenAI-compatible server) stands behind the same protocol. `Llama` itself stays the
adapter for other programs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence, Union

from llamachat.runtime.errors import UserError
from llamachat.runtime.params import SamplingParams

# SamplingParams field -> llama-cpp-python's keyword (the Llama API, OpenAI-style servers)
CALL_KEYWORDS = {
    "temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "mirostat": "mirostat_mode", "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
}


@dataclass(frozen=True)
class GenerationRequest:
    """One reply to make. Exactly one of `messages` (a chat, the backend applies its template)
    and `prompt` (raw text: special tokens in it parsed, BOS as the vocabulary says)."""

    messages: tuple[dict, ...] | None = None
    prompt: str | None = None
    params: SamplingParams = SamplingParams()
    n_predict: int = -1  # < 0: until the model ends it or the context is full
    stop: tuple[str, ...] = ()
    # True: params.seed is ignored and the backend's random stream goes on from the last reply
    # (llama.cpp seeds once); False: params.seed starts the stream afresh
    continue_stream: bool = True
    # when the context fills during the reply: True shifts it (drops the older half of the
    # tokens) and goes on, False stops; None: what the model was loaded with (--context-shift)
    context_shift: bool | None = None

    def __post_init__(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a GenerationRequest needs messages or a prompt, not both")


@dataclass(frozen=True)
class TextPiece:
    text: str


@dataclass
class ReplyStats:
    stop_reason: str = ""  # "eos" | "stop" | "length" | "context_full" | "cancelled"
    stop_text: str | None = None  # the stop string that ended it (stop_reason "stop"), if known
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    eval_ms: float = 0.0
    n_past: int | None = None  # tokens in the context after the reply (None: not reported)
    n_ctx: int | None = None
    context_shifts: int = 0
    seed: int | None = None
    detail: object = None  # the backend's own record (local: runtime.generation.generate.GenerationStats)

    @property
    def tokens_per_second(self) -> float | None:
        if self.completion_tokens and self.eval_ms:
            return self.completion_tokens * 1000.0 / self.eval_ms
        return None

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "detail"}
        return d


@dataclass(frozen=True)
class Finished:
    stats: ReplyStats = field(default_factory=ReplyStats)


Event = Union[TextPiece, Finished]


class Backend(Protocol):
    """What a front end needs of a model. `stream` blocks between events: call it from a worker
    thread; it raises UserError (one sentence) for a request it cannot serve at all."""

    def stream(self, request: GenerationRequest) -> Iterator[Event]: ...

    def cancel(self) -> None: ...

    def n_ctx(self) -> int: ...  # 0 when unknown

    def n_tokens(self) -> int: ...  # the context in use now

    def count_tokens(self, messages: Sequence[dict] | None, prompt: str | None) -> int | None: ...

    def metadata(self) -> dict: ...

    def take_notice(self) -> str | None: ...  # a one-time notice for the user (a template fallback)

    def close(self) -> None: ...


def params_from_call(sampling: dict, logit_bias: dict | None = None) -> SamplingParams:
    """SamplingParams from Llama-call keywords (conversation.call_kwargs), each value checked."""
    values = {name: sampling[kw] for name, kw in CALL_KEYWORDS.items() if sampling.get(kw) is not None}
    if values.get("temp") is not None and values["temp"] < 0:
        values["temp"] = 0.0  # llama.cpp: a negative temperature is greedy too
    if sampling.get("seed") is not None:
        values["seed"] = sampling["seed"]
    try:
        params = SamplingParams().updated(**values)
    except ValueError as err:
        raise UserError(str(err)) from None
    bias = tuple((int(t), float(b)) for t, b in (logit_bias or {}).items())
    return params.updated(logit_bias=bias, ignore_eos=bool(sampling.get("ignore_eos")))


def call_from_params(params: SamplingParams) -> dict:
    """The inverse: Llama-call keywords for these parameters."""
    kwargs = {kw: getattr(params, name) for name, kw in CALL_KEYWORDS.items()}
    if params.logit_bias:
        kwargs["logit_bias"] = dict(params.logit_bias)
    if params.ignore_eos:
        kwargs["ignore_eos"] = True
    return kwargs


class LocalBackend:
    """The engine in this process: a loaded `runtime.Llama`, driven through its Generator."""

    def __init__(self, llm):
        self.llm = llm
        self._lock = threading.Lock()  # one generation at a time: the KV cache is shared

    @staticmethod
    def fits(llm) -> bool:
        """True if `llm` is the engine's own Llama (has the typed parts this backend drives)."""
        gen = getattr(llm, "generator", None)
        # the template is looked for on the class: reading the property would build it
        return callable(getattr(gen, "generate", None)) and hasattr(llm, "tokenizer") and hasattr(type(llm), "chat_template")

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        llm = self.llm
        if request.messages is not None:
            return llm.chat_template.encode(list(request.messages), llm.tokenizer, add_generation_prompt=True)
        tok = llm.tokenizer
        tokens = tok.encode(request.prompt, add_special=True, parse_special=True) if request.prompt else []
        if not tokens and tok.bos_id is not None:
            tokens = [tok.bos_id]  # an empty prompt is just the BOS token, as llama-cpp-python does
        return tokens

    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        llm = self.llm
        params = request.params
        if request.continue_stream:
            params = params.updated(seed=llm.seed)
        with self._lock:
            tokens = self.prompt_tokens(request)
            gen = llm.generator.generate(tokens, params, n_predict=request.n_predict, stop=list(request.stop),
                                         context_shift=_context_shift(llm, request),
                                         n_keep=int(getattr(llm, "n_keep", 0)),
                                         continue_stream=request.continue_stream)
            try:
                for piece in gen:
                    yield TextPiece(piece)
            finally:
                gen.close()
            s = llm.generator.last_stats
            yield Finished(ReplyStats(
                stop_reason=s.stop_reason, stop_text=getattr(s, "stop_text", None), prompt_tokens=s.prompt_tokens,
                completion_tokens=s.completion_tokens, prompt_ms=s.prompt_ms, eval_ms=s.eval_ms, n_past=s.n_past,
                n_ctx=s.n_ctx, context_shifts=s.context_shifts, seed=s.seed, detail=s))

    def cancel(self) -> None:
        self.llm.generator.cancel()

    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    def n_tokens(self) -> int:
        return int(self.llm.n_tokens)

    def count_tokens(self, messages, prompt) -> int | None:
        llm = self.llm
        if messages is not None:
            if not messages:
                return 0
            # as prompt_tokens sends it: with the header that opens the reply, which fills the
            # context too (without it, a chat fitted to leave n_predict free ran out early)
            return len(llm.chat_template.encode(list(messages), llm.tokenizer, add_generation_prompt=True))
        return len(llm.tokenize(prompt)) if prompt else 0

    def metadata(self) -> dict:
        return dict(self.llm.metadata or {})

    def take_notice(self) -> str | None:
        template = getattr(self.llm, "_chat_template", None)  # only once it was built: no work here
        return template.take_notice() if template is not None else None

    def close(self) -> None:
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()


class LlamaApiBackend(LocalBackend):
    """Any object with llama-cpp-python's call API (create_chat_completion / __call__ streaming
    OpenAI-shaped chunk dicts, last_stats): llama-cpp-python's own Llama, or a test stand-in."""

    def stream(self, request: GenerationRequest) -> Iterator[Event]:
        llm = self.llm
        kwargs = call_from_params(request.params)
        kwargs["stream"] = True
        kwargs["max_tokens"] = request.n_predict if request.n_predict > 0 else None
        if request.stop:
            kwargs["stop"] = list(request.stop)
        if not request.continue_stream:
            kwargs["seed"] = request.params.seed
        pieces: list[str] = []
        finish = None
        with self._lock:
            if request.context_shift is not None and hasattr(llm, "context_shift"):
                llm.context_shift = request.context_shift  # the Llama API reads it at each call
            if request.messages is not None:
                chunks = llm.create_chat_completion(list(request.messages), **kwargs)
            else:
                chunks = llm(request.prompt, **kwargs)
            try:
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                    if text:
                        pieces.append(text)
                        yield TextPiece(text)
                    finish = choice.get("finish_reason") or finish
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            raw = dict(getattr(llm, "last_stats", None) or {})
        reason = raw.get("stop_reason") or {"stop": "stop", "length": "length"}.get(finish or "", finish or "")
        stop_text = None
        if reason == "stop" and request.stop:
            stop_text = _matched_stop(llm, list(request.stop), "".join(pieces))
        yield Finished(ReplyStats(
            stop_reason=reason, stop_text=stop_text, prompt_tokens=raw.get("prompt_tokens", 0),
            completion_tokens=raw.get("completion_tokens", 0), prompt_ms=raw.get("prompt_ms", 0.0),
            eval_ms=raw.get("eval_ms", 0.0), n_past=raw.get("n_past"), n_ctx=raw.get("n_ctx"),
            context_shifts=raw.get("context_shifts", 0), seed=raw.get("seed"), detail=raw))

    def cancel(self) -> None:
        self.llm.cancel()

    def take_notice(self) -> str | None:
        return None


def _context_shift(llm, request: GenerationRequest) -> bool:
    if request.context_shift is not None:
        return request.context_shift
    return bool(getattr(llm, "context_shift", False))


def _matched_stop(llm, stops: list[str], text: str) -> str | None:
    """Which stop string ended a generation whose API hides it (the text stops before it): read
    from the generated tokens when the object exposes them; None if it does not."""
    if len(stops) == 1:
        return stops[0]
    try:
        tokens = list(llm.generator.last_stats.tokens)
        full = llm.detokenize(tokens).decode("utf-8", "replace")
    except Exception:
        return None
    found = [(full.find(s, max(0, len(text) - len(s))), s) for s in stops]
    found = [(at, s) for at, s in found if at >= 0]
    return min(found)[1] if found else None


def backend_for(llm) -> Backend:
    """The backend that drives this loaded object: the engine's typed path when it is ours."""
    return LocalBackend(llm) if LocalBackend.fits(llm) else LlamaApiBackend(llm)


def run_to_end(backend: Backend, request: GenerationRequest, on_text) -> ReplyStats:
    """Stream `request`, handing each piece to `on_text`; the final stats."""
    stats = ReplyStats()
    for event in backend.stream(request):
        if isinstance(event, TextPiece):
            on_text(event.text)
        else:
            stats = event.stats
    return stats


__all__ = ["Backend", "LocalBackend", "LlamaApiBackend", "GenerationRequest", "TextPiece", "Finished",
           "ReplyStats", "backend_for", "params_from_call", "call_from_params", "run_to_end"]
