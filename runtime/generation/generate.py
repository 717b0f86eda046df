"""The generation loop: prompt tokens in, streamed text out, as llama.cpp's `llama-cli` runs it.

Owns `Generator`, which sits on one loaded model and its KV cache:

- prompt: the cached prefix shared with the new prompt is kept (`m.truncate`), only the rest is
  evaluated, and at least one token always is, so there are logits to sample from;
- each step: sample (runtime.generation.sampling), stop at an end-of-generation token, emit the token's text
  through the tokenizer's stream decoder (never a broken UTF-8 sequence), evaluate it;
- stop strings are not emitted: text that could be the start of one is held back and released
  as soon as it cannot be; reverse prompts are emitted, then generation stops;
- a full context stops generation ("context_full"), or with context_shift keeps the first n_keep
  tokens, drops half of the rest and carries on (llama.cpp's `--context-shift`);
- `cancel()` from any thread ends the running generation within one token; what was made stays.

Statistics of the last run (`last_stats`) use the keys of the Llama API's `last_stats`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from ..errors import UserError
from ..model.model import EvalCancelled
from ..params import SamplingParams
from .sampling import Sampler

@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens in the prompt
    prompt_eval_tokens: int = 0  # of those, evaluated (the rest came from the KV cache)
    prompt_ms: float = 0.0
    completion_tokens: int = 0  # tokens generated (an end-of-generation token is not counted)
    eval_runs: int = 0  # single-token evaluations
    eval_ms: float = 0.0
    sample_ms: float = 0.0
    sample_runs: int = 0
    stop_reason: str = ""
    stop_text: str | None = None  # the stop string or reverse prompt that ended it
    n_past: int = 0
    n_ctx: int = 0
    context_shifts: int = 0
    seed: int = 0
    tokens: list[int] = field(default_factory=list)  # the generated token ids

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("tokens")
        return d


class TextGate:
    """Releases streamed text, holding back what might be the start of a stop string.

    `feed(text)` returns the text that can be shown now; `done` tells that a stop string or a
    reverse prompt was found (everything after it is dropped); `flush()` releases the rest at
    the end of a generation that ended for another reason."""

    def __init__(self, stop: Iterable[str] = (), reverse_prompts: Iterable[str] = ()):
        self.stop = [s for s in stop if s]
        self.reverse = [s for s in reverse_prompts if s]
        self.held = ""
        self.done = False
        self.matched: str | None = None
        self._tail = ""  # recent released text, for reverse prompts split across pieces
        self._reverse_max = max((len(r) for r in self.reverse), default=0)

    def feed(self, text: str) -> str:
        if self.done or not text:
            return ""
        pending = self.held + text
        cut, matched = -1, None
        for s in self.stop:
            at = pending.find(s)
            if at >= 0 and (cut < 0 or at < cut):
                cut, matched = at, s
        end = None
        if self.reverse:
            # a reverse prompt is shown, then generation stops right after it
            window = self._tail + pending
            for r in self.reverse:
                at = window.find(r)
                if at >= 0:
                    stop_at = at + len(r) - len(self._tail)
                    if end is None or stop_at < end:
                        end, rmatched = stop_at, r
        if end is not None and (cut < 0 or end <= cut):
            self.done, self.matched, self.held = True, rmatched, ""
            return pending[:max(end, 0)]
        if cut >= 0:
            self.done, self.matched, self.held = True, matched, ""
            return pending[:cut]
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(pending)), hold, -1):
                if pending.endswith(s[:n]):
                    hold = n
                    break
        out = pending[:len(pending) - hold]
        self.held = pending[len(pending) - hold:]
        if self._reverse_max:
            self._tail = (self._tail + out)[-self._reverse_max:]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.done else self.held), ""
        return out


class Generator:
    """Generation on one model; keeps track of the tokens in its KV cache between calls."""

    def __init__(self, model, tokenizer, n_threads: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.n_threads = n_threads
        self.cache_tokens: list[int] = []  # the tokens whose keys/values are in the cache, in order
        self.last_stats = GenerationStats()
        self._cancel = threading.Event()
        self._rng = None  # the sampler's random stream, continued by the next run with the same seed

    # -- control (any thread) ------------------------------------------------------------------

    def cancel(self) -> None:
        """End the running generation within one token; it keeps what it generated."""
        self._cancel.set()

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    @property
    def n_tokens(self) -> int:
        return len(self.cache_tokens)

    def reset(self) -> None:
        """Empty the KV cache."""
        self.model.truncate(0)
        self.cache_tokens = []

    # -- evaluation ----------------------------------------------------------------------------

    def _sync(self) -> None:
        if self.model.n_past != len(self.cache_tokens):  # someone used the model behind our back
            self.model.truncate(0)
            self.cache_tokens = []

    def _eval(self, tokens: Sequence[int]):
        start = len(self.cache_tokens)
        try:
            logits = self.model.eval(list(tokens), logits="last", cancel=self._cancel)
        except EvalCancelled as err:
            self.cache_tokens.extend(tokens[:err.n_done])
            raise
        except BaseException:
            # Ctrl-C or an error inside a kernel may leave a half-written position: forget it
            if self.model.n_past > start:
                self.model.truncate(start)
            raise
        self.cache_tokens.extend(tokens)
        return logits

    def ingest(self, prompt: Sequence[int]):
        """Make the cache hold exactly `prompt`, reusing its common prefix; the logits of the
        prompt's last token (at least that one is always evaluated)."""
        self._sync()
        common = 0
        for a, b in zip(self.cache_tokens, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)
        if common < len(self.cache_tokens):
            self.model.truncate(common)
            del self.cache_tokens[common:]
        return self._eval(list(prompt[common:])), len(prompt) - common

    def _shift(self, n_keep: int) -> bool:
        """llama.cpp's context shift: keep n_keep, drop half of the rest. False if nothing can go."""
        n_past = len(self.cache_tokens)
        n_discard = (n_past - n_keep) // 2
        if n_discard <= 0:
            return False
        self.model.shift(n_keep, n_discard)
        del self.cache_tokens[n_keep:n_keep + n_discard]
        return True

    # -- the loop ------------------------------------------------------------------------------

    def generate(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(), n_predict: int = -1,
                 stop: Iterable[str] = (), reverse_prompts: Iterable[str] = (), context_shift: bool = False,
                 n_keep: int = 0, continue_stream: bool = False) -> Iterator[str]:
        """Yield the generated text piece by piece; with continue_stream and the same fixed seed
        as the previous run, the random stream goes on from where that run left it; `last_stats` describes the run once the
        iterator is exhausted (or closed). n_predict < 0: until end of generation or the context
        is full. Raises UserError for an empty prompt or one longer than the context."""
        prompt = [int(t) for t in prompt]
        n_ctx = self.model.n_ctx
        if not prompt:
            raise UserError("the prompt is empty: give some text to complete")
        if len(prompt) > n_ctx:
            raise UserError(f"the prompt is {len(prompt)} tokens long, more than the context size of {n_ctx} tokens; "
                            "use a larger context (-c / n_ctx) or a shorter prompt")
        tok = self.tokenizer
        if n_keep < 0 or n_keep > len(prompt):
            n_keep = len(prompt)
        elif tok.add_bos and prompt[0] == tok.bos_id:
            n_keep += 1  # as llama-cli: --keep counts the prompt's text, the BOS comes on top
        n_keep = min(n_keep, len(prompt))
        self._cancel.clear()
        if self.n_threads is not None:
            self.model.set_threads(self.n_threads)  # numba's thread count is per thread

        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt), n_ctx=n_ctx)
        sampler = Sampler(params, self.model.config.n_vocab, tok.eog_ids, n_ctx,
                          rng=self._rng if continue_stream else None)
        self._rng = sampler.rng
        stats.seed = sampler.seed
        sampler.accept_many(prompt)  # the penalties see the prompt, as in llama-cli
        gate = TextGate(stop, reverse_prompts)
        decoder = tok.stream_decoder()
        eog = tok.eog_ids
        reason = "length"
        try:
            t0 = time.perf_counter()
            try:
                logits, stats.prompt_eval_tokens = self.ingest(prompt)
            except EvalCancelled:
                reason = "cancelled"
                return
            finally:
                stats.prompt_ms = (time.perf_counter() - t0) * 1e3
            while True:
                if self._cancel.is_set():
                    reason = "cancelled"
                    break
                if 0 <= n_predict <= stats.completion_tokens:
                    reason = "length"
                    break
                t0 = time.perf_counter()
                token = sampler.sample(logits)
                sampler.accept(token)
                stats.sample_ms += (time.perf_counter() - t0) * 1e3
                stats.sample_runs += 1
                if token in eog:
                    reason = "eos"
                    break
                stats.completion_tokens += 1
                stats.tokens.append(token)
                text = gate.feed(decoder.feed(token))
                if text:
                    yield text
                if gate.done:
                    reason = "stop"
                    break
                if 0 <= n_predict <= stats.completion_tokens:
                    reason = "length"  # the last token needs no evaluation
                    break
                if len(self.cache_tokens) + 1 >= n_ctx:  # llama-cli's test: the cache is full
                    if not (context_shift and self._shift(n_keep)):
                        reason = "context_full"
                        break
                    stats.context_shifts += 1
                if self._cancel.is_set():
                    reason = "cancelled"
                    break
                t0 = time.perf_counter()
                try:
                    logits = self._eval([token])
                except EvalCancelled:
                    reason = "cancelled"
                    break
                finally:
                    stats.eval_ms += (time.perf_counter() - t0) * 1e3
                stats.eval_runs += 1
            if reason != "stop":
                rest = gate.feed(decoder.flush()) + gate.flush()
                if rest:
                    yield rest
        except BaseException:  # Ctrl-C, or the consumer stopped reading: the run was cut short
            reason = "cancelled"
            raise
        finally:
            stats.stop_reason = reason
            stats.stop_text = gate.matched if reason == "stop" else None
            stats.n_past = len(self.cache_tokens)
