"""The forward pass's small kernels (runtime/model/forward.py) against oracles that share none of their
code: float64 numpy with a stated ulp bound, and values computed by ggml's own C code.

The pinned values were printed by ggml's AVX2 `ggml_v_expf` / `ggml_v_silu` (ggml-cpu/vec.h,
copied verbatim into a scratch C file) and by `ggml_rope_cache_init` / `rope_yarn` (powf,
cosf, sinf of glibc; freq_scale 1, no YaRN), built with `gcc -O2 -mavx2 -mfma` on x86-64.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from numba import njit

from oracles import causal_attention, tiled_attention_row_by_row

from llamachat.runtime.model.forward import (_ggml_expf, _silu_mul, apply_rope, attention, rmsnorm,
                                       rope_tables)

# (x bits, ggml_v_expf(x) bits)
GGML_EXPF = [
    (0xc1a40000, 0x30abd1d9), (0xc0533333, 0x3d1712cd), (0xbf800000, 0x3ebc5ab2), (0xbeb126e9, 0x3f351f89),
    (0xbc23d70a, 0x3f7d73e8), (0x00000000, 0x3f800000), (0x3e000000, 0x3f910b01), (0x3f000000, 0x3fd3094c),
    (0x3f317218, 0x40000000), (0x3f800000, 0x402df855), (0x40200000, 0x4142eb7f), (0x40f80000, 0x45111928),
    (0x4174cccd, 0x4a86aa51), (0x42280000, 0x5dc1192c), (0x42a03333, 0x793cb086), (0xc2adcccd, 0x00c60f89),
]
# (gate bits, up bits, ggml_vec_swiglu_f32's ggml_v_silu(gate) * up bits)
GGML_SWIGLU = [
    (0xc1a40000, 0x3f333333, 0xb29a19cd), (0xc0533333, 0xbfa66666, 0x3e1c4348), (0xbf800000, 0x40000000, 0xbf09b2b0),
    (0xbeb126e9, 0x3e800000, 0xbd12ce8d), (0xbc23d70a, 0xbf666666, 0x3b92b7fe), (0x00000000, 0x3f8ccccd, 0x00000000),
    (0x3e000000, 0x40400000, 0x3e4bfc02), (0x3f000000, 0xbf000000, 0xbe1f597f), (0x3f317218, 0x3fc00000, 0x3f317218),
    (0x3f800000, 0x3f4ccccd, 0x3f15b887), (0x40200000, 0xc00ccccd, 0xc0a2a622), (0x40f80000, 0x3ea8f5c3, 0x40239c0b),
    (0x4174cccd, 0x3f800000, 0x4174ccc9), (0x42280000, 0xbe000000, 0xc0a80000), (0x42a03333, 0x3c23d70a, 0x3f4d0e55),
    (0xc2adcccd, 0x40800000, 0x850676f3),
]
# (freq_base, n_rot, position, pair i, cos bits, sin bits) of ggml's rope cache
GGML_ROPE = [
    (10000, 64, 1, 0, 0x3f0a5140, 0x3f576aa4), (10000, 64, 1, 1, 0x3f3b54b0, 0x3f2e7ace),
    (10000, 64, 1, 13, 0x3f7fed93, 0x3cc23ea6), (10000, 64, 1, 31, 0x3f800000, 0x390bd46f),
    (10000, 64, 100, 0, 0x3f5cc0ee, 0xbf01a12e), (10000, 64, 100, 1, 0x3f6ae796, 0xbecb86ea),
    (10000, 64, 100, 13, 0xbf37befe, 0x3f32403c), (10000, 64, 100, 31, 0x3f7ffa2c, 0x3c5a7a43),
    (10000, 64, 4095, 0, 0xbd871e6c, 0xbf7f7136), (10000, 64, 4095, 1, 0xbdb86a3a, 0xbf7ef5c4),
    (10000, 64, 4095, 13, 0xbf75ea20, 0x3e8e4bc3), (10000, 64, 4095, 31, 0x3f5ac501, 0x3f04f360),
    (100000, 64, 1, 1, 0x3f44282c, 0x3f247e9c), (100000, 64, 1, 13, 0x3f7ffd2a, 0x3c18766f),
    (100000, 64, 1, 31, 0x3f800000, 0x37706b59), (100000, 64, 100, 1, 0x3f48f906, 0x3f1e9323),
    (100000, 64, 100, 13, 0x3f18ed9b, 0x3f4d4d5b), (100000, 64, 100, 31, 0x3f7fffef, 0x3abbd3db),
    (100000, 64, 4095, 1, 0x3ea9a192, 0xbf718aa3), (100000, 64, 4095, 13, 0x3f6b01fc, 0x3ecb0ce2),
    (100000, 64, 4095, 31, 0x3f7f8f32, 0x3d703902),
]


def f32(bits: int) -> np.float32:
    return np.array([bits], np.uint32).view(np.float32)[0]


def bits_of(x) -> int:
    return int(np.float32(x).view(np.uint32))


def ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the last place of exact rounded to float32."""
    return np.abs(got.astype(np.float64) - exact) / np.spacing(np.abs(exact.astype(np.float32))).astype(np.float64)


@njit(cache=True)
def _expf_all(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = _ggml_expf(x[i])
    return out


def _gates(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([(rng.standard_normal(50000) * s).astype(np.float32) for s in (0.1, 1, 10, 40)]
                          + [np.linspace(-88, 88, 200001).astype(np.float32)])


def test_expf_is_ggml_v_expf():
    """_ggml_expf: ggml's values bit for bit, and within 2 ulp of exp over the whole range
    (ggml states 1.45 + 0.5 ulp for this routine; measured here: 1.87)."""
    for x, want in GGML_EXPF:
        assert bits_of(_ggml_expf(f32(x))) == want, hex(x)
    x = np.concatenate([np.linspace(-87.3, 88.3, 1_000_001).astype(np.float32), _gates(0)])
    x = x[np.abs(x) <= 88.3]
    assert ulps(_expf_all(x), np.exp(x.astype(np.float64))).max() <= 2.0


def test_swiglu_against_float64_and_ggml():
    """_silu_mul (SwiGLU, the vectorized loops): ggml's values bit for bit; within 4.5 ulp of
    g / (1 + exp(-g)) * up in float64 where that formula is finite in float32 (|g| <= 88;
    measured: 4.13 ulp over these inputs: expf's 1.9 plus three roundings); 0 where exp(-g)
    overflows float32, as in ggml."""
    g = np.array([f32(a) for a, _, _ in GGML_SWIGLU], np.float32)
    up = np.array([f32(b) for _, b, _ in GGML_SWIGLU], np.float32)
    out = np.empty_like(g)
    _silu_mul(g, up, out)
    assert [bits_of(v) for v in out] == [c for _, _, c in GGML_SWIGLU]
    for seed in (0, 1, 2):
        g = _gates(seed)
        up = np.random.default_rng(seed + 10).standard_normal(g.size).astype(np.float32)
        out = np.empty_like(g)
        _silu_mul(g, up, out)
        g64 = g.astype(np.float64)
        exact = g64 / (1 + np.exp(-g64)) * up
        finite = (np.abs(g) <= 88) & (np.abs(exact) >= np.finfo(np.float32).tiny)
        assert ulps(out[finite], exact[finite]).max() <= 4.5, seed
        assert np.all(out[g < -88.8] == 0)


def test_swiglu_of_a_batch_is_the_one_token_swiglu():
    """_silu_mul_rows (a prompt's batch, its own loop) gives each token _silu_mul's bits (decode's),
    ggml's slow-path range |g| > 87 included."""
    from llamachat.runtime.model.forward import _silu_mul_rows

    g = _gates(3)[::133][:3000].reshape(3, 1000).copy()  # every scale of _gates
    g[0, :8] = [87.0, -87.0, 87.5, -87.5, 88.7, -88.7, 1e30, -1e30]
    up = np.random.default_rng(13).standard_normal(g.shape).astype(np.float32)
    got = np.empty_like(g)
    _silu_mul_rows(g, up, got)
    for t in range(3):
        want = np.empty(g.shape[1], np.float32)
        _silu_mul(g[t], up[t], want)
        assert np.array_equal(got[t].view(np.uint32), want.view(np.uint32)), t


def _rope_cfg(base, n_rot):
    return types.SimpleNamespace(n_rot=n_rot, rope_freq_base=float(base), rope_freqs=None, rope_freq_scale=1.0)


def test_rope_tables_are_ggml_rope_cache():
    """cos/sin of ggml's rope cache bit for bit, and everywhere close to cos/sin of the exact
    angle pos * base**(-2i/n_rot): the float32 angle recurrence drifts with position and pair,
    measured at most 6.3e-4 up to position 4095 (n_rot 128); the bound is 2x that."""
    for base, n_rot, pos, pair, c, s in GGML_ROPE:
        cos, sin = rope_tables(np.array([pos]), _rope_cfg(base, n_rot))
        assert (bits_of(cos[0, pair]), bits_of(sin[0, pair])) == (c, s), (base, pos, pair)
    pos = np.arange(4096)
    for base in (10000, 100000, 500000):
        for n_rot in (16, 64, 128):
            cos, sin = rope_tables(pos, _rope_cfg(base, n_rot))
            angle = pos[:, None] * float(base) ** (-2 * np.arange(n_rot // 2) / n_rot)[None, :]
            assert np.abs(cos - np.cos(angle)).max() <= 1.3e-3, (base, n_rot)
            assert np.abs(sin - np.sin(angle)).max() <= 1.3e-3, (base, n_rot)


def test_apply_rope_rotates_pairs():
    """apply_rope turns pairs (2i, 2i+1) of each head by the table's angle i, leaves dimensions
    past n_rot alone: within 2 ulp of the pair's larger value from the float64 rotation by
    the same cos/sin (one fused multiply-add: measured 1.48)."""
    rng = np.random.default_rng(1)
    n_head, head_dim, n_rot = 3, 64, 48
    pos = np.arange(0, 4096, 7)
    cos, sin = rope_tables(pos, _rope_cfg(10000, n_rot))
    x = rng.standard_normal((len(pos), n_head * head_dim)).astype(np.float32)
    got = x.copy()
    apply_rope(got, n_head, head_dim, n_rot, cos, sin)
    xh = x.reshape(len(pos), n_head, head_dim).astype(np.float64)
    pairs = xh[:, :, :n_rot].reshape(len(pos), n_head, n_rot // 2, 2)
    c, s = cos[:, None, :].astype(np.float64), sin[:, None, :].astype(np.float64)
    want = np.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1)
    mag = np.abs(pairs).max(-1, keepdims=True).repeat(2, -1).astype(np.float32)
    gh = got.reshape(len(pos), n_head, head_dim)
    assert (np.abs(gh[:, :, :n_rot].reshape(want.shape) - want) / np.spacing(mag)).max() <= 2.0
    assert np.array_equal(gh[:, :, n_rot:], x.reshape(len(pos), n_head, head_dim)[:, :, n_rot:])


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rmsnorm_against_float64(scale, eps):
    """rmsnorm = x / sqrt(mean(x^2) + eps) * weight within 3 ulp of float64 (measured: 2.69);
    at scale 1e-3 eps is a large part of the denominator, so dropping it shows."""
    rng = np.random.default_rng(int(scale * 1000) + int(eps * 1e7))
    x = (rng.standard_normal((5, 576)) * scale).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(576)).astype(np.float32)
    x64 = x.astype(np.float64)
    exact = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * w
    assert ulps(rmsnorm(x, w, eps), exact).max() <= 3.0


def test_decode_attention_is_causal_softmax_attention():
    """The small-batch / decode attention (ggml's one-row flash attention: q and the running
    sum of values in half precision) against float64 causal softmax attention with grouped
    KV heads: within 4e-3 of outputs of size ~1 (measured 2.0e-3, the half-precision rounding);
    scores 2% too sharp would move some head's output by 5.7e-3 to 2.7e-2."""
    rng = np.random.default_rng(1)
    n_past, n_head, n_kv, hd = 40, 4, 2, 64
    for n_tok in (1, 3):
        q = rng.standard_normal((n_tok, n_head * hd)).astype(np.float32)
        k = rng.standard_normal((n_past + n_tok, n_kv * hd)).astype(np.float16).astype(np.float32)
        v = rng.standard_normal((n_past + n_tok, n_kv * hd)).astype(np.float16).astype(np.float32)
        out = np.empty_like(q)
        attention(q, k, v, n_past, n_head, n_kv, hd, out)
        want = causal_attention(q, k, v, n_past, n_head, n_kv, hd)
        for t in range(n_tok):
            for h in range(n_head):
                assert np.abs(out[t, h * hd:(h + 1) * hd] - want[t, h * hd:(h + 1) * hd]).max() <= 4e-3, (n_tok, t, h)


# (n_past, n_tok, n_head, n_head_kv, head_dim, score size): no cache and a cache; batches of
# one tile and a bit more, not a multiple of 4 or of 64 long; GQA groups of 1, 3 and 8; a head
# size not a multiple of 4; scores spread wide enough that weights vanish (ggml's slow path)
TILED_SHAPES = [(0, 64, 9, 3, 64, 1.0), (0, 65, 4, 4, 32, 1.0), (37, 100, 6, 2, 64, 1.0), (5, 200, 3, 1, 30, 1.0),
                (130, 64, 8, 1, 16, 1.0), (3, 70, 9, 3, 64, 40.0), (64, 128, 32, 4, 64, 1.0)]


@pytest.mark.parametrize("shape", TILED_SHAPES, ids=lambda s: "past{}-tok{}-h{}-kv{}-d{}-x{:g}".format(*s))
def test_tiled_attention_is_the_row_by_row_kernel_bit_for_bit(shape):
    """forward.attention_tiled (rows taken through each KV tile together) gives the bits of
    the kernel it replaced, which went through the tiles one (token, head) row at a time
    (oracles.tiled_attention_row_by_row); cache rows past the batch hold NaN and inf, which
    no output may see."""
    from llamachat.runtime.model.forward import attention_tiled

    n_past, n_tok, n_head, n_kv, hd, spread = shape
    rng = np.random.default_rng(n_past * 1000 + n_tok)
    n_all = n_past + n_tok
    q = (rng.standard_normal((n_tok, n_head * hd)) * spread).astype(np.float32)
    k = np.full((n_all + 9, n_kv * hd), np.nan, np.float32)
    v = np.full((n_all + 9, n_kv * hd), np.inf, np.float32)
    k[:n_all] = rng.standard_normal((n_all, n_kv * hd)).astype(np.float16)
    v[:n_all] = rng.standard_normal((n_all, n_kv * hd)).astype(np.float16)
    want = np.empty_like(q)
    tiled_attention_row_by_row(q, k, v, n_past, n_head, n_kv, hd, want)
    got = np.full_like(q, np.nan)
    attention_tiled(q, k, v, n_past, n_head, n_kv, hd, got)
    assert np.isfinite(want).all()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("mode_name", ["ACT_F16", "ACT_Q8_0", "ACT_Q8_1", "ACT_Q8_K", "none"])
def test_a_prompts_norm_pass_is_the_serial_steps(mode_name):
    """add_norm_rows (a prompt's residual add, rmsnorm and activation rounding in one parallel
    pass) gives the bits of the steps it replaces: numpy's x + o, rmsnorm, quantize_activations
    (token by token, decode's); also with no residual to add (the first layer)."""
    from llamachat.runtime.model.forward import add_norm_rows
    from llamachat.runtime.quants import matmul as mm

    rng = np.random.default_rng(5)
    n_tok, n = 7, 256
    x = (rng.standard_normal((n_tok, n)) * rng.choice([1e-3, 1.0, 40.0], (n_tok, 1))).astype(np.float32)
    o = rng.standard_normal((n_tok, n)).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, n).astype(np.float32)
    eps = np.float32(1e-5)
    mode = -1 if mode_name == "none" else getattr(mm, mode_name)
    for residual in (o, np.empty((0, n), np.float32)):
        want_x = x + residual if len(residual) else x.copy()
        want_h = rmsnorm(want_x, weight, eps)
        got_x, got_h = x.copy(), np.empty_like(x)
        got = mm.Activations.empty(n_tok, n, mode)
        add_norm_rows(got_x, residual, weight, eps, mode, got_h, got.xq, got.xd, got.xs, got.xhat)
        assert np.array_equal(got_x.view(np.uint32), want_x.view(np.uint32))
        assert np.array_equal(got_h.view(np.uint32), want_h.view(np.uint32))
        if mode < 0:
            continue
        want = mm.Activations.empty(n_tok, n, mode)
        mm.quantize_activations(want_h, mode, want.xq, want.xd, want.xs, want.xhat)
        assert np.array_equal(got.xhat.view(np.uint32), want.xhat.view(np.uint32))
        if mode != mm.ACT_F16:  # (the float formats fill xhat only)
            assert np.array_equal(got.xq, want.xq)
            assert np.array_equal(got.xd.view(np.uint32), want.xd.view(np.uint32))
            assert np.array_equal(got.xs.view(np.uint32), want.xs.view(np.uint32))


def test_a_prompts_rope_pass_is_apply_rope_and_half_rounding():
    """rope_store_rows rotates q and k as apply_rope does and writes k and v into the cache rows
    from pos on rounded to half as numpy's float16 cast rounds them (huge values to inf), leaving
    the other rows alone."""
    from llamachat.runtime.model.forward import rope_store_rows

    rng = np.random.default_rng(6)
    n_tok, n_head, n_head_kv, head_dim, n_rot, pos = 5, 4, 2, 32, 16, 3
    positions = np.arange(pos, pos + n_tok)
    cfg = types.SimpleNamespace(n_rot=n_rot, rope_freq_base=10000.0, rope_freqs=None, rope_freq_scale=1.0)
    cos, sin = rope_tables(positions, cfg)
    q = rng.standard_normal((n_tok, n_head * head_dim)).astype(np.float32)
    k = (rng.standard_normal((n_tok, n_head_kv * head_dim)) * 10.0).astype(np.float32)
    v = (rng.standard_normal((n_tok, n_head_kv * head_dim)) * 1e-6).astype(np.float32)  # half denormals
    v[0, :3] = [70000.0, -65519.0, 65520.0]  # past the half range, and either side of where it begins
    want_q, want_k = q.copy(), k.copy()
    apply_rope(want_q, n_head, head_dim, n_rot, cos, sin)
    apply_rope(want_k, n_head_kv, head_dim, n_rot, cos, sin)
    k_cache = np.full((12, n_head_kv * head_dim), 7.0, np.float32)
    v_cache = k_cache.copy()
    rope_store_rows(q, k, v, cos, sin, n_head, n_head_kv, head_dim, n_rot, k_cache, v_cache, pos)
    assert np.array_equal(q.view(np.uint32), want_q.view(np.uint32))
    assert np.array_equal(k_cache[pos:pos + n_tok], want_k.astype(np.float16).astype(np.float32))
    with np.errstate(over="ignore"):  # the values past the half range become inf, as meant
        want_v = v.astype(np.float16).astype(np.float32)
    assert np.array_equal(v_cache[pos:pos + n_tok], want_v)
    untouched = np.r_[0:pos, pos + n_tok:12]
    assert (k_cache[untouched] == 7.0).all() and (v_cache[untouched] == 7.0).all()
