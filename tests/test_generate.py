"""The generation loop on the fake model: stops (end of generation, n_predict, stop strings,
reverse prompts, full context), context shift, KV prefix reuse, UTF-8 streaming, cancel."""

from __future__ import annotations

import threading
import time

import pytest

from llamachat.runtime.errors import UserError
from llamachat.runtime.generation.generate import Generator, TextGate
from llamachat.runtime.params import SamplingParams
from test_generate_fakes import BOS, EOS, FakeModel, FakeTokenizer, continuing

GREEDY = SamplingParams(temp=0.0)


def make(text="Hello, world!", prompt="Say:", n_ctx=128, add_bos=False, **kw):
    tok = FakeTokenizer(add_bos=add_bos)
    ids = tok.encode(prompt)
    model = FakeModel(continuing(text, after=len(ids)), n_ctx=n_ctx, **kw)
    return Generator(model, tok), model, ids


def run(gen, ids, **kw):
    pieces = list(gen.generate(ids, kw.pop("params", GREEDY), **kw))
    return pieces, gen.last_stats


def test_greedy_text_until_end_of_generation():
    gen, model, ids = make("Hello, world!")
    pieces, st = run(gen, ids)
    assert "".join(pieces) == "Hello, world!"
    assert st.stop_reason == "eos" and st.completion_tokens == len("Hello, world!")
    assert st.prompt_tokens == st.prompt_eval_tokens == len(ids)
    assert st.tokens == list(b"Hello, world!") and EOS not in st.tokens
    # every generated token but the end-of-generation one went into the cache
    assert model.tokens == ids + list(b"Hello, world!")
    assert st.n_past == len(model.tokens) and st.eval_runs == len("Hello, world!")


def test_n_predict_stops_without_evaluating_the_last_token():
    gen, model, ids = make("abcdefgh")
    pieces, st = run(gen, ids, n_predict=3)
    assert "".join(pieces) == "abc" and st.stop_reason == "length" and st.completion_tokens == 3
    assert model.tokens == ids + list(b"ab")
    pieces, st = run(gen, ids, n_predict=0)
    assert pieces == [] and st.stop_reason == "length"


def test_stop_string_is_not_emitted_and_partial_matches_are_released():
    gen, _, ids = make("one ## two #! three")
    pieces, st = run(gen, ids, stop=["#!"])
    assert "".join(pieces) == "one ## two " and st.stop_reason == "stop"
    # the '#' of '##' was held back only while it could still start '#!'
    assert all("#!" not in p for p in pieces)


def test_stop_string_spanning_many_tokens_and_earliest_wins():
    gen, _, ids = make("abc STOP def END")
    pieces, st = run(gen, ids, stop=["END", "STOP"])
    assert "".join(pieces) == "abc " and st.stop_reason == "stop"


def test_text_gate_holds_back_only_possible_starts():
    gate = TextGate(stop=["<|end|>"])
    assert gate.feed("Hi <") == "Hi "
    assert gate.feed("|e") == ""
    assert gate.feed("x") == "<|ex"
    assert gate.feed(" ok<|end|>tail") == " ok" and gate.done
    gate = TextGate(stop=["zz"])
    assert gate.feed("az") == "a" and gate.flush() == "z"


def test_reverse_prompt_is_emitted_then_generation_stops():
    gen, _, ids = make("Bob: hi\nUser: more text")
    pieces, st = run(gen, ids, reverse_prompts=["User:"])
    assert "".join(pieces) == "Bob: hi\nUser:" and st.stop_reason == "stop"


def test_utf8_is_never_split():
    text = "héllo wörld € 😀 ok"
    gen, _, ids = make(text)
    pieces, st = run(gen, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert st.completion_tokens == len(text.encode())


def test_prompt_errors():
    gen, _, ids = make(n_ctx=8)
    with pytest.raises(UserError, match="empty"):
        list(gen.generate([], GREEDY))
    with pytest.raises(UserError, match="9 tokens long, more than the context size of 8"):
        list(gen.generate(list(range(9)), GREEDY))


def test_context_full_stops():
    gen, model, ids = make("x" * 100, prompt="abcd", n_ctx=16)
    pieces, st = run(gen, ids)
    assert st.stop_reason == "context_full"
    # llama-cli stops when n_past + 1 >= n_ctx: 15 tokens in the cache, the 12th sampled one emitted
    assert len(model.tokens) == 15 and st.completion_tokens == 12 and len("".join(pieces)) == 12


def test_context_shift_keeps_n_keep_and_drops_half_of_the_rest():
    gen, model, ids = make(prompt="abcd", n_ctx=16)
    model.rule = lambda tokens: ord("x")
    pieces, st = run(gen, ids, n_predict=40, context_shift=True, n_keep=2)
    assert st.stop_reason == "length" and st.completion_tokens == 40 and "".join(pieces) == "x" * 40
    assert st.context_shifts >= 1
    assert model.shifts[0] == (2, (15 - 2) // 2)
    assert model.tokens[:2] == ids[:2] and len(model.tokens) < 16


def test_keep_counts_the_bos_on_top_and_minus_one_keeps_the_prompt():
    gen, model, ids = make(prompt="abcd", n_ctx=16, add_bos=True)
    assert ids[0] == BOS
    model.rule = lambda tokens: ord("x")
    run(gen, ids, n_predict=20, context_shift=True, n_keep=1)
    assert model.shifts[0][0] == 2
    gen.reset()
    model.shifts.clear()
    run(gen, ids, n_predict=20, context_shift=True, n_keep=-1)
    assert model.shifts[0][0] == len(ids)


def test_context_shift_impossible_stops():
    gen, model, ids = make(prompt="abcdefghijklmn", n_ctx=16)
    model.rule = lambda tokens: ord("x")
    pieces, st = run(gen, ids, context_shift=True, n_keep=-1)
    assert st.stop_reason == "context_full"


def test_kv_prefix_reuse_evaluates_only_new_tokens():
    gen, model, ids = make("The end.")
    run(gen, ids, n_predict=4)
    first = list(model.evals)
    assert first[0] == ids
    model.evals.clear()
    follow = ids + list(b"The ") + list(b"more?")
    run(gen, follow, n_predict=1)
    # the prompt and the 3 evaluated generated tokens were cached: only the rest is evaluated
    assert model.evals[0] == follow[len(ids) + 3:]
    assert gen.last_stats.prompt_eval_tokens == len(follow) - len(ids) - 3
    model.evals.clear()
    run(gen, follow, n_predict=1)
    assert model.evals[0] == follow[-1:]  # the same prompt again: one token, for its logits
    model.evals.clear()
    run(gen, list(b"Other"), n_predict=1)
    assert model.evals[0] == list(b"Other") and model.tokens[:5] == list(b"Other")


def test_cache_resync_when_the_model_was_used_elsewhere():
    gen, model, ids = make("abc")
    run(gen, ids, n_predict=2)
    model.tokens.append(1)  # someone else evaluated a token
    model.evals.clear()
    run(gen, ids, n_predict=1)
    assert model.evals[0] == ids


def test_cancel_from_another_thread_within_one_token():
    gen, model, ids = make("y" * 500, n_ctx=1024, delay=0.002)
    cancelled_at = []
    starts = []
    real_eval = model.eval

    def eval_(tokens, logits="last", cancel=None):
        starts.append(time.perf_counter())
        return real_eval(tokens, logits, cancel)

    model.eval = eval_

    def cancel():
        cancelled_at.append(time.perf_counter())
        gen.cancel()

    timer = threading.Timer(0.1, cancel)
    timer.start()
    pieces = list(gen.generate(ids, GREEDY))
    timer.join()
    st = gen.last_stats
    assert st.stop_reason == "cancelled" and 0 < st.completion_tokens < 500
    # at most the token being made when cancel() came: no evaluation starts after it but a racing one
    assert sum(t > cancelled_at[0] for t in starts) <= 1
    assert "".join(pieces) == "y" * st.completion_tokens
    # a new generation is not affected by the earlier cancel
    run(gen, ids, n_predict=2)
    assert gen.last_stats.stop_reason == "length"


def test_cancel_during_a_chunked_prompt():
    tok = FakeTokenizer()
    ids = tok.encode("z" * 40)
    model = FakeModel(continuing("abc", after=len(ids)), n_batch=8, delay=0.002)
    gen = Generator(model, tok)
    threading.Timer(0.03, gen.cancel).start()
    pieces, st = run(gen, ids)
    assert pieces == [] and st.stop_reason == "cancelled"
    assert 0 < len(model.tokens) < 40 and gen.cache_tokens == model.tokens  # finished chunks stay cached
    model.delay = 0
    cached = len(gen.cache_tokens)
    model.evals.clear()
    pieces, st = run(gen, ids)
    assert "".join(pieces) == "abc" and model.evals[0] == ids[cached:]


def test_keyboard_interrupt_passes_through_and_the_cache_stays_consistent():
    gen, model, ids = make("abcdef")
    model.interrupt_at = len(ids) + 3
    got = []
    with pytest.raises(KeyboardInterrupt):
        for piece in gen.generate(ids, GREEDY):
            got.append(piece)
    assert "".join(got) == "abcd"
    assert gen.last_stats.stop_reason == "cancelled"
    assert model.tokens == gen.cache_tokens == ids + list(b"abc")  # the half-written one dropped


def test_threads_are_set_in_the_generating_thread():
    tok = FakeTokenizer()
    model = FakeModel(continuing("ab", after=2))
    gen = Generator(model, tok, n_threads=2)
    list(gen.generate(tok.encode("hi"), GREEDY))
    assert model.threads == [2]


def test_same_seed_same_text():
    tok = FakeTokenizer()
    model = FakeModel()
    model._noise[:] = 0.0  # a flat distribution: sampling picks among all tokens
    gen = Generator(model, tok)
    params = SamplingParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42, ignore_eos=True)
    model.rule = lambda tokens: EOS  # the favourite is banned by ignore_eos
    a = run(gen, [65], params=params, n_predict=20)[1].tokens
    b = run(gen, [65], params=params, n_predict=20)[1].tokens
    c = run(gen, [65], params=params.updated(seed=43), n_predict=20)[1].tokens
    assert gen.last_stats.seed == 43
    assert a == b != c and EOS not in a + c and len(set(a)) > 10
