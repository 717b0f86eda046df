"""The quantized products (runtime/quants/matmul.py) against a plain dequantization.

Random blocks of every supported format; the weights are dequantized by gguf-py's reference
(`gguf.quants.dequantize`) and by our registry, the activations rounded the way llama.cpp's
vec_dot_type does (checked against a numpy transcription of ggml's quantize_row_q8_*), and
the products of one token and of batches must give x @ W.T; the fused formats' products replay
llama.cpp's AVX2 sums bit for bit, batches giving each token its one-token floats.
"""

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from llamachat.runtime.quants import matmul as mm
from llamachat.runtime.quants import TRAITS, q4_k
from llamachat.runtime.quants.ksearch import get_scale_min_k4

# byte offsets of the half-float scale fields in each block (random bytes elsewhere)
SCALE_FIELDS = {
    T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
ALL_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
             T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def random_rows(ggml_type, n_rows, n_per_row, rng):
    block, size = GGML_QUANT_SIZES[ggml_type]
    if ggml_type == T.F32:
        return rng.standard_normal((n_rows, n_per_row)).astype(np.float32).view(np.uint8)
    if ggml_type == T.F16:
        return rng.standard_normal((n_rows, n_per_row)).astype(np.float16).view(np.uint8)
    if ggml_type == T.BF16:
        bits = rng.standard_normal((n_rows, n_per_row)).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    nb = n_per_row // block
    raw = rng.integers(0, 256, size=(n_rows, nb, size), dtype=np.uint8)
    for off in SCALE_FIELDS[ggml_type]:
        scale = (rng.uniform(0.001, 0.05, size=(n_rows, nb)) * rng.choice([-1, 1], size=(n_rows, nb))).astype(np.float16)
        raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(n_rows, nb, 2)
    return raw.reshape(n_rows, nb * size)


def numpy_q8(x, block, f16_scale):
    """ggml's quantize_row_q8_0/q8_1 (block 32, half scale) and q8_K (block 256, float scale)."""
    xb = x.reshape(-1, block).astype(np.float32)
    if block == 32:
        d = np.abs(xb).max(axis=1) / np.float32(127)
        inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
        q = np.rint(xb * inv[:, None])
        d = d.astype(np.float16).astype(np.float32)
    else:
        idx = np.abs(xb).argmax(axis=1)
        vmax = xb[np.arange(len(xb)), idx]
        iscale = (np.float32(-127) / vmax).astype(np.float32)
        q = np.minimum(127, np.rint(iscale[:, None] * xb))
        d = (np.float32(1) / iscale).astype(np.float32)
    return (q * d[:, None]).reshape(x.shape).astype(np.float32)


@pytest.mark.parametrize("mode,block", [(mm.ACT_Q8_0, 32), (mm.ACT_Q8_1, 32), (mm.ACT_Q8_K, 256)])
def test_activation_rounding_matches_ggml(mode, block):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 512)).astype(np.float32) * 3
    act = mm.Activations(x, mode)
    assert np.array_equal(act.xhat, np.stack([numpy_q8(r, block, True) for r in x]))
    # half a step of 1/127 of the block's largest |x| (its scale rounded to half for Q8_0/Q8_1):
    # measured at most 4.08e-3 of it; bound 2x that
    xb = x.reshape(3, -1, block)
    assert np.all(np.abs(act.xhat - x).reshape(xb.shape).max(-1) <= 8.2e-3 * np.abs(xb).max(-1))
    # the 32-group sums used for the minimum terms (Q8_1 keeps d * sum(q) in half precision:
    # measured 1 half-float step at most; bound 2 steps)
    sums = act.xhat.reshape(3, -1, 32).sum(axis=2)
    assert np.all(np.abs(act.xs - sums) <= 2 * np.spacing(np.abs(sums).astype(np.float16)).astype(np.float32))


def test_half_rounding_matches_numpy():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 5, 2000), [0.0, 65504.0, 1e-8, -3e-5]])
    x = x.astype(np.float32)[None, :]
    act = mm.Activations(x, mm.ACT_F16)
    assert np.array_equal(act.xhat, x.astype(np.float16).astype(np.float32))


# |W x_rounded - W x| / sum(|x||w|) measured per weight type on test_products_match_dequantized_weights'
# rows (the activations' format follows the weights': none for F32, half for F16/BF16, Q8_0/Q8_1,
# Q8_K for the K-quants)
ACT_ROUNDING = {T.F32: 2.7e-8, T.F16: 4.9e-5, T.BF16: 3.9e-4, T.Q8_0: 1.33e-3, T.Q4_0: 1.65e-3, T.Q4_1: 1.26e-3,
                T.Q5_0: 1.73e-3, T.Q5_1: 1.54e-3, T.Q2_K: 2.46e-3, T.Q3_K: 2.17e-3, T.Q4_K: 2.18e-3,
                T.Q5_K: 1.98e-3, T.Q6_K: 2.54e-3}


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_products_match_dequantized_weights(ggml_type):
    rng = np.random.default_rng(int(ggml_type) + 7)
    n_out, n_in = 70, 512
    raw = random_rows(ggml_type, n_out, n_in, rng)
    w_ref = gguf_dequantize(raw, ggml_type).reshape(n_out, n_in).astype(np.float64)
    assert np.array_equal(mm.dequantize_rows(raw, ggml_type, n_in), w_ref.astype(np.float32))
    w = mm.QuantWeight("w", ggml_type, n_in, n_out, raw)
    for n_tok in (1, 2, 9):
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        act = mm.quantize_for(x, w)
        expected = act.xhat.astype(np.float64) @ w_ref.T
        if ggml_type in (T.Q4_1, T.Q5_1):
            # ggml's Q8_1 keeps each block's sum as half(d*sum(q)): the min terms use that
            mins = raw.reshape(n_out, -1, GGML_QUANT_SIZES[ggml_type][1])[:, :, 2:4].copy().view(np.float16)[:, :, 0]
            block_sums = act.xhat.astype(np.float64).reshape(n_tok, -1, 32).sum(axis=2)
            expected += (act.xs - block_sums) @ mins.astype(np.float64).T
        got = mm.matmul(w, act)
        scale = np.abs(act.xhat).astype(np.float64) @ np.abs(w_ref).T
        # float32 sums of 512 products: measured at most 3.7e-8 of sum(|x||w|); bound 2x that
        assert np.all(np.abs(got - expected) <= 7.5e-8 * scale), (ggml_type.name, n_tok)
        # and the rounding of the activations is small (bound: 2x the measured, ACT_ROUNDING)
        plain = x.astype(np.float64) @ w_ref.T
        assert np.all(np.abs(got - plain) <= 2 * ACT_ROUNDING[ggml_type] * scale), (ggml_type.name, n_tok)


def _ggml_lane_dot(dw, vals, xq, xd):
    """ggml's AVX2 vec_dot of a 32-value block format with Q8_0 activations, in numpy: per
    block 8 int32 lanes (values 4l..4l+3 of vals * x), acc_l = fma(d_w*d_x, lane, acc_l) over
    blocks (fma: one rounding of the exact double result), then hsum_float_8.
    dw [n, nb] block scales, vals [n, nb, 32] integer values."""
    n, nb = dw.shape
    lanes = (vals * xq.reshape(nb, 32).astype(np.int32)).reshape(n, nb, 8, 4).sum(axis=3).astype(np.float32)
    acc = np.zeros((n, 8), np.float32)
    for b in range(nb):
        d = (dw[:, b] * xd[b]).astype(np.float32)
        acc = (d[:, None].astype(np.float64) * lanes[:, b].astype(np.float64) + acc.astype(np.float64)).astype(np.float32)
    r = [acc[:, i + 4] + acc[:, i] for i in range(4)]
    return ((r[0] + r[2]) + (r[1] + r[3])).astype(np.float32)


def _ggml_repack_dot(dw, vals, xq, xd):
    """llama.cpp's AVX2 ggml_gemv_q4_0_8x8_q8_0 (Q4_0 weights repacked at load) in numpy: per
    block the integer sum of its 32 products, acc = fma(sum, d_w*d_x, acc) over blocks."""
    n, nb = dw.shape
    sums = (vals * xq.reshape(nb, 32).astype(np.int32)).sum(axis=2).astype(np.float32)
    acc = np.zeros(n, np.float32)
    for b in range(nb):
        d = (dw[:, b] * xd[b]).astype(np.float32)
        acc = (sums[:, b].astype(np.float64) * d.astype(np.float64) + acc.astype(np.float64)).astype(np.float32)
    return acc


def _ggml_block_values(raw, qtype):
    """Block scales and integer values of Q4_0 (nibble - 8) or Q5_0 rows ((nibble | fifth bit
    << 4) - 16)."""
    size = GGML_QUANT_SIZES[qtype][1]
    n, nb = raw.shape[0], raw.shape[1] // size
    blocks = raw.reshape(n, nb, size)
    dw = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    qs = blocks[:, :, size - 16:].astype(np.int32)
    vals = np.concatenate([qs & 15, qs >> 4], axis=2)
    if qtype == T.Q5_0:
        qh = blocks[:, :, 2:6].copy().view("<u4")[:, :, 0]
        return dw, vals + 16 * ((qh[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) - 16
    return dw, vals - 8


def _ggml_q4_1_dot(raw, xq, xd, xs):
    """ggml's AVX2 vec_dot_q4_1_q8_1 in numpy: the lanes of _ggml_lane_dot over the nibbles,
    plus summs = fma(m, s, summs) over blocks (s: the Q8_1 block sum)."""
    n, nb = raw.shape[0], raw.shape[1] // 20
    blocks = raw.reshape(n, nb, 20)
    dw = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    m = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
    qs = blocks[:, :, 4:].astype(np.int32)
    summs = np.zeros(n, np.float32)
    for b in range(nb):
        summs = (m[:, b].astype(np.float64) * np.float64(xs[b]) + summs).astype(np.float32)
    return _ggml_lane_dot(dw, np.concatenate([qs & 15, qs >> 4], axis=2), xq, xd) + summs


def _ggml_q5_1_dot(raw, xq, xd, xs):
    """ggml's AVX2 vec_dot_q5_1_q8_1 in numpy: the lanes of _ggml_lane_dot over the 5-bit
    values (nibble | fifth bit << 4, unsigned), plus summs = fma(m, s, summs) over blocks (s: the
    Q8_1 block sum), result hsum_float_8(acc) + summs."""
    n, nb = raw.shape[0], raw.shape[1] // 24
    blocks = raw.reshape(n, nb, 24)
    dw = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    m = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
    qh = blocks[:, :, 4:8].copy().view("<u4")[:, :, 0]
    qs = blocks[:, :, 8:].astype(np.int32)
    vals = np.concatenate([qs & 15, qs >> 4], axis=2) | (((qh[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)
    summs = np.zeros(n, np.float32)
    for b in range(nb):
        summs = (m[:, b].astype(np.float64) * np.float64(xs[b]) + summs).astype(np.float32)
    return _ggml_lane_dot(dw, vals, xq, xd) + summs


def _ggml_reference(raw, qtype, act):
    """What llama.cpp's AVX2 CPU backend computes for one token (numpy replays above): Q4_1
    through vec_dot_q4_1_q8_1, Q8_0 / Q5_0 / Q4_0 (a matrix it does not repack) through their
    vec_dot."""
    xq, xd, xs = act.xq[0], act.xd[0], act.xs[0]
    if qtype == T.Q4_1:
        return _ggml_q4_1_dot(raw, xq, xd, xs)
    if qtype == T.Q8_0:
        blocks = raw.reshape(raw.shape[0], -1, 34)
        dw = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
        return _ggml_lane_dot(dw, blocks[:, :, 2:].view(np.int8).astype(np.int32), xq, xd)
    return _ggml_lane_dot(*_ggml_block_values(raw, qtype), xq, xd)


def _ggml_rows(qtype, n, k, rng):
    raw = random_rows(qtype, n, k, rng)
    if qtype == T.Q8_0:  # ggml's quantizer writes -127..127, never -128
        qs = raw.reshape(n, -1, 34)[:, :, 2:]
        qs[qs == 128] = 129
    return raw


SIMD_TYPES = [T.Q4_1, T.Q8_0, T.Q4_0, T.Q5_0]


@pytest.mark.parametrize("qtype", SIMD_TYPES, ids=lambda t: t.name)
def test_decode_sums_as_llama_cpp_avx2(qtype):
    """One-token products of the 32-value formats (runtime.quants.simd's IR on the file's rows) give
    llama.cpp's AVX2 floats bit for bit, on random blocks and several activation scales (the
    greedy continuations depend on every rounding)."""
    rng = np.random.default_rng(30 + int(qtype))
    raw = _ggml_rows(qtype, 67, 576, rng)
    w = mm.QuantWeight("w", qtype, 576, 67, raw)
    for scale in (0.01, 1.0, 30.0):
        x = (rng.standard_normal((1, 576)) * scale).astype(np.float32)
        got = mm.matmul(w, x)[0]
        want = _ggml_reference(raw, qtype, mm.quantize_for(x, w))
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (qtype.name, scale)


@pytest.mark.parametrize("n_tok", [2, 7, 40])
@pytest.mark.parametrize("qtype", SIMD_TYPES, ids=lambda t: t.name)
def test_batches_sum_as_llama_cpp_avx2(qtype, n_tok):
    """A batch of tokens (rows times 4 tokens per step, the rest one by one) gives every token
    the floats of llama.cpp's vec_dot, as one-token decode does: llama.cpp's batches sum these
    formats in vec_dot's order too, and a token's result does not depend on its batch."""
    rng = np.random.default_rng(80 + int(qtype) + n_tok)
    raw = _ggml_rows(qtype, 35, 576, rng)
    w = mm.QuantWeight("w", qtype, 576, 35, raw)
    x = (rng.standard_normal((n_tok, 576)) * 3).astype(np.float32)
    got = mm.matmul(w, x)
    act = mm.quantize_for(x, w)
    for t in range(n_tok):
        want = _ggml_reference(raw, qtype, mm.quantize_for(x[t:t + 1], w))
        assert np.array_equal(act.xq[t], mm.quantize_for(x[t:t + 1], w).xq[0])
        assert np.array_equal(got[t].view(np.uint32), want.view(np.uint32)), (qtype.name, t)


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q5_K, T.Q5_1, T.Q4_K, T.F16, T.F32], ids=lambda t: t.name)
def test_batches_of_the_other_fused_formats_are_their_one_token_products(qtype):
    """Q6_K, Q5_K, Q5_1, Q4_K, F16 and F32 batches: each token's row is the one-token product's bits (their
    decode orders are checked against ggml below)."""
    rng = np.random.default_rng(90 + int(qtype))
    raw = random_rows(qtype, 24, 512, rng)
    w = mm.QuantWeight("w", qtype, 512, 24, raw)
    x = (rng.standard_normal((9, 512)) * 2).astype(np.float32)
    got = mm.matmul(w, x)
    for t in range(9):
        one = mm.matmul(w, x[t:t + 1])[0]
        assert np.array_equal(got[t].view(np.uint32), one.view(np.uint32)), t



def test_q4_k_batch_tiles_with_leftover_rows_and_tokens():
    """Q4_K's batch on AVX-512 VNNI takes 8 rows x q4_k.TILE_TOKENS tokens per tile, repeating the
    last row and token where the matrix or the batch ends (computed, not stored): with 19 rows and
    TILE_TOKENS + 1 tokens every (row, token) is still the one-token product's bits, and nothing
    past the rows is written. (Elsewhere the row kernel runs: the same check.)"""
    rng = np.random.default_rng(77)
    raw = random_rows(T.Q4_K, 19, 512, rng)
    w = mm.QuantWeight("w", T.Q4_K, 512, 19, raw)
    n_tok = q4_k.TILE_TOKENS + 1
    x = (rng.standard_normal((n_tok, 512)) * 2).astype(np.float32)
    act = mm.quantize_for(x, w)
    buf = np.full(n_tok * 19 + 8, np.float32(7.0))  # 8 floats past the result: must stay untouched
    got = buf[:n_tok * 19].reshape(n_tok, 19)
    q4_k.matmat(mm.read_only_view(raw), mm.HOST_CONTEXT, act.xq, act.xd, act.xs, act.xhat, got)
    assert np.all(buf[n_tok * 19:] == 7.0)
    for t in range(n_tok):
        one = np.empty(19, np.float32)
        q4_k.matvec(raw, mm.HOST_CONTEXT, act.xq[t], act.xd[t], act.xs[t], act.xhat[t], one)
        assert np.array_equal(got[t].view(np.uint32), one.view(np.uint32)), t

_PORTABLE_SCRIPT = """
import sys
import numpy as np
from numba import njit
from llamachat.runtime.quants import simd
from llamachat.runtime.quants import q4_0, q4_1, q4_k, q5_0, q6_k, q8_0
from numba import types
from numba.extending import intrinsic
ISA = simd.Isa("portable")

@intrinsic
def half_to_float(typingctx, bits):
    return types.float32(bits), lambda context, builder, sig, args: simd._halves_to_float(builder, args[0])

@njit
def all_halves(out):
    for i in range(65536):
        out[i] = half_to_float(np.uint16(i))

d = np.load(sys.argv[1])
@njit
def run(kind, w, xq, xd, xs, out):
    for r in range(w.shape[0]):
        if kind == 0:
            out[r] = q4_1.dot(w, r, xq, xd, xs, ISA)
        elif kind == 1:
            out[r] = q8_0.dot(w, r, xq, xd, ISA)
        elif kind == 2:
            out[r] = q4_0.dot(w, r, xq, xd, ISA)
        elif kind == 3:
            out[r] = q5_0.dot(w, r, xq, xd, ISA)
        elif kind == 4:
            out[r] = q6_k.dot(w, r, xq, xd, ISA)
        elif r % 8 == 0 and r + 8 <= w.shape[0]:  # kind 5: Q4_K, 8 rows at a time
            q4_k.dot8(w, r, xq, xd, q4_k.bsum_pairs(xq), out, ISA)
outs = {}
for kind in range(6):
    out = np.empty(d[f"w{kind}"].shape[0], np.float32)
    run(kind, d[f"w{kind}"], d[f"xq{kind}"], d[f"xd{kind}"], d[f"xs{kind}"], out)
    outs[f"out{kind}"] = out

@njit
def run_x8(w, xq, xd, ysum8, out):  # repacked Q4_0 (3 groups): tokens 0-3 by the gemm (groups 0 and 1, group 2 alone), token 4 by the gemv
    q4_0.x8_gemm(w, 0, 8, xq, xd, ysum8, 0, out, ISA)
    q4_0.x8_gemm(w, 16, 16, xq, xd, ysum8, 0, out, ISA)
    for g in range(w.shape[0] // 8):
        q4_0.x8_gemv(w, 8 * g, xq, xd, ysum8, 4, out, ISA)
assert q4_0.GEMM_TOKENS == 4
out = np.empty((5, d["w6"].shape[0]), np.float32)
run_x8(d["w6"], d["xq6"], d["xd6"], d["ys6"], out)
outs["out6"] = out

@njit
def run_q4_1x8(w, xq, xd, xs, out):  # repacked Q4_1: tokens 0-1 and 2-3 by the gemm, token 4 by the gemv
    for g in range(w.shape[0] // 8):
        q4_1.x8_gemm(w, 8 * g, xq, xd, xs, 0, out, ISA)
        q4_1.x8_gemm(w, 8 * g, xq, xd, xs, 2, out, ISA)
        q4_1.x8_gemv(w, 8 * g, xq, xd, xs, 4, out, ISA)
assert q4_1.X8_TOKENS == 2
out = np.empty((5, d["w7"].shape[0]), np.float32)
run_q4_1x8(d["w7"], d["xq7"], d["xd7"], d["xs7"], out)
outs["out7"] = out

@njit
def run_rows(kind, w, xq, xd, xs, out):  # batch forms, 5 tokens: tokens 0-3 in one step, token 4 alone
    for r in range(w.shape[0]):
        if kind == 0:
            q4_1.rows(w, r, xq, xd, xs, out, ISA)
        elif kind == 1:
            q8_0.rows(w, r, xq, xd, out, ISA)
        elif kind == 2:
            q4_0.rows(w, r, xq, xd, out, ISA)
        else:
            q5_0.rows(w, r, xq, xd, out, ISA)
assert simd.ROW_TOKENS == 4
for kind in range(4):
    out = np.empty((5, d[f"w{kind}"].shape[0]), np.float32)
    run_rows(kind, d[f"w{kind}"], d[f"bxq{kind}"], d[f"bxd{kind}"], d[f"bxs{kind}"], out)
    outs[f"batch{kind}"] = out
from llamachat.runtime.quants.matmul import kernel_context
out = np.empty((5, d["w4"].shape[0]), np.float32)  # Q6_K's batch: 5 tokens in one pass of 8 (runtime.quants.kbatch)
q6_k.matmat(d["w4"], kernel_context("portable"), d["bxq4"], d["bxd4"], d["bxs4"], np.zeros(d["bxq4"].shape, np.float32), out)
outs["batch4"] = out
out = np.empty((5, d["w5"].shape[0]), np.float32)  # Q4_K's batch likewise
q4_k.matmat(d["w5"], kernel_context("portable"), d["bxq5"], d["bxd5"], d["bxs5"], np.zeros(d["bxq5"].shape, np.float32), out)
outs["batch5"] = out
from llamachat.runtime.quants import q5_k
out = np.empty((5, d["w8"].shape[0]), np.float32)
unused = np.zeros(d["xd8"].shape, np.float32), np.zeros(d["xq8"].shape, np.float32)  # (Q5_K reads xq and xd only)
q5_k.matmat(d["w8"], kernel_context("portable"), d["xq8"], d["xd8"], *unused, out)  # 5 tokens in one pass of 8
outs["out8"] = out
from llamachat.runtime.quants import q5_1
out = np.empty((5, d["w9"].shape[0]), np.float32)
q5_1.matmat(d["w9"], kernel_context("portable"), d["xq9"], d["xd9"], d["xs9"], unused[1], out)  # tokens 0-3 in one step, token 4 alone
outs["out9"] = out
out = np.empty(d["w9"].shape[0], np.float32)
q5_1.matvec(d["w9"], kernel_context("portable"), d["xq9"][4], d["xd9"][4], d["xs9"][4], unused[1][4], out)
outs["one9"] = out
halves = np.empty(65536, np.float32)
all_halves(halves)
outs["halves"] = halves
np.savez(sys.argv[2], **outs)
"""


def test_portable_ir_gives_the_same_floats(tmp_path):
    """Without AVX2 and F16C (the portable instruction set forced, and code for a generic x86
    CPU; a fresh numba cache so nothing compiled for this one is reused) the portable IR sums the same integer
    lanes in the same order: the same floats as llama.cpp's AVX2 kernels, for one token and in
    the batch kernels; halves convert exactly by integer arithmetic."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(5)
    data, want = {}, {}
    for kind, qtype in enumerate(SIMD_TYPES):
        raw = _ggml_rows(qtype, 21, 256, rng)
        x = (rng.standard_normal((1, 256)) * 2).astype(np.float32)
        act = mm.quantize_for(x, mm.QuantWeight("w", qtype, 256, 21, raw))
        data.update({f"w{kind}": raw, f"xq{kind}": act.xq[0], f"xd{kind}": act.xd[0], f"xs{kind}": act.xs[0]})
        want[kind] = _ggml_reference(raw, qtype, act)
    raw = random_rows(T.Q6_K, 21, 512, rng)  # kind 4
    x = (rng.standard_normal((1, 512)) * 2).astype(np.float32)
    act = mm.quantize_for(x, mm.QuantWeight("w", T.Q6_K, 512, 21, raw))
    data.update({"w4": raw, "xq4": act.xq[0], "xd4": act.xd[0], "xs4": act.xs[0]})
    want[4] = mm.matmul(mm.QuantWeight("w", T.Q6_K, 512, 21, raw), x)[0]  # (replayed above)
    raw = random_rows(T.Q4_K, 16, 512, rng)  # kind 5
    act = mm.quantize_for(x, mm.QuantWeight("w", T.Q4_K, 512, 16, raw))
    data.update({"w5": raw, "xq5": act.xq[0], "xd5": act.xd[0], "xs5": act.xs[0]})
    want[5] = mm.matmul(mm.QuantWeight("w", T.Q4_K, 512, 16, raw), x)[0]  # (replayed above)
    raw = random_rows(T.Q4_0, 24, 256, rng)  # kind 6: repacked Q4_0, 5 tokens
    x5 = (rng.standard_normal((5, 256)) * 2).astype(np.float32)
    act = mm.quantize_for(x5, mm.QuantWeight("w", T.Q4_0, 256, 24, raw))
    data.update({"w6": mm.pack_x8(raw, T.Q4_0), "xq6": act.xq, "xd6": act.xd,
                 "ys6": 8 * act.xq.reshape(5, -1, 32).sum(axis=2, dtype=np.int32)})
    want[6] = np.stack([_ggml_repack_dot(*_ggml_block_values(raw, T.Q4_0), act.xq[t], act.xd[t]) for t in range(5)])
    raw = _ggml_rows(T.Q4_1, 24, 256, rng)  # kind 7: repacked Q4_1, 5 tokens
    w7 = mm.QuantWeight("w", T.Q4_1, 256, 24, raw)
    act = mm.quantize_for(x5, w7)
    data.update({"w7": mm.pack_x8(raw, T.Q4_1), "xq7": act.xq, "xd7": act.xd, "xs7": act.xs})
    want[7] = np.stack([_ggml_reference(raw, T.Q4_1, mm.quantize_for(x5[t:t + 1], w7)) for t in range(5)])
    raw = random_rows(T.Q5_K, 21, 512, rng)  # kind 8: Q5_K, 5 tokens
    x8 = (rng.standard_normal((5, 512)) * 2).astype(np.float32)
    act = mm.quantize_for(x8, mm.QuantWeight("w", T.Q5_K, 512, 21, raw))
    data.update({"w8": raw, "xq8": act.xq, "xd8": act.xd})
    want[8] = np.stack([_ggml_q5_k_dot(raw, act.xq[t], act.xd[t]) for t in range(5)])
    raw = random_rows(T.Q5_1, 21, 256, rng)  # kind 9: Q5_1, 5 tokens
    act = mm.quantize_for(x5, mm.QuantWeight("w", T.Q5_1, 256, 21, raw))
    data.update({"w9": raw, "xq9": act.xq, "xd9": act.xd, "xs9": act.xs})
    want[9] = np.stack([_ggml_q5_1_dot(raw, act.xq[t], act.xd[t], act.xs[t]) for t in range(5)])
    batch_want = {}  # the batch kernels of kinds 0-5 (file layout), 5 tokens: each its one-token floats
    for kind in range(6):
        qtype = (SIMD_TYPES + [T.Q6_K, T.Q4_K])[kind]
        w = mm.QuantWeight("w", qtype, data[f"xq{kind}"].shape[0], data[f"w{kind}"].shape[0], data[f"w{kind}"])
        xb = (rng.standard_normal((5, w.n_in)) * 2).astype(np.float32)
        act = mm.quantize_for(xb, w)
        data.update({f"bxq{kind}": act.xq, f"bxd{kind}": act.xd, f"bxs{kind}": act.xs})
        batch_want[kind] = np.stack([mm.matmul(w, xb[t:t + 1])[0] for t in range(5)])
    np.savez(tmp_path / "in.npz", **data)
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                   env=env, check=True, timeout=600)
    got = np.load(tmp_path / "out.npz")
    for kind, qtype in enumerate(SIMD_TYPES + [T.Q6_K, T.Q4_K, "repacked Q4_0", "repacked Q4_1"]):
        assert np.array_equal(got[f"out{kind}"].view(np.uint32), want[kind].view(np.uint32)), str(qtype)
    assert np.array_equal(got["out8"].view(np.uint32), want[8].view(np.uint32)), "Q5_K"
    assert np.array_equal(got["out9"].view(np.uint32), want[9].view(np.uint32)), "Q5_1"
    assert np.array_equal(got["one9"].view(np.uint32), want[9][4].view(np.uint32)), "Q5_1 one token"
    for kind in range(6):
        assert np.array_equal(got[f"batch{kind}"].view(np.uint32), batch_want[kind].view(np.uint32)), kind
    # half -> float by integer arithmetic (no F16C): every bit pattern, NaNs as NaNs
    want_halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(want_halves)
    assert np.array_equal(np.isnan(got["halves"]), nan)
    assert np.array_equal(got["halves"][~nan].view(np.uint32), want_halves[~nan].view(np.uint32))


def test_instruction_set_is_an_argument_compiled_apart():
    """Forcing the portable instruction set by argument (no environment variable): the batch
    kernels of Q4_1 (file layout and repacked) give this CPU's floats bit for bit, and each
    instruction set is its own compiled signature (so numba's cache never hands one's code to
    the other)."""
    from llamachat.runtime.quants import simd
    from llamachat.runtime.quants import q4_1
    from llamachat.runtime.quants.simd import HOST_ISA

    rng = np.random.default_rng(12)
    raw = _ggml_rows(T.Q4_1, 16, 256, rng)
    x = (rng.standard_normal((5, 256)) * 2).astype(np.float32)
    for packed in (False, True):
        w = mm.QuantWeight("w", T.Q4_1, 256, 16, raw.copy())
        if packed:
            mm.repack(w)
        host = mm.matmul(w, x)
        portable = mm.matmul(w, x, isa="portable")
        assert np.array_equal(host.view(np.uint32), portable.view(np.uint32)), packed
    for kernel in (q4_1.matmat, q4_1.matmat_x8):
        isas = {str(sig[1]) for sig in kernel.signatures}
        assert any("Isa(portable)" in i for i in isas) and any(f"Isa({HOST_ISA.name})" in i for i in isas), isas
    with pytest.raises(ValueError, match="instruction set"):
        mm.kernel_context("sse9")
    if "avx512vnni" not in simd.host_isas():  # (code it cannot run is refused by name)
        with pytest.raises(ValueError, match="avx512vnni"):
            mm.kernel_context("avx512vnni")


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_0], ids=lambda t: t.name)
def test_every_instruction_set_gives_ggml_floats(qtype):
    """Each x86 instruction set this CPU runs (runtime.quants.simd.host_isas: avx512vnni's tiles of
    4 rows x 4 pairs of tokens, a pair per 512-bit vector, and vpdpbusd; avx2; the portable one is test_portable_ir_gives_the_same_floats'),
    forced by argument: a batch of 9 tokens (whole tiles
    and a leftover token) times 22 rows (whole tiles and leftover rows) gives every (row, token)
    ggml's AVX2 vec_dot float, bit for bit; the repacked Q4_0 kernels its gemv's. The tile
    kernels are also emitted as portable IR (the shifted weights and the start -128*sum4(y) give
    the same integer lanes on any CPU)."""
    from numba import njit

    from llamachat.runtime.quants import simd
    from llamachat.runtime.quants import block32, q4_0, q5_0, q8_0

    rng = np.random.default_rng(140 + int(qtype))
    raw = _ggml_rows(qtype, 24, 256, rng)
    x = (rng.standard_normal((9, 256)) * 2).astype(np.float32)
    w = mm.QuantWeight("w", qtype, 256, 22, raw[:22])
    act = mm.quantize_for(x, w)
    want = np.stack([_ggml_reference(raw[:22], qtype, mm.quantize_for(x[t:t + 1], w)) for t in range(9)])
    isas = [isa for isa in simd.host_isas() if isa != "portable"]
    for isa in isas:
        got = mm.matmul(w, x, isa=isa)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), isa
    mod = {T.Q8_0: q8_0, T.Q4_0: q4_0, T.Q5_0: q5_0}[qtype]
    fk = mod.matmat.args[0]  # the format's FormatKernels, which block32.matmat's tiles come from
    portable = simd.Isa("portable")

    @njit
    def tiles(w, xq, xd, out):  # rows 0-19: tokens 0-7 by the 4 x 4-pair tile, token 8 alone
        yp, sp, dp = simd.pair_layout(xq, xd)
        for g in range(5):
            simd.format_tile(fk, w, 4 * g, yp, sp, dp, 0, out, portable)
            simd.format_tile1(fk, w, 4 * g, xq, xd, 8, out, portable)

    out = np.zeros((9, 22), np.float32)
    tiles(raw[:22], act.xq, act.xd, out)
    assert block32.TILE_ROWS == 4 and block32.TILE_PAIRS == 4
    assert np.array_equal(out[:, :20].view(np.uint32), want[:, :20].view(np.uint32))
    if qtype == T.Q4_0:  # repacked: 8 rows x 4 tokens per step, the leftover token alone
        packed = mm.QuantWeight("w", qtype, 256, 24, raw.copy())
        mm.repack(packed)
        vals = _ggml_block_values(raw, qtype)
        want = np.stack([_ggml_repack_dot(*vals, act.xq[t], act.xd[t]) for t in range(9)])
        for isa in isas:
            got = mm.matmul(packed, act, isa=isa)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), isa


def _ggml_q4_k_replay(raw, act, t):
    """ggml's AVX2 ggml_gemv_q4_K_8x8_q8_K (repacked Q4_K) in numpy, token t: per 256-value
    block the exact integer sums isum = sum scale*dot and imin = sum min*(group sum of x), fma'd
    into two chains per block; acc - accm."""
    n = raw.shape[0]
    xq = act.xq[t].astype(np.int64)
    want = np.empty(n, np.float32)
    fma = lambda a, b, c: np.float32(np.float64(a) * np.float64(b) + np.float64(c))  # noqa: E731
    for r in range(n):
        acc = accm = np.float32(0.0)
        for b in range(raw.shape[1] // 144):
            blk = raw[r, b * 144:(b + 1) * 144]
            d, dmin = blk[:4].copy().view(np.float16).astype(np.float32)
            dx = act.xd[t, b * 8]
            isum = imin = 0
            for c in range(4):
                q = blk[16 + 32 * c:48 + 32 * c].astype(np.int64)
                lo, hi = xq[b * 256 + 64 * c:b * 256 + 64 * c + 32], xq[b * 256 + 64 * c + 32:b * 256 + 64 * c + 64]
                s1, m1 = get_scale_min_k4(2 * c, blk[4:16])
                s2, m2 = get_scale_min_k4(2 * c + 1, blk[4:16])
                isum += s1 * int(((q & 15) * lo).sum()) + s2 * int(((q >> 4) * hi).sum())
                imin += m1 * int(lo.sum()) + m2 * int(hi.sum())
            acc, accm = fma(isum, np.float32(d * dx), acc), fma(imin, np.float32(dmin * dx), accm)
        want[r] = acc - accm
    return want


def test_q4_k_sums_as_llama_cpp_repacked_kernels():
    """Q4_K products as llama.cpp's AVX2 ggml_gemv_q4_K_8x8_q8_K for repacked Q4_K (rows a
    multiple of 8), the kernel it uses for one token, for every token of a batch too (its gemm
    for a batch's tokens in fours fmas per 64 values instead: a token's floats there would
    depend on its place in the batch). (Checked against libggml-cpu itself.) Rows past a
    multiple of 8 (the numba loop) sum as the IR rows do."""
    rng = np.random.default_rng(44)
    raw = random_rows(T.Q4_K, 24, 512, rng)
    w = mm.QuantWeight("w", T.Q4_K, 512, 24, raw)
    for n_tok in (1, 5, 19):  # 19: a batch of one full pass of 16 tokens and a partial one
        x = (rng.standard_normal((n_tok, 512)) * 2).astype(np.float32)
        got = mm.matmul(w, x)
        act = mm.quantize_for(x, w)
        for t in range(n_tok):
            want = _ggml_q4_k_replay(raw, act, t)
            assert np.array_equal(got[t].view(np.uint32), want.view(np.uint32)), (n_tok, t)
    # the batch kernel takes any number of rows (one row per pass): 19 rows, the same floats
    part = mm.matmul(mm.QuantWeight("w", T.Q4_K, 512, 19, np.ascontiguousarray(raw[:19])), x)
    assert np.array_equal(part.view(np.uint32), got[:, :19].view(np.uint32))
    full, part = np.empty(24, np.float32), np.empty(19, np.float32)
    q4_k.matvec(raw, mm.HOST_CONTEXT, act.xq[0], act.xd[0], act.xs[0], act.xhat[0], full)
    q4_k.matvec(np.ascontiguousarray(raw[:19]), mm.HOST_CONTEXT, act.xq[0], act.xd[0], act.xs[0], act.xhat[0], part)
    assert np.array_equal(full[:19].view(np.uint32), part.view(np.uint32))


def test_repacked_q4_k_gives_the_file_layouts_floats_on_every_instruction_set():
    """Q4_K matrices repacked at load (AVX-512 VNNI CPUs: 8 rows interleaved, q4_k.pack) give
    the file layout's floats bit for bit - one token (matvec_x8) and batches (the tiles, or
    token by token), on each instruction set this CPU runs, the portable IR by argument - and
    the layout holds the same bytes."""
    from llamachat.runtime.quants import simd

    rng = np.random.default_rng(45)
    raw = random_rows(T.Q4_K, 24, 768, rng)
    packed = q4_k.pack(raw)
    assert np.array_equal(np.sort(packed.reshape(3, -1), axis=1), np.sort(raw.reshape(3, -1), axis=1))
    in_place = raw.copy()
    assert q4_k.pack(in_place, out=in_place) is in_place and np.array_equal(in_place, packed)
    w = mm.QuantWeight("w", T.Q4_K, 768, 24, raw)
    wp = mm.QuantWeight("w", T.Q4_K, 768, 24, packed)
    wp.packed = True
    for n_tok in (1, 5, 13):  # 13: a full tile of 12 tokens and one more
        x = (rng.standard_normal((n_tok, 768)) * 2).astype(np.float32)
        for isa in simd.host_isas():
            want = mm.matmul(w, x, isa=isa)
            got = mm.matmul(wp, x, isa=isa)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (n_tok, isa)
            if n_tok > 1:  # each token of a batch: the one-token kernel's floats
                one = np.concatenate([mm.matmul(wp, x[t:t + 1], isa=isa) for t in range(n_tok)])
                assert np.array_equal(one.view(np.uint32), want.view(np.uint32)), (n_tok, isa)


def _q6_k_values(raw):
    """Q6_K rows -> d [n, nb] and scale * (q - 32) [n, nb, 256] as integers."""
    n, nb = raw.shape[0], raw.shape[1] // 210
    blocks = raw.reshape(n, nb, 210).astype(np.int64)
    vals = np.empty((n, nb, 256), np.int64)
    for j in range(2):
        ql = blocks[:, :, 64 * j:64 * j + 64]
        qh = blocks[:, :, 128 + 32 * j:160 + 32 * j]
        for k in range(4):
            low = (ql[:, :, 32 * (k % 2):32 * (k % 2) + 32] >> (4 * (k // 2))) & 15
            vals[:, :, 128 * j + 32 * k:128 * j + 32 * k + 32] = (low | (((qh >> (2 * k)) & 3) << 4)) - 32
    scales = raw.reshape(n, nb, 210)[:, :, 192:208].view(np.int8).astype(np.int64)
    d = raw.reshape(n, nb, 210)[:, :, 208:210].copy().view(np.float16)[:, :, 0].astype(np.float32)
    return d, vals * np.repeat(scales, 16, axis=2)


def test_q6_k_decode_is_llama_cpp_avx2_order():
    """Q6_K decode sums as ggml's AVX2 vec_dot_q6_K_q8_K: per 256-value block 8 exact integer
    lanes (the lane of value v: (v % 32) // 4), acc_l = fma(dx*d, lane, acc_l), hsum_float_8."""
    rng = np.random.default_rng(46)
    raw = random_rows(T.Q6_K, 19, 512, rng)
    w = mm.QuantWeight("w", T.Q6_K, 512, 19, raw)
    for scale in (0.02, 1.0, 40.0):
        x = (rng.standard_normal((1, 512)) * scale).astype(np.float32)
        got = mm.matmul(w, x)[0]
        act = mm.quantize_for(x, w)
        d, vals = _q6_k_values(raw)
        prods = vals * act.xq[0].astype(np.int64).reshape(2, 256)
        lanes = prods.reshape(19, 2, 8, 8, 4).sum(axis=(2, 4)).astype(np.float64)  # [row, block, lane]
        acc = np.zeros((19, 8), np.float32)
        for b in range(2):
            db = (np.float32(act.xd[0, 8 * b]) * d[:, b]).astype(np.float32)
            acc = (db[:, None].astype(np.float64) * lanes[:, b] + acc.astype(np.float64)).astype(np.float32)
        r = [acc[:, i + 4] + acc[:, i] for i in range(4)]
        want = ((r[0] + r[2]) + (r[1] + r[3])).astype(np.float32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), scale


def _ggml_q5_k_dot(raw, xq, xd):
    """ggml's AVX2 ggml_vec_dot_q5_K_q8_K in numpy, one token: per 256-value block 8 exact
    integer lanes (value v's lane: (v % 32) // 4) of sc * q * y, acc_l = fma(dx*d, lane, acc_l);
    imin = sum over sub-blocks of min * (the sub-block's activation sum), summs =
    fma(-dx*dmin, imin, summs); hsum_float_8(acc) + summs (fma: one rounding of the double)."""
    n, nb = raw.shape[0], raw.shape[1] // 176
    blocks = raw.reshape(n, nb, 176)
    d = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    dmin = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float32)
    b = blocks[:, :, 4:16].astype(np.int64)
    sc = np.concatenate([b[:, :, 0:4] & 63, (b[:, :, 8:12] & 15) | ((b[:, :, 0:4] >> 6) << 4)], axis=2)
    mn = np.concatenate([b[:, :, 4:8] & 63, (b[:, :, 8:12] >> 4) | ((b[:, :, 4:8] >> 6) << 4)], axis=2)
    qh = blocks[:, :, 16:48].astype(np.int64)
    qs = blocks[:, :, 48:176].astype(np.int64)
    vals = np.empty((n, nb, 256), np.int64)
    for c in range(4):
        q = qs[:, :, 32 * c:32 * c + 32]
        vals[:, :, 64 * c:64 * c + 32] = (q & 15) | (((qh >> (2 * c)) & 1) << 4)
        vals[:, :, 64 * c + 32:64 * c + 64] = (q >> 4) | (((qh >> (2 * c + 1)) & 1) << 4)
    y = xq.astype(np.int64).reshape(nb, 8, 32)
    prods = vals.reshape(n, nb, 8, 32) * sc[:, :, :, None] * y
    lanes = prods.reshape(n, nb, 8, 8, 4).sum(axis=(2, 4)).astype(np.float64)  # [row, block, lane]
    imin = (mn * y.sum(axis=2)).sum(axis=2).astype(np.float64)  # [row, block]
    acc = np.zeros((n, 8), np.float32)
    summs = np.zeros(n, np.float32)
    for blk in range(nb):
        dx = np.float32(xd[8 * blk])
        db = (dx * d[:, blk]).astype(np.float32)
        dm = (-dx * dmin[:, blk]).astype(np.float32)
        acc = (db[:, None].astype(np.float64) * lanes[:, blk] + acc.astype(np.float64)).astype(np.float32)
        summs = (dm.astype(np.float64) * imin[:, blk] + summs.astype(np.float64)).astype(np.float32)
    r = [acc[:, i + 4] + acc[:, i] for i in range(4)]
    return ((r[0] + r[2]) + (r[1] + r[3])).astype(np.float32) + summs


def test_q5_k_sums_as_llama_cpp_avx2():
    """Q5_K products (decode, and each token of a batch) as ggml's AVX2 vec_dot_q5_K_q8_K,
    which llama.cpp runs for Q5_K one token and a batch alike (it does not repack Q5_K), bit for
    bit; and close to the float64 product of the dequantized rows (the kernel's own rounding)."""
    rng = np.random.default_rng(47)
    raw = random_rows(T.Q5_K, 21, 768, rng)
    w = mm.QuantWeight("w", T.Q5_K, 768, 21, raw)
    w_ref = gguf_dequantize(raw, T.Q5_K).reshape(21, 768).astype(np.float64)
    for scale in (0.02, 1.0, 40.0):
        x = (rng.standard_normal((6, 768)) * scale).astype(np.float32)
        batch = mm.matmul(w, x)
        for t in range(6):
            one = mm.matmul(w, x[t:t + 1])
            act = mm.quantize_for(x[t:t + 1], w)
            want = _ggml_q5_k_dot(raw, act.xq[0], act.xd[0])
            assert np.array_equal(one[0].view(np.uint32), want.view(np.uint32)), (scale, t)
            assert np.array_equal(batch[t].view(np.uint32), want.view(np.uint32)), (scale, t)
            exact = act.xhat[0].astype(np.float64) @ w_ref.T
            size = np.abs(act.xhat[0]).astype(np.float64) @ np.abs(w_ref).T
            # float32 chains over 3 blocks: measured at most 1.63e-8 of sum(|x||w|) here; bound 2x that
            assert np.all(np.abs(one[0] - exact) <= 3.3e-8 * size), (scale, t)


def test_k_quant_decode_is_the_same_on_every_instruction_set():
    """The one-token K-quant kernels on each instruction set this CPU runs (VNNI's vpdpwssd,
    AVX2's vpmaddwd and vpaddd, the portable IR: the same exact integer lanes) give the floats of
    the host's kernels, which the tests above compare with ggml's."""
    from llamachat.runtime.quants import simd

    rng = np.random.default_rng(48)
    for qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        raw = random_rows(qtype, 16, 512, rng)
        w = mm.QuantWeight("w", qtype, 512, 16, raw)
        x = (rng.standard_normal((1, 512)) * 2).astype(np.float32)
        want = mm.matmul(w, x)
        # (the portable Q4_K and Q6_K one-token kernels: test_portable_ir_gives_the_same_floats)
        for isa in [i for i in simd.host_isas() if i != "portable" or qtype == T.Q5_K]:
            got = mm.matmul(w, x, isa=isa)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (qtype.name, isa)


def test_q5_1_sums_as_llama_cpp_avx2():
    """Q5_1 products (decode, and each token of a batch) as ggml's AVX2 vec_dot_q5_1_q8_1,
    which llama.cpp runs for Q5_1 one token and a batch alike (no repacking, no sgemm kernel),
    bit for bit, on random blocks (every fifth-bit pattern) and several activation scales."""
    rng = np.random.default_rng(51)
    raw = random_rows(T.Q5_1, 37, 576, rng)
    w = mm.QuantWeight("w", T.Q5_1, 576, 37, raw)
    for scale in (0.01, 1.0, 30.0):
        x = (rng.standard_normal((6, 576)) * scale).astype(np.float32)
        batch = mm.matmul(w, x)
        for t in range(6):
            one = mm.matmul(w, x[t:t + 1])
            act = mm.quantize_for(x[t:t + 1], w)
            want = _ggml_q5_1_dot(raw, act.xq[0], act.xd[0], act.xs[0])
            assert np.array_equal(one[0].view(np.uint32), want.view(np.uint32)), (scale, t)
            assert np.array_equal(batch[t].view(np.uint32), want.view(np.uint32)), (scale, t)


def test_f16_decode_sums_as_ggml_vec_dot_f16():
    """F16 one-token products as ggml's AVX2 ggml_vec_dot_f16: activations rounded to half,
    4 accumulators x 8 lanes over 32-value steps (fma), reduced (a0+a2)+(a1+a3), 128-bit
    halves added, two horizontal adds; the K % 32 leftovers added in double."""
    rng = np.random.default_rng(48)
    for k in (576, 592):  # 592: 16 leftovers
        raw = random_rows(T.F16, 13, k, rng)
        w = mm.QuantWeight("w", T.F16, k, 13, raw)
        x = (rng.standard_normal((1, k)) * 3).astype(np.float32)
        got = mm.matmul(w, x)[0]
        xh = x[0].astype(np.float16).astype(np.float64)
        wv = raw.view(np.float16).astype(np.float64)
        np_ = k - k % 32
        acc = np.zeros((13, 4, 8), np.float32)
        for i in range(0, np_, 32):
            prod = wv[:, i:i + 32].reshape(13, 4, 8) * xh[i:i + 32].reshape(4, 8)  # exact in double
            acc = (prod + acc.astype(np.float64)).astype(np.float32)  # one rounding: fma
        v = (acc[:, 0] + acc[:, 2]) + (acc[:, 1] + acc[:, 3])
        t0 = v[:, :4] + v[:, 4:]
        res = ((t0[:, 0] + t0[:, 1]) + (t0[:, 2] + t0[:, 3])).astype(np.float64)
        for i in range(np_, k):
            res += (wv[:, i] * xh[i]).astype(np.float32).astype(np.float64)
        want = res.astype(np.float32)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), k


@pytest.mark.parametrize("k", [592, 1104, 40, 24])
def test_f16_batch_tiles_are_the_one_token_floats_on_every_instruction_set(k):
    """F16 batches go through tiles of rows x tokens (runtime.quants.plain.matmat_f16): for each
    instruction set this CPU runs (portable included), odd row counts (a leftover row, a
    partial work item), token counts that leave a partial tile, and K % 32 != 0 (K = 1104: the
    steps in two blocks, the accumulators kept between them; K = 24: no 32-value step at all),
    every (row, token) is the one-token kernel's float, bit for bit."""
    from llamachat.runtime.quants import plain, simd

    rng = np.random.default_rng(60 + k)
    raw = random_rows(T.F16, 37, k, rng)
    w = mm.QuantWeight("w", T.F16, k, 37, raw)
    x = (rng.standard_normal((plain.TILE_TOKENS + 7, k)) * 3).astype(np.float32)
    assert (37 % plain.TILE_ROWS or plain.TILE_ROWS == 1) and 37 % plain.chunk_rows(37, k - k % 32) and x.shape[0] % plain.TILE_TOKENS
    assert (1104 // 32) > plain.STEPS_IN_L1
    want = None
    for isa in simd.host_isas():
        one = np.stack([mm.matmul(w, x[t:t + 1], isa=isa)[0] for t in range(x.shape[0])])
        if want is None:
            want = one
        assert np.array_equal(one.view(np.uint32), want.view(np.uint32)), isa
        for n in (2, 5, x.shape[0]):
            got = mm.matmul(w, x[:n], isa=isa)
            assert np.array_equal(got.view(np.uint32), want[:n].view(np.uint32)), (isa, n)


def test_f16_activation_rounding_of_a_batch_is_the_per_token_one():
    """Batches round F16 activations with numpy's conversion; single tokens with
    round_to_f16: the same halves, including subnormals, ties and overflow to inf."""
    rng = np.random.default_rng(50)
    x = (rng.standard_normal((5, 64)) * 10).astype(np.float32)
    x[0, :8] = [1e-8, -3e-7, 65519.0, 65520.0, -1e6, 2049.0, 2051.0, 6.1e-5]
    batch = mm.Activations(x, mm.ACT_F16).xhat
    for t in range(5):
        one = mm.Activations(x[t:t + 1], mm.ACT_F16).xhat[0]
        assert np.array_equal(batch[t].view(np.uint32), one.view(np.uint32))
    # every kind of float32 bit pattern (a batch rounds by selects on the bits): numpy's halves
    bits = rng.integers(0, 2**32, size=(2, 8192), dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    got = mm.Activations(x, mm.ACT_F16).xhat
    finite = ~np.isnan(x)
    with np.errstate(over="ignore"):
        want = x[finite].astype(np.float16).astype(np.float32)
    assert np.array_equal(got[finite].view(np.uint32), want.view(np.uint32))
    assert np.isnan(got[~finite]).all()


@pytest.mark.parametrize("n_tok", [1, 2, 11, 40])
def test_repacked_q4_0_sums_as_llama_cpp(n_tok):
    """A repacked Q4_0 matrix (rows a multiple of 8, interleaved 8 at a time as llama.cpp does
    on an AVX2 CPU) gives, for one token and for batches of any length (8 rows x 4 tokens per
    step, the rest token by token), each token's floats of ggml_gemv_q4_0_8x8_q8_0 (its gemm's
    are the same; both orders were also checked against libggml-cpu). The matrix in the file's
    layout stays vec_dot's lane order."""
    rng = np.random.default_rng(60 + n_tok)
    raw = random_rows(T.Q4_0, 48, 576, rng)
    w = mm.QuantWeight("w", T.Q4_0, 576, 48, raw.copy())
    assert mm.repackable(w) and w.kernel == TRAITS[T.Q4_0].kernel
    mm.repack(w)
    assert w.packed and w.kernel == TRAITS[T.Q4_0].packed.kernel and not mm.repackable(w)
    assert w.rows.shape == raw.shape and not np.array_equal(w.rows, raw)
    x = (rng.standard_normal((n_tok, 576)) * 2).astype(np.float32)
    got = mm.matmul(w, x)
    unpacked = mm.matmul(mm.QuantWeight("w", T.Q4_0, 576, 48, raw), x)
    act = mm.quantize_for(x, w)
    for t in range(n_tok):
        want = _ggml_repack_dot(*_ggml_block_values(raw, T.Q4_0), act.xq[t], act.xd[t])
        assert np.array_equal(got[t].view(np.uint32), want.view(np.uint32)), t
        lanes = _ggml_lane_dot(*_ggml_block_values(raw, T.Q4_0), act.xq[t], act.xd[t])
        assert np.array_equal(unpacked[t].view(np.uint32), lanes.view(np.uint32)), t


def test_repacked_q4_0_batch_steps_with_an_odd_group_and_leftover_tokens():
    """The repacked Q4_0 batch takes two 8-row groups x GEMM_TOKENS(_VNNI) tokens per step (an
    odd last group paired with itself), the leftover tokens one by one: with 5 groups and 19
    tokens (two 8-token steps and 3 left; four 4-token steps and 3 left) each (row, token) on
    every instruction set this CPU runs is the one-token kernel's float, and nothing before or
    after the result is written."""
    from llamachat.runtime.quants import q4_0, simd

    rng = np.random.default_rng(78)
    raw = random_rows(T.Q4_0, 40, 256, rng)
    w = mm.QuantWeight("w", T.Q4_0, 256, 40, raw.copy())
    mm.repack(w)
    x = (rng.standard_normal((19, 256)) * 2).astype(np.float32)
    act = mm.quantize_for(x, w)
    vals = _ggml_block_values(raw, T.Q4_0)
    want = np.stack([_ggml_repack_dot(*vals, act.xq[t], act.xd[t]) for t in range(19)])
    for isa in [i for i in simd.host_isas() if i != "portable"]:  # (portable: test_portable_ir_gives_the_same_floats)
        buf = np.full(19 * 40 + 16, np.float32(7.0))  # 8 guard floats each side
        got = buf[8:8 + 19 * 40].reshape(19, 40)
        q4_0.matmat_x8(mm.read_only_view(w.rows), mm.kernel_context(isa), act.xq, act.xd, act.xs, act.xhat, got)
        assert np.all(buf[:8] == 7.0) and np.all(buf[-8:] == 7.0), isa
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), isa


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q4_0])
def test_repacked_rows_give_the_file_rows_floats(qtype):
    """Repacked Q4_1 (8 rows interleaved: vec_dot_q4_1_q8_1's lanes for 4 rows per vector) gives
    llama.cpp's one-token floats bit for bit, like the file's rows, for one token and batches."""
    rng = np.random.default_rng(70 + int(qtype))
    raw = _ggml_rows(qtype, 40, 576, rng)
    plain = mm.QuantWeight("w", qtype, 576, 40, raw)
    packed = mm.QuantWeight("w", qtype, 576, 40, raw.copy())
    mm.repack(packed)
    assert packed.packed and packed.kernel != plain.kernel
    for scale in (0.01, 1.0, 30.0):
        x = (rng.standard_normal((1, 576)) * scale).astype(np.float32)
        got = mm.matmul(packed, x)[0]
        act = mm.quantize_for(x, plain)
        want = _ggml_reference(raw, qtype, act)  # vec_dot's lanes: the file's rows
        assert np.array_equal(mm.matmul(plain, x)[0].view(np.uint32), want.view(np.uint32)), scale
        if qtype == T.Q4_0:  # repacked, llama.cpp sums block by block (ggml_gemv_q4_0_8x8_q8_0)
            want = _ggml_repack_dot(*_ggml_block_values(raw, qtype), act.xq[0], act.xd[0])
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), scale
    for n_tok in (2, 3, 40):  # batches: 8 rows x 2 tokens per step, the leftover token alone
        x = (rng.standard_normal((n_tok, 576)) * 2).astype(np.float32)
        batch = mm.matmul(packed, x)
        if qtype == T.Q4_1:  # either layout, the one-token floats
            assert np.array_equal(batch.view(np.uint32), mm.matmul(plain, x).view(np.uint32))
        else:  # Q4_0 batches: the integer gemm, per token ggml_gemv_q4_0_8x8_q8_0's floats
            act = mm.quantize_for(x, packed)
            for t in range(n_tok):
                want = _ggml_repack_dot(*_ggml_block_values(raw, qtype), act.xq[t], act.xd[t])
                assert np.array_equal(batch[t].view(np.uint32), want.view(np.uint32)), t


def test_q4_0_repacked_layout():
    """pack_x8 (Q4_0) per 8 rows and block: the 8 scales, then rows 0,1,4,5 and 2,3,6,7, each
    quant bytes 0-7 then 8-15; in place gives the same bytes; only matrices llama.cpp repacks
    qualify."""
    rng = np.random.default_rng(9)
    raw = random_rows(T.Q4_0, 16, 64, rng)  # 2 groups x 2 blocks
    packed = mm.pack_x8(raw, T.Q4_0)
    blocks = raw.reshape(16, 2, 18)
    for g in range(2):
        for b in range(2):
            got = packed.reshape(2, 2, 144)[g, b]
            rows = blocks[8 * g:8 * g + 8, b]
            assert np.array_equal(got[:16], rows[:, :2].ravel())
            order = [0, 1, 4, 5, 0, 1, 4, 5, 2, 3, 6, 7, 2, 3, 6, 7]
            halves = [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4
            want = np.concatenate([rows[r, 2 + 8 * h:10 + 8 * h] for r, h in zip(order, halves)])
            assert np.array_equal(got[16:], want)
    inplace = raw.copy()
    assert mm.pack_x8(inplace, T.Q4_0, out=inplace) is inplace and np.array_equal(inplace, packed)
    assert not mm.repackable(mm.QuantWeight("w", T.Q4_0, 64, 12, random_rows(T.Q4_0, 12, 64, rng)))
    assert not mm.repackable(mm.QuantWeight("w", T.Q5_0, 64, 16, random_rows(T.Q5_0, 16, 64, rng)))


def test_q8_k_scale_takes_the_first_value_of_largest_magnitude():
    # ggml's quantize_row_q8_K keeps the first value of the largest |x|, with its sign: a tie
    # between +m and -m decides the sign of every quant of the block; a zero block gives zeros
    x = np.zeros((2, 512), np.float32)
    x[0, :256] = np.linspace(-0.5, 0.5, 256, dtype=np.float32)
    x[0, 10], x[0, 200] = -2.0, 2.0
    x[1, 256:] = np.linspace(-1.0, 0.25, 256, dtype=np.float32)
    x[1, 300], x[1, 301] = 3.0, -3.0
    act = mm.Activations(x, mm.ACT_Q8_K)
    with np.errstate(divide="ignore", invalid="ignore"):  # (the reference's zero block: NaN, here 0)
        ref = np.nan_to_num(np.stack([numpy_q8(r, 256, False) for r in x]))
    assert np.array_equal(act.xhat, ref)
    assert act.xq[0, 10] == -127 and act.xq[0, 200] == 127 and act.xq[1, 300] == -127
    assert not act.xq[1, :256].any() and not act.xd[1, :8].any()
    one = mm.Activations(x[1:], mm.ACT_Q8_K)  # one token: the serial kernel
    assert np.array_equal(one.xq, act.xq[1:]) and np.array_equal(one.xd, act.xd[1:])
