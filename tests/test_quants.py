"""The block formats (runtime/quants): dequantize and quantize against gguf-py's numpy
implementation (gguf.quants) on random blocks and on the real SmolLM2 tensors, ggml's scalar
rounding helpers against numpy, and the registry's argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

from llamachat.runtime.quants import FORMATS, dequantize, quantize, row_nbytes
from llamachat.runtime.quants.rounding import fp16_to_fp32, fp32_to_fp16_bits, nearest_int, roundf

BLOCK_FORMATS = [t for t in FORMATS if GGML_QUANT_SIZES[t][0] > 1]


def random_blocks(t: T, n_rows: int, n_per_row: int, seed: int = 0) -> np.ndarray:
    """Random raw rows whose f16 scales are finite (random bytes elsewhere: every quant value)."""
    rng = np.random.default_rng(seed)
    nbytes = row_nbytes(t, n_per_row)
    raw = rng.integers(0, 256, size=(n_rows, nbytes), dtype=np.uint8)
    # the f16 scales (d, and dmin or m) get finite values; where they sit depends on the layout
    bs, ts = GGML_QUANT_SIZES[t]
    blocks = raw.reshape(n_rows, -1, ts)
    halves = rng.uniform(-2.0, 2.0, size=blocks.shape[:2] + (2,)).astype(np.float16).view(np.uint8)
    if t in (T.Q4_K, T.Q5_K, T.Q4_1, T.Q5_1):  # d and dmin (or m) at the start of the block
        blocks[..., 0:4] = halves
    elif t == T.Q2_K:  # d and dmin at the end
        blocks[..., ts - 4:ts] = halves
    elif t in (T.Q3_K, T.Q6_K):  # d at the end
        blocks[..., ts - 2:ts] = halves[..., 0:2]
    else:  # d first
        blocks[..., 0:2] = halves[..., 0:2]
    return raw


@pytest.mark.parametrize("t", BLOCK_FORMATS, ids=lambda t: t.name)
def test_dequantize_matches_gguf_py_on_random_blocks(t):
    n = 512 if GGML_QUANT_SIZES[t][0] == 256 else 96
    raw = random_blocks(t, 7, n)
    ours = dequantize(raw, t, n)
    ref = gq.dequantize(raw, t).reshape(7, n)
    assert ours.dtype == np.float32 and ours.shape == (7, n)
    np.testing.assert_array_equal(ours, ref)
    # 1-D input is the same rows
    np.testing.assert_array_equal(dequantize(raw.reshape(-1), t, n), ours)


@pytest.mark.parametrize("t", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_plain_formats_round_trip(t):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    q = quantize(x, t)
    assert q.shape == (5, row_nbytes(t, 64))
    ref = x.view(np.uint8) if t == T.F32 else gq.quantize(x, t).view(np.uint8).reshape(5, -1)
    np.testing.assert_array_equal(q, ref)
    np.testing.assert_array_equal(dequantize(q, t, 64), gq.dequantize(q, t).reshape(5, 64))


def test_bf16_nan_and_rounding():
    x = np.array([[np.nan, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -np.inf, 3.0e38]], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, T.BF16), gq.quantize(x, T.BF16).view(np.uint8).reshape(1, -1))


GGUF_PY_QUANTIZE = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


@pytest.mark.parametrize("t", [t for t in GGUF_PY_QUANTIZE if t in FORMATS], ids=lambda t: t.name)
def test_quantize_matches_gguf_py(t):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 256)) * rng.uniform(0.001, 10, size=(16, 1))).astype(np.float32)
    x[3, :32] = 0.0  # an all-zero block: d = 0, the 1/d guard
    x[4, 32:64] = 5.0  # a constant block
    ours = quantize(x, t)
    ref = gq.quantize(x, t).reshape(16, -1)
    np.testing.assert_array_equal(ours, ref)


# relative RMS error of quantize -> dequantize on these Gaussian rows, measured with the code
# that reproduces ggml's bytes (Q8_0 0.0053, Q4_0 0.0859, Q4_1 0.0783, Q5_0 0.0421, Q5_1 0.0387,
# Q2_K 0.2972, Q3_K 0.1496, Q4_K 0.0713, Q5_K 0.0368, Q6_K 0.0173); the bounds are 2x that
ROUND_TRIP_RMS = {T.Q8_0: 0.0106, T.Q4_0: 0.172, T.Q4_1: 0.157, T.Q5_0: 0.0842, T.Q5_1: 0.0774,
                  T.Q2_K: 0.595, T.Q3_K: 0.30, T.Q4_K: 0.143, T.Q5_K: 0.0736, T.Q6_K: 0.0346}


@pytest.mark.parametrize("t", BLOCK_FORMATS, ids=lambda t: t.name)
def test_quantize_round_trip_is_close(t):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    y = dequantize(quantize(x, t), t, 512)
    rms = np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2))
    assert rms < ROUND_TRIP_RMS[t], (t.name, rms)


def test_fp32_to_fp16_matches_numpy_round_to_nearest_even():
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    # plus the edges: halfway cases, overflow threshold, subnormals, zeros, inf
    edges = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e9, -1e9, np.inf, -np.inf, 2**-24, 2**-25,
                      3 * 2**-26, 2**-14, 2**-14 - 2**-25, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 5.960464e-08],
                     dtype=np.float32)
    x = np.concatenate([x, edges, (rng.standard_normal(5000) * 0.01).astype(np.float32)])
    ours = np.array([fp32_to_fp16_bits(v) for v in x], dtype=np.int64)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).view(np.uint16).astype(np.int64)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(ours[finite], ref[finite])
    assert np.all(ours[~finite] & 0x7FFF == 0x7E00)


def test_f16_rows_quantize_like_numpy_round_to_nearest_even():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2**32, size=40000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 1e9, np.inf, -np.inf, 2**-24, 2**-25,
                      -(2**-25), 3 * 2**-26, 2**-14, 2**-14 - 2**-25, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 1e-30],
                     dtype=np.float32)
    x = np.concatenate([x, edges, (rng.standard_normal(4000) * 0.01).astype(np.float32)]).reshape(2, -1)
    ours = quantize(x, T.F16).view(np.uint16)
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], ref[~nan])
    assert np.all(ours[nan] & 0x7FFF == 0x7E00)


def test_fp16_to_fp32_exact_for_every_half():
    h = np.arange(65536, dtype=np.uint16)
    ours = np.array([fp16_to_fp32(v) for v in h], dtype=np.float32)
    ref = h.view(np.float16).astype(np.float32)
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
    assert same.all()


def test_f16_rows_dequantize_exactly_for_every_half():
    h = np.arange(65536, dtype=np.uint16).reshape(64, 1024)
    ours = dequantize(h.view(np.uint8), T.F16, 1024)
    ref = h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(ours.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    assert np.isnan(ours[nan]).all()


def test_nearest_int_and_roundf():
    assert [nearest_int(np.float32(v)) for v in (0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998)] == [0, 2, 2, 0, -2, 2]
    assert [roundf(np.float32(v)) for v in (0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997)] == [1, 2, 3, -1, -3, 0]


def test_registry_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 32"):
        row_nbytes(T.Q4_0, 48)
    with pytest.raises(ValueError, match="not supported"):
        row_nbytes(T.IQ2_XXS, 256)
    with pytest.raises(ValueError, match="whole"):
        dequantize(np.zeros(19, np.uint8), T.Q4_0, 32)


@pytest.mark.real_model
def test_dequantize_real_smollm2_tensors(smollm2_path):
    from llamachat.runtime.gguf.reader import GGUFFile

    with GGUFFile(smollm2_path) as g:
        seen = set()
        for name, info in g.tensors.items():
            if info.ggml_type in seen and not name.startswith("blk.0."):
                continue
            seen.add(info.ggml_type)
            n = info.shape[0]
            ours = dequantize(info.rows(), info.ggml_type, n)
            ref = gq.dequantize(np.asarray(info.rows()), info.ggml_type).reshape(-1, n)
            np.testing.assert_array_equal(ours, ref, err_msg=name)
        assert {T.Q4_1, T.Q8_0, T.F32} <= seen


# K-quant quantize: Q4_K and Q6_K are checked against llama-quantize's own output on SmolLM2
# (tests/test_quantize_model.py); llama.cpp's reference data has no Q2_K, Q3_K or Q5_K file, so
# these hashes pin the bytes of ggml's quantize_row_q*_K_ref on a fixed input. They were
# produced by ggml's reference C functions (compiled with gcc, no FMA contraction, like
# ggml-base) on exactly this input, and our kernels reproduced them byte for byte.
K_QUANT_GOLDEN = {
    T.Q2_K: "4531ad8affa62cd8923b2345c4148d5e128289e20138cf865adcf481486e1c95",
    T.Q3_K: "2c99d360dce22868ad1c8a4ac7b3d935e40119d7eef362ef05db87621d94a084",
    T.Q4_K: "a0a7bfd004783e37003f56bfaa4b53b76bcf1eb5bf94ccab7f9217ae3358a7f0",
    T.Q5_K: "b35ba2d11f253d6e0d591d03a3c304dd11d1d2ace6831d44d4217af83835b222",
    T.Q6_K: "207720b615fb016aab44ea2e343b835185cb30373104ebabd3997059c9031d62",
}


def k_quant_golden_input() -> np.ndarray:
    rng = np.random.default_rng(20240601)
    x = rng.standard_normal((12, 512)).astype(np.float32) * 0.02
    x[4:8] = (rng.standard_t(2, (4, 512)) * 0.01).astype(np.float32)  # heavy tails
    x[8, :256] = 0.0  # an all-zero super-block
    x[9] = np.abs(x[9])  # no negative values: min = 0
    x[10] = -np.abs(x[10])  # no positive values
    x[11] = np.round(x[11] * 1000) / 1000  # many ties
    return x


def quantized_sha256(x: np.ndarray, t) -> str:
    import hashlib

    return hashlib.sha256(quantize(x, t).tobytes()).hexdigest()


@pytest.mark.parametrize("t", list(K_QUANT_GOLDEN), ids=lambda t: t.name)
def test_k_quant_quantize_matches_ggml_reference_bytes(t):
    assert quantized_sha256(k_quant_golden_input(), t) == K_QUANT_GOLDEN[t]


# The same functions on values past float32's comfort: make_qx_quants' and make_q3_quants' x^2
# weights overflow (sum w*x*l = inf) from |x| ~ 2e12, so the super-block scale is inf and
# quantize_row_q3_K/q6_K_ref's 1/iscale divides by zero (C: -inf), and inf values give
# make_qkx2_quants a range of inf; NaN values round to quant 0 in ggml's nearest_int. ggml writes
# non-finite scales without stopping; so must we (hashes of ggml's bytes on this input, produced
# as K_QUANT_GOLDEN's).
K_QUANT_HUGE_GOLDEN = {
    T.Q2_K: "95eaaed41273347a90c8c490ac9a6445ecb078d221a13b6a1cd1b3f301556b3c",
    T.Q3_K: "0e72a663778c01297aa742cfcff30ae65c0be3d08909f27129357bf95b1ef056",
    T.Q4_K: "90e1fe90ae290214ed5adf6f1964576364580754ac3609cf4d9c17301700e2f2",
    T.Q5_K: "b2e8178be8a42bf6384e0c63648d9fc822ddb825a609cecf7ab01df09d3471dd",
    T.Q6_K: "d1ccb1379496b759b2a863c9538d31e305c01a4654ef0ccfea0b1a9d487e533a",
}


def k_quant_huge_input() -> np.ndarray:
    rng = np.random.default_rng(20261207)
    x = rng.standard_normal((7, 256)).astype(np.float32)
    x[0] *= np.float32(7e12)
    x[1] *= np.float32(3e13)
    x[1, :16] *= np.float32(1e-13)  # one sub-block of ordinary values among huge ones
    x[2] *= np.float32(1e30)
    x[3, 5] = np.inf
    x[4, 7] = -np.inf
    x[4, 9] = np.float32(3e38)
    with np.errstate(over="ignore"):
        x[5] *= np.float32(3e38)  # some overflow to +-inf
    x[6, [3, 40, 41]] = np.nan
    return x


@pytest.mark.parametrize("t", list(K_QUANT_HUGE_GOLDEN), ids=lambda t: t.name)
def test_k_quant_quantize_of_huge_values_matches_ggml_and_does_not_raise(t):
    assert quantized_sha256(k_quant_huge_input(), t) == K_QUANT_HUGE_GOLDEN[t]
