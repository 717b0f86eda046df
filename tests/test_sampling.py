"""The samplers against llama.cpp's tests/test-sampling.cpp (same inputs, same expected
probabilities, same 1e-5 tolerance), the random stream against libstdc++'s, and the chain's
order, determinism and speed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llamachat.runtime.params import SamplingParams
from llamachat.runtime.generation.sampling import (
    Candidates, Mirostat, MirostatV2, Penalties, Rng, Sampler, discrete, dist, logit_bias,
    min_p, softmax, temperature, top_k, top_p, typical,
)

P4 = [0.1, 0.2, 0.3, 0.4]


def check(cur: Candidates, expected):
    assert len(cur) == len(expected), (cur.p, expected)
    assert np.all(np.abs(cur.p - np.asarray(expected, np.float32)) < 1e-5), (cur.p, expected)


def run(probs, expected, *samplers, draw=True):
    cur = Candidates.from_probs(probs)
    for s in samplers:
        s(cur)
    if draw:
        dist(cur, Rng(0))
    check(cur, expected)
    return cur


# --- test-sampling.cpp's cases ------------------------------------------------------------


@pytest.mark.parametrize("temp, expected", [(1.0, P4), (0.0, [0, 0, 0, 1])])
def test_temp(temp, expected):
    run(P4, expected, lambda c: temperature(c, temp))


@pytest.mark.parametrize("k, expected", [
    (1, [1.0]),
    (3, [0.44444, 0.33333, 0.22222]),
    (4, [0.4, 0.3, 0.2, 0.1]),
    (0, P4),
])
def test_top_k(k, expected):
    run(P4, expected, lambda c: top_k(c, k))


@pytest.mark.parametrize("p, expected", [
    (0.0, [1.0]),
    (0.7, [0.571429, 0.428571]),
    (0.8, [0.44444, 0.33333, 0.22222]),
    (1.0, P4),
])
def test_top_p(p, expected):
    run(P4, expected, lambda c: top_p(c, p, 0))


@pytest.mark.parametrize("p, expected", [
    (0.00, P4),
    (0.24, P4),
    (0.26, [0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]),
    (0.49, [0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]),
    (0.51, [0.3 / 0.7, 0.4 / 0.7]),
    (0.74, [0.3 / 0.7, 0.4 / 0.7]),
    (0.76, [1.0]),
    (1.00, [1.0]),
    (1.05, [1.0]),
])
def test_min_p(p, expected):
    run(P4, expected, lambda c: min_p(c, p, 0))


@pytest.mark.parametrize("probs, expected", [
    ([0.97, 0.01, 0.01, 0.01], [0.97]),
    ([0.4, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2]),
])
def test_typical(probs, expected):
    run(probs, expected, lambda c: typical(c, 0.5, 0), draw=False)


@pytest.mark.parametrize("last, expected, repeat, freq, present", [
    ([0], [0, 0.25, 0.25, 0.25, 0.25], 50.0, 0.0, 0.0),
    ([0, 1, 2], [0, 0, 0, 0.5, 0.5], 50.0, 0.0, 0.0),
    ([0, 1, 2, 0, 0], [0, 0, 0, 0.5, 0.5], 50.0, 0.0, 0.0),
    ([0], [0.000011, 0.249997, 0.249997, 0.249997, 0.249997], 1.0, 5.0, 5.0),
    ([0, 1, 2], [0.000023, 0.000023, 0.000023, 0.499966, 0.499966], 1.0, 5.0, 5.0),
    ([0, 1, 2, 0, 0], [0.000000, 0.000023, 0.000023, 0.499977, 0.499977], 1.0, 5.0, 5.0),
])
def test_penalties(last, expected, repeat, freq, present):
    pen = Penalties(len(last), repeat, freq, present)
    for t in last:
        pen.accept(t)
    run([0.2] * 5, expected, pen.apply)


def _queue(n_vocab, sequence, k, p, mp):
    """test_sampler_queue: logits = log(id) over 10000 tokens, samplers in the given order."""
    cur = Candidates.from_logits(np.log(np.arange(n_vocab, dtype=np.float32), where=np.arange(n_vocab) > 0,
                                        out=np.full(n_vocab, -np.inf, np.float32)))
    min_id, max_id = 0, n_vocab - 1
    for s in sequence:
        {"k": lambda: top_k(cur, k), "p": lambda: top_p(cur, p, 1), "m": lambda: min_p(cur, mp, 1)}[s]()
        dist(cur, Rng(0))
        size = len(cur)
        if s == "k":
            expected = min(size, k)
            min_id = max(min_id, n_vocab - k)
            assert size == expected and cur.ids[0] == max_id and cur.ids[expected - 1] == min_id
        elif s == "p":
            divisor = n_vocab * (n_vocab - 1) // 2 - min_id * (min_id - 1) // 2
            target = math.ceil(np.float32(p) * divisor)
            min_id, expected, cumsum = n_vocab, 0, 0
            while True:
                min_id -= 1
                expected += 1
                cumsum += min_id
                if cumsum >= target:
                    break
            if min_id == 1:
                min_id -= 1
                expected += 1
            assert size == expected
            assert not cur.sorted or (cur.ids[0] == max_id and cur.ids[expected - 1] == min_id)
        else:
            expected = max(math.ceil((1.0 - np.float32(mp)) * n_vocab), 1)
            expected = min(expected, size)
            min_id = max(math.floor(np.float32(mp) * n_vocab), 1)
            min_id = min(max(min_id, n_vocab - size), n_vocab - 1)
            assert size == expected
            assert not cur.sorted or (cur.ids[0] == max_id and cur.ids[expected - 1] == min_id)


@pytest.mark.parametrize("sequence, k, p, mp", [
    ("k", 10000, 1.0, 1.0), ("k", 1, 1.0, 1.0), ("p", 10000, 1.0, 1.0), ("p", 10000, 0.0, 1.0),
    ("m", 10000, 1.0, 1.0), ("m", 10000, 1.0, 1e-12),
    ("k", 100, 1.0, 1.0), ("p", 10000, 0.0003, 1.0), ("p", 10000, 0.8, 1.0),
    ("m", 10000, 1.0, 9997.9 / 9999.0), ("m", 10000, 1.0, 0.1),
    ("kp", 100, 0.8, 0.1), ("km", 100, 0.8, 0.1), ("pk", 100, 0.8, 0.1), ("pm", 100, 0.8, 0.1),
    ("mk", 100, 0.8, 0.1), ("mp", 100, 0.8, 9997.9 / 9999.0), ("mp", 100, 0.8, 0.1),
    ("kpm", 100, 0.8, 0.1), ("kmp", 100, 0.8, 0.1), ("pkm", 100, 0.8, 0.1), ("pmk", 100, 0.8, 0.1),
    ("mkp", 100, 0.8, 0.1), ("mpk", 100, 0.8, 0.1),
])
def test_sampler_queue(sequence, k, p, mp):
    _queue(10000, sequence, k, p, mp)


# --- the random stream: numbers printed by g++/libstdc++ from std::mt19937 ----------------------


def test_rng_is_libstdcxx_mt19937():
    bits = np.random.MT19937()
    bits._legacy_seeding(5489)
    assert bits.random_raw(10000)[-1] == 4123659995  # the C++ standard's check value
    rng = Rng(42)  # std::uniform_real_distribution<double>(0, 1) on std::mt19937(42)
    assert [rng.canonical() for _ in range(4)] == [
        0.79654298428784598, 0.18343478789336848, 0.77969099761266125, 0.59685016158005655]


def test_discrete_distribution_matches_libstdcxx():
    rng = Rng(1234)  # std::discrete_distribution<int> over these weights, std::mt19937(1234)
    w = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625], np.float32)
    assert [discrete(w, rng) for _ in range(12)] == [0, 2, 1, 2, 2, 0, 0, 2, 0, 0, 0, 0]
    rng = Rng(7)  # one weight: no number drawn
    assert discrete(np.ones(1, np.float32), rng) == 0
    assert rng._bits.random_raw() == 327741615


def test_dist_picks_by_cumulative_probability():
    cur = Candidates.from_probs(P4)
    # seed 42's first number is 0.7965: the running sum 0.1, 0.3, 0.6, 1.0 first reaches it at id 3
    assert dist(cur, Rng(42)) == 3
    cur = Candidates.from_probs([0.9, 0.1])
    r = Rng(1234).canonical()
    assert dist(cur, Rng(1234)) == (0 if r <= 0.9 else 1)
    # one candidate left: llama.cpp (0c1e570) still draws a number, to stay in step with its
    # backend sampler, which draws once per token; the next 32-bit word is therefore the third
    one = Candidates.from_probs([0.3])
    rng, fresh = Rng(7), Rng(7)
    fresh._bits.random_raw(2)
    assert dist(one, rng) == 0 and rng._bits.random_raw() == fresh._bits.random_raw()


# --- equal logits: libstdc++'s order, not a stable sort ------------------------------------------
#
# Positions printed by g++ 12 / libstdc++ for llama.cpp's own code (llama-sampler.cpp's
# partial_sort_inplace and bucket partial sort, typical's std::sort of indices) on logits with
# many ties: x[i] = ((i * 7919) % 13) / 2 - 3.


def _tied(n):
    return (((np.arange(n) * 7919) % 13).astype(np.float32) / np.float32(2)) - np.float32(3)


def test_top_k_orders_equal_logits_as_std_partial_sort():
    cur = Candidates.from_logits(_tied(300))
    top_k(cur, 20)
    assert cur.ids.tolist() == [110, 71, 188, 58, 136, 201, 19, 240, 149, 162, 32, 6, 214, 45, 227, 123, 253, 175,
                                97, 84]


def test_full_sort_orders_equal_logits_as_llama_cpps_bucket_sort():
    cur = Candidates.from_logits(_tied(49152))
    softmax(cur, sort=True)
    assert cur.ids[:40].tolist() == [
        32844, 32662, 32675, 32688, 32701, 32714, 32727, 32740, 32753, 32766, 32779, 32792, 32805, 32818, 32831,
        32649, 32857, 32870, 32883, 32896, 32909, 32922, 32935, 32948, 32961, 32974, 32987, 33000, 33013, 33026,
        32454, 32272, 32285, 32298, 32311, 32324, 32337, 32350, 32363, 32376]


def test_top_p_head_is_llama_cpps_256_bucket_sort():
    from llamachat.runtime.generation.sampling import _bucket_sort

    assert _bucket_sort(_tied(2000), 256)[:40].tolist() == [
        1384, 1267, 1280, 1293, 1306, 1319, 1332, 1345, 1358, 1371, 1254, 1397, 1410, 1423, 1436, 1449, 1462, 1475,
        1488, 1501, 1137, 1020, 1033, 1046, 1059, 1072, 1085, 1098, 1111, 1124, 1514, 1150, 1163, 1176, 1189, 1202,
        1215, 1228, 1241, 1891]


def test_typical_sorts_its_scores_as_std_sort():
    from llamachat.runtime.generation.sampling import _ascending_order

    assert _ascending_order(_tied(40)).tolist() == [
        39, 26, 0, 13, 20, 33, 7, 1, 27, 14, 8, 34, 21, 15, 2, 28, 35, 9, 22, 16, 29, 3, 36, 23, 10, 17, 4, 30, 24, 37,
        11, 31, 18, 5, 12, 38, 25, 32, 19, 6]


def test_softmax_uses_the_c_librarys_expf():
    # glibc 2.36's expf(-0.0137f) is 0x3f7c8447 (libm called through ctypes); numpy 2.4's float32 exp gives
    # 0x3f7c8448 on AVX-512, which would make the second probability 0.49657506
    e = np.array([0x3F7C8447], np.uint32).view(np.float32)[0]
    cur = Candidates.from_logits(np.array([0.0, -0.0137], np.float32))
    softmax(cur, sort=False)
    total = np.float32(1.0) + e
    assert cur.p.tolist() == [np.float32(1.0) / total, e / total]


# --- the chain ---------------------------------------------------------------------------------


def _logits(n=49152, seed=3):
    return np.random.default_rng(seed).normal(0, 3, n).astype(np.float32)


def test_greedy_is_argmax_and_ignores_the_seed():
    logits = _logits()
    for seed in (1, 2, 3):
        s = Sampler(SamplingParams(temp=0.0, seed=seed), len(logits))
        assert s.sample(logits) == int(np.argmax(logits))


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = [_logits(seed=i) for i in range(20)]
    params = SamplingParams(temp=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    a = Sampler(params, 49152)
    b = Sampler(params, 49152)
    c = Sampler(params.updated(seed=99), 49152)
    ta, tb, tc = ([s.sample(x) for x in logits] for s in (a, b, c))
    assert ta == tb and ta != tc
    a.reset()
    assert [a.sample(x) for x in logits] == ta


def test_chain_keeps_to_top_k():
    logits = _logits()
    allowed = set(np.argsort(-logits)[:3].tolist())
    s = Sampler(SamplingParams(temp=5.0, top_k=3, top_p=1.0, min_p=0.0, seed=5), len(logits))
    picked = {s.sample(logits) for _ in range(200)}
    assert picked <= allowed and len(picked) == 3


def test_logit_bias_and_ignore_eos():
    logits = _logits()
    best = int(np.argmax(logits))
    s = Sampler(SamplingParams(temp=0.0, logit_bias=((best, -math.inf), (17, 100.0))), len(logits))
    assert s.sample(logits) == 17
    s = Sampler(SamplingParams(temp=0.0, ignore_eos=True), len(logits), eog_ids={best, 17})
    assert s.sample(logits) == int(np.argsort(-logits)[1])
    cur = Candidates(np.array([5, 9, 2], np.int32), np.zeros(3, np.float32))  # not in id order
    logit_bias(cur, [(2, 1.5), (9, -1.0), (40, 3.0)])
    assert cur.logits.tolist() == [0.0, -1.0, 1.5]


def test_penalties_see_accepted_tokens_within_the_window():
    logits = np.zeros(10, np.float32)
    logits[3] = 2.0
    logits[4] = 1.9
    s = Sampler(SamplingParams(temp=0.0, repeat_penalty=1.5, repeat_last_n=2), 10)
    assert s.sample(logits) == 3
    s.accept(3)
    assert s.sample(logits) == 4  # 2.0 / 1.5 < 1.9
    s.accept(0)
    s.accept(0)  # 3 has left the 2-token window
    assert s.sample(logits) == 3


def test_penalties_on_a_reordered_list():
    pen = Penalties(4, 2.0, 0.5, 1.0)
    for t in (7, 7, 2):
        pen.accept(t)
    cur = Candidates(np.array([7, 1, 2], np.int32), np.array([4.0, 4.0, -1.0], np.float32))
    pen.apply(cur)
    assert cur.logits.tolist() == [4.0 / 2 - 2 * 0.5 - 1.0, 4.0, -1.0 * 2 - 0.5 - 1.0]


def test_mirostat_v2_keeps_surprise_below_mu_and_adapts():
    logits = _logits()
    rng = Rng(11)
    m = MirostatV2(rng, tau=5.0, eta=0.1)
    assert m.mu == np.float32(10.0)
    cur = Candidates.from_logits(logits)
    temperature(cur, 1.0)
    i = m.apply(cur)
    kept_p = np.exp(logits - logits.max())
    kept_p /= kept_p.sum()
    assert len(cur) == int((-np.log2(kept_p) <= 10.0).sum())
    assert cur.sorted and np.all(np.diff(cur.logits) <= 0)
    surprise = -np.log2(cur.p[i])
    assert m.mu == pytest.approx(10.0 - 0.1 * (surprise - 5.0), rel=1e-5)


def test_mirostat_v1_samples_from_a_small_top_k():
    logits = _logits()
    params = SamplingParams(mirostat=1, temp=0.8, seed=3)
    s = Sampler(params, len(logits))
    top = set(np.argsort(-logits)[:2000].tolist())
    tokens = [s.sample(logits) for _ in range(30)]
    assert set(tokens) <= top
    s2 = Sampler(params, len(logits))
    assert [s2.sample(logits) for _ in range(30)] == tokens
    assert isinstance(s.mirostat, Mirostat) and s.mirostat.mu != np.float32(10.0)


def test_mirostat_greedy_temperature_picks_the_top_token():
    logits = _logits()
    for mode in (1, 2):
        s = Sampler(SamplingParams(mirostat=mode, temp=0.0, seed=1), len(logits))
        assert s.sample(logits) == int(np.argmax(logits))


def test_the_callers_logits_are_never_changed():
    logits = _logits()
    before = logits.copy()
    for params in (SamplingParams(seed=1), SamplingParams(seed=1, repeat_penalty=1.3, logit_bias=((5, -math.inf),)),
                   SamplingParams(seed=1, mirostat=2), SamplingParams(seed=1, top_k=0, typical_p=0.5)):
        s = Sampler(params, len(logits))
        s.accept_many(range(100))
        s.sample(logits)
        assert np.array_equal(logits, before)


# --- llama.cpp's own continuations at temperature > 0 (real model) ------------------------------------


def _sampled_cases():
    """The `sampled` cases of ../shared/reference/smollm2.json, one pytest id per case."""
    import json

    from conftest import REFERENCE_DIR

    ref = REFERENCE_DIR / "smollm2.json"
    cases = json.loads(ref.read_text())["sampled"] if ref.is_file() else []
    return [pytest.param(i, id=f"{c['name']}, seed {c['seed']}") for i, c in enumerate(cases)] or [
        pytest.param(0, id="no-reference")]


@pytest.fixture(scope="module")
def smollm2_generator(smollm2_path):
    from llamachat.runtime.generation.generate import Generator
    from llamachat.runtime.model.model import load_model
    from llamachat.runtime.tokenizer.tokenizer import Tokenizer

    model = load_model(smollm2_path, n_ctx=512)
    yield Generator(model, Tokenizer.from_gguf(smollm2_path))
    model.close()


# llama-completion prints "\n\n" after the generated text (tools/completion/completion.cpp, at the
# end of main), and the reference keeps what it printed.
LLAMA_COMPLETION_TRAILER = "\n\n"


@pytest.mark.real_model
@pytest.mark.parametrize("index", _sampled_cases())
def test_sampled_continuation_is_llama_cpps_token_for_token(smollm2_generator, reference, index):
    """The whole chain (penalties, top-k, typical, top-p, min-p, temperature, the seeded draw;
    mirostat 1 and 2) against llama-completion's text for the same prompt, seed and settings."""
    case = reference["sampled"][index]
    assert case["continuation"].endswith(LLAMA_COMPLETION_TRAILER)
    expected = case["continuation"][:-len(LLAMA_COMPLETION_TRAILER)]
    p = case["params"]
    params = SamplingParams(
        temp=p["temp"], top_k=p["top_k"], top_p=p["top_p"], min_p=p["min_p"], typical_p=p["typical_p"],
        repeat_penalty=p["repeat_penalty"], repeat_last_n=p["repeat_last_n"],
        presence_penalty=p["presence_penalty"], frequency_penalty=p["frequency_penalty"],
        mirostat=p["mirostat"], mirostat_tau=p["mirostat_tau"], mirostat_eta=p["mirostat_eta"], seed=case["seed"])
    gen = smollm2_generator
    gen.reset()  # llama-completion evaluates the whole prompt
    prompt = gen.tokenizer.encode(case["prompt"], add_special=True, parse_special=True)
    text = "".join(gen.generate(prompt, params, n_predict=case["n_predict"]))
    assert text == expected
    stats = gen.last_stats
    assert stats.stop_reason == ("eos" if case["ended_with_eos"] else "length")
    assert (stats.completion_tokens == case["n_predict"]) != case["ended_with_eos"]
