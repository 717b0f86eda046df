"""A scripted stand-in for `llamachat.runtime.Llama` (same interface as CONTRACTS.md) for the
app and headless tests: replies come from a script, stream word by word with an optional delay,
and honour stop strings, max_tokens, the context size and cancel(). Every call is recorded so
tests can check that the sidebar's settings reach the sampler.
"""

from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace


class FakeScript:
    """Shared by all FakeLlama instances a factory makes (a model switch makes a new one)."""

    def __init__(self, replies=None, delay: float = 0.0, reply_fn=None, load_delay: float = 0.0, fail_load: str | None = None):
        self.replies = list(replies or [])
        self.delay = delay
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
    return re.findall(r"\s*\S+|\s+", text)


class FakeLlama:
    def __init__(self, model_path, n_ctx=512, seed=-1, progress=None, script: FakeScript | None = None, **kwargs):
        self.script = script or FakeScript()
        if self.script.fail_load:
            raise RuntimeError(self.script.fail_load)
        self.model_path = model_path
        self._n_ctx = n_ctx
        self.seed = seed
        self.load_kwargs = dict(kwargs, n_ctx=n_ctx, seed=seed)
        self.n_tokens = 0
        self.metadata = {"general.name": "fake", "general.file_type": 3}  # 3 = MOSTLY_Q4_1
        self.last_stats: dict = {}
        self._cancel = threading.Event()
        self._made_pieces: list[str] = []
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

    def detokenize(self, tokens, prev_tokens=None, special=False) -> bytes:
        return "".join(self._made_pieces[t] for t in tokens).encode()

    def tokenize(self, text, add_bos=True, special=False):
        if isinstance(text, bytes):
            text = text.decode()
        return list(range(len(_pieces(text))))

    # -- generation -----------------------------------------------------------------------

    def _stream(self, prompt_text: str, max_tokens=16, stop=None, chat=False, **kwargs):
        self._cancel.clear()
        reply = self.script.next_reply(prompt_text)
        prompt_tokens = len(_pieces(prompt_text))
        if prompt_tokens > self._n_ctx:  # as the engine: refused before anything is generated
            raise ValueError(f"the prompt is {prompt_tokens} tokens long, more than the context size of {self._n_ctx} tokens")
        self.n_tokens = prompt_tokens
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        made = ""
        emitted = 0  # text that could be the start of a stop string is held back, as llama-cpp-python does
        stop_reason = "eos"
        n = 0
        self._made_pieces = []
        self.generator.last_stats.tokens = []
        for piece in _pieces(reply):
            if self._cancel.is_set():
                stop_reason = "cancelled"
                break
            if max_tokens is not None and max_tokens > 0 and n >= max_tokens:
                stop_reason = "length"
                break
            if self.n_tokens >= self._n_ctx:
                stop_reason = "context_full"
                break
            if self.script.delay:
                time.sleep(self.script.delay)
            n += 1
            self.n_tokens += 1
            self._made_pieces.append(piece)
            self.generator.last_stats.tokens.append(len(self._made_pieces) - 1)
            made += piece
            hit = min((made.find(s) for s in stops if s in made), default=-1)
            if hit >= 0:
                made = made[:hit]
                stop_reason = "stop"
                break
            held = max((k for s in stops for k in range(1, len(s)) if made.endswith(s[:k])), default=0)
            if len(made) - held > emitted:
                yield self._chunk(made[emitted:len(made) - held], None, chat)
                emitted = len(made) - held
        if len(made) > emitted:
            yield self._chunk(made[emitted:], None, chat)
        self.last_stats = dict(prompt_tokens=prompt_tokens, prompt_ms=1.0, completion_tokens=n, eval_ms=10.0 * max(n, 1),
                               stop_reason=stop_reason, n_past=self.n_tokens, n_ctx=self._n_ctx)
        finish = {"eos": "stop", "stop": "stop", "length": "length", "context_full": "length", "cancelled": "cancelled"}[stop_reason]
        yield self._chunk("", finish, chat)

    @staticmethod
    def _chunk(text, finish, chat):
        if chat:
            return {"choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}
        return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}

    def __call__(self, prompt, stream=False, **kwargs):
        self.script.calls.append(dict(kwargs, prompt=prompt))
        gen = self._stream(prompt, chat=False, **kwargs)
        if stream:
            return gen
        text = "".join(c["choices"][0]["text"] for c in gen)
        return {"choices": [{"text": text, "finish_reason": "stop"}]}

    create_completion = __call__

    def create_chat_completion(self, messages, stream=False, **kwargs):
        self.script.calls.append(dict(kwargs, messages=[dict(m) for m in messages]))
        prompt = "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"
        gen = self._stream(prompt, chat=True, **kwargs)
        if stream:
            return gen
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in gen)
        return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
