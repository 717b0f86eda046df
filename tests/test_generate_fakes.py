"""A fake model and a byte-level fake tokenizer with the real interfaces (runtime/model/model.py's
eval/truncate/shift/set_threads, runtime/tokenizer/tokenizer.py's encode/decode/stream_decoder/eog_ids),
so the generation loop, the Llama API and the one-shot command can be tested exactly and fast.
The other test modules import them from here; the tests below check the fakes themselves."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from llamachat.runtime.errors import UserError
from llamachat.runtime.model.model import EvalCancelled

BOS, EOS = 256, 257
N_VOCAB = 260


class FakeStreamDecoder:
    def __init__(self):
        self.buf = b""

    def feed(self, token: int) -> str:
        self.buf += FakeTokenizer.piece(token)
        for cut in range(len(self.buf), max(len(self.buf) - 4, -1), -1):
            try:
                text = self.buf[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.buf = self.buf[cut:]
            return text
        return ""

    def flush(self) -> str:
        text, self.buf = self.buf.decode("utf-8", "replace"), b""
        return text


class FakeTokenizer:
    """Token b < 256 is the byte b; 256 = <s> (BOS), 257 = </s> (EOS, end of generation)."""

    SPECIAL = {"<s>": BOS, "</s>": EOS}

    def __init__(self, add_bos: bool = False):
        self.add_bos = add_bos
        self.add_eos = False
        self.bos_id, self.eos_id = BOS, EOS
        self.eog_ids = frozenset({EOS})
        self.n_vocab = N_VOCAB

    @staticmethod
    def piece(token: int) -> bytes:
        if token < 256:
            return bytes([token])
        return {BOS: b"<s>", EOS: b"</s>"}.get(token, b"")

    def token_to_piece(self, token: int) -> bytes:
        return self.piece(token)

    def is_eog(self, token: int) -> bool:
        return token in self.eog_ids

    def encode(self, text: str | bytes, add_special: bool = True, parse_special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        ids = [BOS] if (add_special and self.add_bos) else []
        i = 0
        while i < len(text):
            if parse_special:
                hit = next((s for s in self.SPECIAL if text.startswith(s, i)), None)
                if hit:
                    ids.append(self.SPECIAL[hit])
                    i += len(hit)
                    continue
            ids.extend(text[i].encode("utf-8"))
            i += 1
        return ids

    def decode_bytes(self, ids, special: bool = False) -> bytes:
        return b"".join(self.piece(t) for t in ids if special or t < 256)

    def decode(self, ids, special: bool = False) -> str:
        return self.decode_bytes(ids, special).decode("utf-8", "replace")

    def stream_decoder(self) -> FakeStreamDecoder:
        return FakeStreamDecoder()


def continuing(text: str | bytes, after: int, then: int = EOS):
    """A rule: once `after` tokens are in the cache, the model says `text` (bytes), then `then`."""
    data = text.encode("utf-8") if isinstance(text, str) else text

    def rule(tokens):
        k = len(tokens) - after
        return data[k] if 0 <= k < len(data) else then

    return rule


class FakeModel:
    """Logits favour rule(tokens in the cache); the rest get small fixed noise. Records every
    eval call; chunks evaluation in n_batch and honours `cancel` between chunks like the real one."""

    def __init__(self, rule=None, n_ctx: int = 128, n_batch: int = 512, delay: float = 0.0):
        self.rule = rule or (lambda tokens: ord("x"))
        self.config = SimpleNamespace(n_vocab=N_VOCAB, n_ctx_train=n_ctx)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.delay = delay
        self.tokens: list[int] = []
        self.evals: list[list[int]] = []
        self.shifts: list[tuple[int, int]] = []
        self.threads: list[int | None] = []
        self.metadata = {"general.name": "fake"}
        self.interrupt_at: int | None = None  # raise KeyboardInterrupt when n_past reaches this
        self._noise = np.random.default_rng(0).normal(0, 0.5, N_VOCAB).astype(np.float32)

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def logits(self) -> np.ndarray:
        out = self._noise.copy()
        out[self.rule(self.tokens)] = 20.0
        return out

    def eval(self, tokens, logits="last", cancel=None):
        tokens = [int(t) for t in tokens]
        assert tokens, "eval needs at least one token"
        if self.n_past + len(tokens) > self.n_ctx:
            raise UserError("the context is full")
        self.evals.append(tokens)
        rows = []
        for start in range(0, len(tokens), self.n_batch):
            if start and cancel is not None and cancel.is_set():
                raise EvalCancelled(start)
            for t in tokens[start:start + self.n_batch]:
                if self.interrupt_at is not None and self.n_past == self.interrupt_at:
                    self.tokens.append(t)  # half-written, as a real interrupted kernel may leave it
                    raise KeyboardInterrupt
                if self.delay:
                    time.sleep(self.delay)
                self.tokens.append(t)
                rows.append(self.logits())
        return np.stack(rows) if logits == "all" else rows[-1]

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    def shift(self, n_keep: int, n_discard: int) -> None:
        assert 0 <= n_keep and n_keep + n_discard <= self.n_past
        self.shifts.append((n_keep, n_discard))
        del self.tokens[n_keep:n_keep + n_discard]

    def set_threads(self, n) -> None:
        self.threads.append(n)

    def close(self) -> None:
        self.closed = True


class FakeChatTemplate:
    """'<s>ROLE: content' lines, then 'assistant: ' for the reply."""

    def __init__(self):
        self.seen = []

    def encode(self, messages, tokenizer, add_generation_prompt=True):
        self.seen.append(messages)
        text = "".join(f"<s>{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<s>assistant: "
        return tokenizer.encode(text, add_special=False, parse_special=True)


# --- the fakes behave like the real interfaces ---------------------------------------------------


def test_fake_tokenizer_round_trip_and_specials():
    tok = FakeTokenizer(add_bos=True)
    ids = tok.encode("hé<s>", parse_special=True)
    assert ids == [BOS, ord("h"), 0xC3, 0xA9, BOS]
    assert tok.encode("<s>", add_special=False) == list(b"<s>")
    d = tok.stream_decoder()
    assert [d.feed(t) for t in "h€".encode()] == ["h", "", "", "€"]


def test_fake_model_cancel_between_chunks():
    m = FakeModel(n_batch=2)
    ev = threading.Event()
    ev.set()
    with pytest.raises(EvalCancelled) as err:
        m.eval([1, 2, 3, 4, 5], cancel=ev)
    assert err.value.n_done == 2 and m.n_past == 2
