"""A scripted stand-in for `llamachat.runtime.Llama` for the app and headless tests: replies come
from a script, stream one word (a "token") at a time with an optional delay, and follow the real
engine's rules, which tests/test_engine_contract.py checks on both: what is done at call time
(prompt checks, the first token), stop strings held back and never shown, max_tokens, the
context size, cancel(), the stop reasons, the token counts, the shapes of chunks and replies.

It is stricter than the real engine in one way: a keyword the real `Llama` does not name in its
signature (the real one swallows those in `**ignored`) is a TypeError here, and sampling values
go through the real `sampling_params`, so a setting renamed or mangled on its way from the app
to the engine fails the app tests. Every call is recorded so tests can check what the sidebar
sent.
"""

from __future__ import annotations

import functools
import inspect
import random
import re
import threading
import time
import uuid
from types import SimpleNamespace

from llamachat.runtime.errors import UserError

# llama_api's map from the generator's stop reason to the chunk's finish_reason
FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length", "context_full": "length", "cancelled": "cancelled"}

# the sampling keywords of the real create_completion, handed to the real sampling_params
SAMPLING_KEYWORDS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
                     "presence_penalty", "frequency_penalty", "mirostat_mode", "mirostat_tau", "mirostat_eta")


class FakeScript:
    """Shared by all FakeLlama instances a factory makes (a model switch makes a new one)."""

    def __init__(self, replies=None, delay: float = 0.0, reply_fn=None, load_delay: float = 0.0, fail_load: str | None = None,
                 hold_after: int | None = None):
        self.replies = list(replies or [])
        self.delay = delay
        # after this many tokens the next one takes until cancel() (at most a minute): a reply
        # stopped at an exact point, whatever the machine's speed
        self.hold_after = hold_after
        self.reply_fn = reply_fn
        self.load_delay = load_delay
        self.fail_load = fail_load
        self.calls: list[dict] = []  # kwargs of each generation call, plus "prompt"/"messages"
        self.instances: list["FakeLlama"] = []
        self.lock = threading.Lock()

    def next_reply(self, prompt_text: str) -> str:
        if self.reply_fn is not None:
            return self.reply_fn(prompt_text)
        with self.lock:
            if self.replies:
                return self.replies.pop(0)
        return "I have nothing more to say."

    def factory(self, model_path, **kwargs):
        return FakeLlama(model_path, script=self, **kwargs)


def _pieces(text: str) -> list[str]:
    """The fake's tokens: words with the white space before them."""
    return re.findall(r"\s*\S+|\s+", text)


@functools.cache
def _real_parameters(method: str) -> frozenset[str]:
    from llamachat.runtime.generation.llama_api import Llama

    sig = inspect.signature(getattr(Llama, method))
    return frozenset(n for n, p in sig.parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self")


def _check_keywords(method: str, kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - _real_parameters(method))
    if unknown:
        raise TypeError(f"Llama.{method} has no parameter {', '.join(unknown)} (the real one would ignore it)")


class FakeLlama:
    def __init__(self, model_path, n_ctx=512, seed=-1, progress=None, script: FakeScript | None = None, **kwargs):
        _check_keywords("__init__", dict(kwargs, n_ctx=n_ctx, seed=seed, progress=progress))
        self.script = script or FakeScript()
        if self.script.fail_load:
            raise RuntimeError(self.script.fail_load)
        self.model_path = model_path
        self._n_ctx = n_ctx
        self.seed = seed
        self.context_shift = bool(kwargs.get("context_shift", False))
        self.n_keep = int(kwargs.get("n_keep", 0) or 0)
        self.load_kwargs = dict(kwargs, n_ctx=n_ctx, seed=seed)
        self.n_tokens = 0  # tokens in the "KV cache"
        self.metadata = {"general.name": "fake", "general.file_type": 3}  # 3 = MOSTLY_Q4_1
        self.last_stats: dict | None = None
        self._cancel = threading.Event()
        self._vocab: dict[str, int] = {}
        self._words: list[str] = []
        # what the real engine's Generator exposes: the generated token ids of the last run
        self.generator = SimpleNamespace(last_stats=SimpleNamespace(tokens=[]))
        for i in range(1, 5):
            if progress:
                progress(i / 4)
            if self.script.load_delay:
                time.sleep(self.script.load_delay / 4)
        self.script.instances.append(self)

    def n_ctx(self) -> int:
        return self._n_ctx

    def cancel(self) -> None:
        self._cancel.set()

    def reset(self) -> None:
        self.n_tokens = 0

    def close(self) -> None:
        self.cancel()

    # -- tokens: one per word, ids given out as words are first seen ------------------------

    def _token(self, piece: str) -> int:
        if piece not in self._vocab:
            self._vocab[piece] = len(self._words)
            self._words.append(piece)
        return self._vocab[piece]

    def tokenize(self, text, add_bos=True, special=False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode()
        return [self._token(p) for p in _pieces(text)]

    def detokenize(self, tokens, prev_tokens=None, special=False) -> bytes:
        return "".join(self._words[t] for t in tokens).encode()

    # -- generation, in the order of runtime.generation.generate.Generator.generate --------------------

    def _run(self, prompt_text: str, max_tokens, stop, seed, kwargs: dict):
        """Checks and the first token at call time, as the real `_run`; (first text, the rest)."""
        if kwargs.get("echo"):
            raise NotImplementedError("the fake engine does not echo the prompt")
        from llamachat.runtime.generation.llama_api import sampling_params

        # the real checks, with the real sentences
        sampling_params(**{k: kwargs[k] for k in SAMPLING_KEYWORDS if k in kwargs}, seed=self.seed if seed is None else seed,
                        logit_bias=kwargs.get("logit_bias"), ignore_eos=kwargs.get("ignore_eos", False))
        prompt = self.tokenize(prompt_text)
        if not prompt:
            raise UserError("the prompt is empty: give some text to complete")
        if len(prompt) > self._n_ctx:
            raise UserError(f"the prompt is {len(prompt)} tokens long, more than the context size of {self._n_ctx} tokens; "
                            "use a larger context (-c / n_ctx) or a shorter prompt")
        n_predict = -1 if max_tokens is None or max_tokens <= 0 else int(max_tokens)
        stops = [s for s in ([stop] if isinstance(stop, str) else list(stop or [])) if s]
        if seed is None:
            seed = self.seed
        if seed in (-1, None):
            seed = random.getrandbits(32)
        gen = self._generate(prompt, self.script.next_reply(prompt_text), n_predict, stops, seed)
        return next(gen, None), gen

    def _generate(self, prompt: list[int], reply: str, n_predict: int, stops: list[str], seed: int):
        self._cancel.clear()
        stats = dict(prompt_tokens=len(prompt), prompt_ms=1.0, completion_tokens=0, eval_ms=0.0, stop_reason="",
                     n_past=0, n_ctx=self._n_ctx, prompt_eval_tokens=len(prompt), eval_runs=0, sample_ms=0.0,
                     seed=seed, context_shifts=0)
        tokens: list[int] = []
        self.generator.last_stats.tokens = tokens
        self.n_tokens = len(prompt)  # the prompt is in the cache
        n_keep = len(prompt) if self.n_keep < 0 or self.n_keep > len(prompt) else self.n_keep
        words = iter(_pieces(reply))
        made = ""  # the text of the tokens so far
        emitted = 0  # how much of it was shown; a possible start of a stop string is held back
        reason = "length"
        try:
            while True:
                if self._cancel.is_set():
                    reason = "cancelled"
                    break
                if 0 <= n_predict <= stats["completion_tokens"]:
                    reason = "length"
                    break
                word = next(words, None)
                if word is None:  # the script's reply is over: the end-of-generation token
                    reason = "eos"
                    break
                stats["completion_tokens"] += 1
                tokens.append(self._token(word))
                made += word
                hit = min((at for at in (made.find(s, emitted) for s in stops) if at >= 0), default=-1)
                if hit >= 0:
                    if hit > emitted:
                        yield made[emitted:hit]
                    reason = "stop"
                    break
                held = max((n for s in stops for n in range(1, len(s)) if made.endswith(s[:n])), default=0)
                if len(made) - held > emitted:
                    yield made[emitted:len(made) - held]
                    emitted = len(made) - held
                if 0 <= n_predict <= stats["completion_tokens"]:
                    reason = "length"  # the last token needs no evaluation
                    break
                if self.n_tokens + 1 >= self._n_ctx:
                    n_discard = (self.n_tokens - n_keep) // 2
                    if not (self.context_shift and n_discard > 0):
                        reason = "context_full"
                        break
                    self.n_tokens -= n_discard
                    stats["context_shifts"] += 1
                if self._cancel.is_set():
                    reason = "cancelled"
                    break
                if self.script.hold_after == stats["completion_tokens"] and self._cancel.wait(60):
                    reason = "cancelled"  # as the real engine cancelled inside a token's evaluation
                    break
                if self.script.delay:  # "evaluating" the token
                    time.sleep(self.script.delay)
                self.n_tokens += 1
                stats["eval_runs"] += 1
            if reason != "stop" and len(made) > emitted:
                yield made[emitted:]
        except BaseException:
            reason = "cancelled"
            raise
        finally:
            # 10 ms a token: a fixed 100 tok/s, so the status bar is the same in every run
            stats.update(stop_reason=reason, n_past=self.n_tokens, eval_ms=10.0 * max(stats["completion_tokens"], 1))
            self.last_stats = stats

    def _chunks(self, first, gen, chat: bool):
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4()}",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_path}

        def chunk(text, finish=None, role=False):
            if chat:
                delta = {"role": "assistant"} if role else ({"content": text} if text else {})
                return {**meta, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            return {**meta, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        try:
            if chat:
                yield chunk("", role=True)
            if first is not None:
                yield chunk(first)
            for text in gen:
                yield chunk(text)
        finally:
            gen.close()
        yield chunk("", FINISH_REASON[self.last_stats["stop_reason"]])

    def _usage(self) -> dict:
        s = self.last_stats
        return {"prompt_tokens": s["prompt_tokens"], "completion_tokens": s["completion_tokens"],
                "total_tokens": s["prompt_tokens"] + s["completion_tokens"]}

    def __call__(self, prompt, **kwargs):
        return self.create_completion(prompt, **kwargs)

    def create_completion(self, prompt, max_tokens=16, stop=None, stream=False, seed=None, **kwargs):
        _check_keywords("create_completion", kwargs)
        self.script.calls.append(dict(kwargs, prompt=prompt, max_tokens=max_tokens, stream=stream,
                                      **({"stop": stop} if stop is not None else {}),
                                      **({"seed": seed} if seed is not None else {})))
        first, gen = self._run(prompt, max_tokens, stop, seed, kwargs)
        chunks = self._chunks(first, gen, chat=False)
        if stream:
            return chunks
        text = "".join(c["choices"][0]["text"] for c in chunks)
        return {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_path,
                "choices": [{"text": text, "index": 0, "logprobs": None,
                             "finish_reason": FINISH_REASON[self.last_stats["stop_reason"]]}],
                "usage": self._usage()}

    def create_chat_completion(self, messages, max_tokens=None, stop=None, stream=False, seed=None, **kwargs):
        _check_keywords("create_chat_completion", kwargs)
        self.script.calls.append(dict(kwargs, messages=[dict(m) for m in messages], max_tokens=max_tokens, stream=stream,
                                      **({"stop": stop} if stop is not None else {}),
                                      **({"seed": seed} if seed is not None else {})))
        prompt = "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"
        first, gen = self._run(prompt, max_tokens, stop, seed, kwargs)
        chunks = self._chunks(first, gen, chat=True)
        if stream:
            return chunks
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        return {"id": f"chatcmpl-{uuid.uuid4()}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_path,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": FINISH_REASON[self.last_stats["stop_reason"]]}],
                "usage": self._usage()}
