"""The engine contract the app relies on, checked on the scripted fake engine (tests/tui_fake_engine.py,
which the app and headless tests use) and on the real engine with SmolLM2, by the same tests, so
the fake cannot drift from what the real one does:

- stop strings: the text before one streams, the stop string never appears, a partial match at
  the end of a piece is held back, and released when it turns out not to be one;
- a prompt longer than the context: one UserError sentence at call time, before any chunk;
- stop reasons and finish reasons: length, stop, eos, context_full, cancelled;
- token counts: last_stats, usage, n_tokens (the KV cache) and the generated token ids;
- the chunk and reply shapes, and what engine_worker.Engine (the app's and the headless chat's
  bridge) calls: the constructor keywords, n_ctx(), n_tokens, metadata, cancel(), last_stats,
  generator.last_stats.tokens with detokenize() to tell which stop string matched.

The tests do not know the real model's words: each learns the greedy text first (temperature 0)
and derives its stop strings from it; the fake's script plays a model of the same kind.
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tui_fake_engine import FakeScript  # noqa: E402

from llamachat.runtime.errors import UserError  # noqa: E402
from llamachat.tui.cli import build_main_parser  # noqa: E402
from llamachat.tui.conversation import Request, call_kwargs, load_kwargs, merged_settings  # noqa: E402
from llamachat.tui.engine_worker import Engine, quant_name  # noqa: E402

PROMPT = "The capital of France is"
SHORT_CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
# the fake's script: a long text for a completion, a short answer that ends (eos) for the chat
LONG = " Paris.\n\n" + "The United States has a population of approximately 321 million people.\n\n" * 8
GREEDY = dict(temperature=0.0)
STAT_KEYS = {"prompt_tokens", "prompt_ms", "completion_tokens", "eval_ms", "stop_reason", "n_past", "n_ctx",
             "prompt_eval_tokens", "eval_runs", "sample_ms", "seed", "context_shifts"}
_real_cache: dict[int, object] = {}


def fake_reply(prompt_text: str) -> str:
    return "The capital of France is Paris." if "Answer in one word" in prompt_text else LONG


class Side:
    """One engine: `llm(n_ctx)` gives a loaded Llama (or the fake), `factory` makes them for Engine."""

    def __init__(self, name: str, model_path):
        self.name = name
        self.model_path = model_path
        if name == "fake":
            self.script = FakeScript(reply_fn=fake_reply)
            self.factory = self.script.factory
        else:
            from llamachat.runtime import Llama

            self.factory = Llama

    def llm(self, n_ctx: int = 512):
        if self.name == "fake":
            return self.factory(str(self.model_path), n_ctx=n_ctx)
        if n_ctx not in _real_cache:  # loading takes seconds: one per context size for the session
            _real_cache[n_ctx] = self.factory(str(self.model_path), n_ctx=n_ctx)
        llm = _real_cache[n_ctx]
        llm.reset()
        return llm


@pytest.fixture(params=["fake", pytest.param("real", marks=[pytest.mark.real_model, pytest.mark.slow])])
def side(request, tmp_path):
    if request.param == "fake":
        path = tmp_path / "fake.gguf"
        path.write_bytes(b"")
        return Side("fake", path)
    return Side("real", request.getfixturevalue("smollm2_path"))


def stream(llm, prompt=PROMPT, **kwargs) -> tuple[list[str], str]:
    """(the text pieces, the finish_reason) of a streamed completion."""
    pieces, finish = [], None
    for chunk in llm(prompt, stream=True, **GREEDY, **kwargs):
        choice = chunk["choices"][0]
        assert finish is None, "a chunk after the one with the finish_reason"
        if choice["text"]:
            pieces.append(choice["text"])
        finish = choice["finish_reason"]
    return pieces, finish


def boundaries(pieces: list[str]) -> list[int]:
    """Where the text is cut between pieces (offsets into the joined text, the ends excluded)."""
    out, at = [], 0
    for p in pieces[:-1]:
        at += len(p)
        out.append(at)
    return out


def cut_with_two_chars_before(text: str, pieces: list[str]) -> int:
    """A cut between pieces near the middle with two non-blank characters before it and
    more text after it, whose stop string (2 before + 3 after) first occurs there."""
    for b in sorted(boundaries(pieces), key=lambda b: abs(b - len(text) // 2)):
        stop = text[b - 2:b + 3]
        if b >= 2 and len(stop) == 5 and text[b - 2:b].strip() and text.find(stop) == b - 2 and b + 3 < len(text):
            return b
    raise AssertionError(f"no usable cut in {pieces!r}")


# --- stop strings -------------------------------------------------------------------------------


def test_text_before_a_stop_string_streams_and_the_stop_string_never_appears(side):
    llm = side.llm()
    pieces, finish = stream(llm, max_tokens=24)
    full = "".join(pieces)
    assert finish == "length" and len(pieces) >= 8
    b = cut_with_two_chars_before(full, pieces)
    stop = full[b - 2:b + 3]  # starts 2 characters before a cut: those must be held back
    got, finish = stream(llm, max_tokens=24, stop=[stop])
    assert "".join(got) == full[:b - 2]
    assert not any(stop in p for p in got)
    assert finish == "stop" and llm.last_stats["stop_reason"] == "stop"
    # the tokens of the stop string were generated: the ids hold the text up to and including it
    made = llm.detokenize(llm.generator.last_stats.tokens).decode()
    assert made.startswith(full[:b + 3]) and full.startswith(made)
    assert llm.last_stats["completion_tokens"] == len(llm.generator.last_stats.tokens)


def test_a_partial_match_is_held_back_then_released(side):
    llm = side.llm()
    pieces, _ = stream(llm, max_tokens=24)
    full = "".join(pieces)
    b = cut_with_two_chars_before(full, pieces)
    stop = full[b - 2:b] + "\u2603never"  # begins like the text at the cut, then never matches
    got, finish = stream(llm, max_tokens=24, stop=[stop, "\u2603other"])
    assert "".join(got) == full  # nothing lost
    assert finish == "length" and llm.last_stats["stop_reason"] == "length"
    shown = ""
    for p in got:
        shown += p
        # a prefix of a stop string is never shown at the end of the streamed text until released
        assert shown == full or not any(shown.endswith(stop[:n]) for n in range(1, len(stop))), (shown, got)
    assert b not in boundaries(got) and b - 2 in boundaries(got)  # held at the cut, released with the next piece


def test_the_worker_names_the_stop_string_that_ended_the_reply(side):
    llm_factory_engine = Engine(side.factory)
    llm_factory_engine.load(side.model_path, n_ctx=512)
    pieces, _ = stream(llm_factory_engine.llm, max_tokens=24)
    full = "".join(pieces)
    b = cut_with_two_chars_before(full, pieces)
    early, late = full[b - 2:b + 3], "\u2603never"
    seen = []
    result = llm_factory_engine.generate(Request(prompt=PROMPT, stop=[late, early]), dict(GREEDY, max_tokens=24), seen.append)
    assert result.error is None
    assert result.text == "".join(seen) == full[:b - 2]
    assert result.stop_reason == "stop" and result.finish_reason == "stop" and not result.cancelled
    assert result.stop_text == early  # read from generator.last_stats.tokens through detokenize


# --- the context -------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_context_is_one_sentence_at_call_time(side):
    llm = side.llm(n_ctx=64)
    prompt = "The capital of France is Paris, and the capital of Italy is Rome. " * 8
    n = len(llm.tokenize(prompt.encode(), add_bos=True, special=True))
    assert n > 64
    with pytest.raises(UserError) as err:
        llm(prompt, stream=True, max_tokens=4, **GREEDY)  # raised by the call, not by the first chunk
    assert str(err.value) == (f"the prompt is {n} tokens long, more than the context size of 64 tokens; "
                              "use a larger context (-c / n_ctx) or a shorter prompt")
    # the app's worker passes that sentence on as it is
    engine = Engine(side.factory)
    engine.load(side.model_path, n_ctx=64)
    result = engine.generate(Request(prompt=prompt), dict(GREEDY, max_tokens=4), lambda text: None)
    assert result.error == str(err.value) and result.text == ""


def test_a_full_context_stops_with_length_and_the_cache_is_full(side):
    llm = side.llm(n_ctx=64)
    prompt_tokens = len(llm.tokenize(PROMPT.encode(), add_bos=True, special=True))
    pieces, finish = stream(llm, max_tokens=None)  # no limit but the context
    stats = llm.last_stats
    assert finish == "length" and stats["stop_reason"] == "context_full"
    assert stats["prompt_tokens"] == prompt_tokens and stats["n_ctx"] == 64
    # llama-cli's test: generation stops when the cache has room for one token less than n_ctx;
    # the last token generated is not evaluated
    assert stats["completion_tokens"] == 64 - prompt_tokens
    assert stats["n_past"] == llm.n_tokens == 63
    assert llm.detokenize(llm.generator.last_stats.tokens).decode() == "".join(pieces)


# --- stop reasons and token counts -------------------------------------------------------------


def test_length_counts_tokens_and_the_last_one_is_not_evaluated(side):
    llm = side.llm()
    prompt_tokens = len(llm.tokenize(PROMPT.encode(), add_bos=True, special=True))
    out = llm(PROMPT, max_tokens=6, **GREEDY)
    assert set(out) >= {"id", "object", "created", "model", "choices", "usage"}
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 6, "total_tokens": prompt_tokens + 6}
    stats = llm.last_stats
    assert set(stats) == STAT_KEYS and stats["stop_reason"] == "length" and stats["eval_runs"] == 5
    assert llm.n_tokens == stats["n_past"] == prompt_tokens + 5
    tokens = llm.generator.last_stats.tokens
    assert len(tokens) == 6 and llm.detokenize(tokens).decode() == choice["text"]
    pieces, finish = stream(llm, max_tokens=6)  # streamed: the same text
    assert "".join(pieces) == choice["text"] and finish == "length"


def test_end_of_generation_in_a_chat_and_the_chunks_shapes(side):
    llm = side.llm()
    chunks = list(llm.create_chat_completion(SHORT_CHAT, stream=True, max_tokens=64, **GREEDY))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" and set(c["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}
               for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}
    stats = llm.last_stats
    assert stats["stop_reason"] == "eos" and "Paris" in text
    # the end-of-generation token is not counted; every generated token was evaluated
    assert stats["completion_tokens"] == len(llm.generator.last_stats.tokens) == stats["eval_runs"] < 64
    assert llm.n_tokens == stats["n_past"] == stats["prompt_tokens"] + stats["completion_tokens"]
    out = llm.create_chat_completion(SHORT_CHAT, max_tokens=64, **GREEDY)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert out["choices"][0]["finish_reason"] == "stop" and out["object"] == "chat.completion"
    assert out["usage"]["completion_tokens"] == stats["completion_tokens"]


def test_cancel_ends_the_stream_within_a_token_and_keeps_the_text(side):
    llm = side.llm()
    full = "".join(stream(llm, max_tokens=24)[0])
    got, finish = [], None
    for chunk in llm(PROMPT, stream=True, max_tokens=24, **GREEDY):
        choice = chunk["choices"][0]
        got.append(choice["text"])
        finish = choice["finish_reason"]
        if len("".join(got)) > 0:
            llm.cancel()  # as Esc does, between two tokens
    assert finish == "cancelled" and llm.last_stats["stop_reason"] == "cancelled"
    text = "".join(got)
    assert text and full.startswith(text)
    assert llm.last_stats["completion_tokens"] == 1  # cancelled before the next token
    # a cancel before the call is forgotten: the next call runs in full
    llm.cancel()
    assert "".join(stream(llm, max_tokens=24)[0]) == full


def test_cancel_after_the_call_and_before_reading_stops_after_the_first_token(side):
    llm = side.llm()
    chunks = llm(PROMPT, stream=True, max_tokens=24, **GREEDY)  # the first token is made by the call
    llm.cancel()
    texts = [c["choices"][0]["text"] for c in chunks]
    assert chunks is not None and llm.last_stats["stop_reason"] == "cancelled"
    assert llm.last_stats["completion_tokens"] == 1 and "".join(texts) == llm.detokenize(llm.generator.last_stats.tokens).decode()


# --- what the app's worker calls ----------------------------------------------------------------


def test_the_worker_loads_and_generates_with_the_apps_keywords(side):
    args = build_main_parser().parse_args(["--temp", "0", "-n", "5", "-c", "256", "-s", "3", "--context-shift", "--keep", "4"])
    settings = merged_settings(args)
    engine = Engine(side.factory)
    fractions = []
    engine.load(side.model_path, progress=fractions.append, **load_kwargs(settings, args))
    assert fractions and fractions[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in fractions)
    assert engine.n_ctx() == 256 and engine.n_tokens() == 0
    assert quant_name(engine.metadata()) == "Q4_1"
    seen = []
    engine.pending_seed = 11
    result = engine.generate(Request(messages=SHORT_CHAT), call_kwargs(settings, args), seen.append)
    assert result.error is None and result.text == "".join(seen) and len(seen) >= 2
    assert result.stop_reason == "length" and result.finish_reason == "length"
    assert result.stats["completion_tokens"] == 5 and result.stats["seed"] == 11 and engine.pending_seed is None
    assert result.n_tokens == engine.n_tokens() == result.stats["n_past"] == result.stats["prompt_tokens"] + 4
    assert result.n_ctx == 256 and result.tokens_per_second > 0
    # cancelled from another thread (the UI's) while the reply streams: it keeps the text made so far
    first, cancelled = threading.Event(), threading.Event()

    def on_text(text):
        seen.append(text)
        first.set()
        assert cancelled.wait(60)  # the worker is held inside the stream until the cancel is in

    seen.clear()
    settings["n_predict"] = 200
    results = []
    worker = threading.Thread(target=lambda: results.append(engine.generate(Request(prompt=PROMPT), call_kwargs(settings, args), on_text)))
    worker.start()
    assert first.wait(120)
    engine.cancel()
    cancelled.set()
    worker.join(120)
    (result,) = results
    assert result.cancelled and result.stop_reason == "cancelled" and result.finish_reason == "cancelled"
    assert result.text == "".join(seen) and 0 < result.stats["completion_tokens"] < 200


def test_bad_sampling_values_are_the_engines_sentences(side):
    llm = side.llm()
    with pytest.raises(UserError, match=re.escape("top_p must be between 0 and 1, got 1.5")):
        llm(PROMPT, max_tokens=2, top_p=1.5)
    with pytest.raises(UserError, match="seed must be"):
        llm(PROMPT, max_tokens=2, seed=-5)
