"""Products of quantized weight matrices with float activations: `y = x @ W.T`.

W is a GGUF tensor's rows of ggml blocks (`TensorInfo.rows()`, the memory map, or a copy);
x is float32 [T, K] (T tokens). Numerics follow llama.cpp's CPU backend: before a product the
activations are converted to the weight format's "vec_dot_type" (Q8_0 for Q8_0/Q4_0/Q5_0, Q8_1
for Q4_1/Q5_1, Q8_K for the K-quants, F16 for F16, BF16 for BF16), so our sums use the same
rounded activations as llama.cpp's integer dot products.

One arithmetic for one token and for batches: each (row, token) of a product is summed the
same way whatever the batch, so a token's logits do not depend on how its prompt was split:
- the hot formats (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, F16, F32): kernels reading the blocks
  directly (runtime.simd, Q5_K's in quants/q5_k.py: ggml's AVX2 loops as LLVM vector IR), integer dot products against
  the int8 activations, rows split over threads; llama.cpp's floats bit for bit. Batches take
  the same sums several tokens per step (each row's blocks unpacked once for 4 tokens).
- Q4_0 and Q4_1 matrices with rows a multiple of 8 are repacked at load (`repack`: 8 rows
  interleaved block by block, into the stacked copy decode uses anyway). Q4_0, as llama.cpp
  repacks it: 8 rows x 4 tokens per step (1 for decode), the same floats as its kernels for
  repacked Q4_0. Q4_1: vec_dot_q4_1_q8_1's lanes, 8 rows x 2 tokens per step (1 for decode).
- the other formats: a tile of rows dequantized to float32 once, multiplied by the rounded
  activations with numpy's BLAS. The tile is transient; weights stay quantized in the mmap.

Layouts (ggml-common.h), per block, little endian, `d`/`m`/`dmin` are IEEE half floats:
  Q8_0  34 B / 32: d, int8 qs[32]                                  w = d*q
  Q4_0  18 B / 32: d, qs[16] (low nibble = weight j, high = j+16)  w = d*(q-8)
  Q4_1  20 B / 32: d, m, qs[16] (same nibble order)                w = d*q + m
  Q4_K 144 B / 256: d, dmin, scales[12] (8 x 6-bit scale/min pairs), qs[128]
       (64-weight chunks: 32 bytes, low nibbles = first 32, high = next 32)  w = d*sc*q - dmin*mn
  Q6_K 210 B / 256: ql[128], qh[64], int8 scales[16], d             w = d*sc*(q-32)
"""

from __future__ import annotations

import math

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from numba import njit, prange

from .simd import (Q4_0X8_ROWS_HI, Q4_0X8_ROWS_LO, Q4_1X8_TOKENS, Q4_K_TOKENS, ROW_TOKENS, f16_dot, f16_rows1, f16_rows4,
                   q4_0_dot, q4_0_rows1, q4_0_rows4, q4_0x8_gemm, q4_0x8_gemv, q4_1_dot, q4_1_rows1, q4_1_rows4, q4_1x8_gemm,
                   q4_1x8_gemv, q4_k_dot8, q4_k_gemm8, q5_0_dot, q5_0_rows1, q5_0_rows4, q6_k_dot, q6_k_rows1, q6_k_rows4, q8_0_dot,
                   q8_0_rows1, q8_0_rows4)
from .quants import q5_k

# --- activation formats (llama.cpp's vec_dot_type of each weight format) -------------------

ACT_F32, ACT_F16, ACT_BF16, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = range(6)

VEC_DOT_TYPE = {
    T.F32: ACT_F32, T.F16: ACT_F16, T.BF16: ACT_BF16,
    T.Q8_0: ACT_Q8_0, T.Q4_0: ACT_Q8_0, T.Q5_0: ACT_Q8_0,
    T.Q4_1: ACT_Q8_1, T.Q5_1: ACT_Q8_1,
    T.Q2_K: ACT_Q8_K, T.Q3_K: ACT_Q8_K, T.Q4_K: ACT_Q8_K, T.Q5_K: ACT_Q8_K, T.Q6_K: ACT_Q8_K,
}
SUPPORTED_TYPES = frozenset(VEC_DOT_TYPE)
# formats with a fused decode kernel below
FUSED_TYPES = frozenset({T.F32, T.F16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q4_K, T.Q5_K, T.Q6_K})
# Batches multiply with the same per-(row, token) arithmetic as one token, for every fused
# format: a token's logits do not depend on how its prompt was split, and they are llama.cpp's
# (its CPU batches sum as its vec_dot does for Q4_1/Q5_0/Q6_K/Q8_0 - llamafile's sgemm has no
# kernel for the first three and sums Q8_0 in vec_dot's lane order - and through its repacked
# gemm/gemv for Q4_0 and Q4_K, whose per-(row, token) chains we replay). Formats without a fused
# kernel multiply through float32 tiles and BLAS.
# rows dequantized at once on the tile path (bounds the transient float32 tile)
TILE_ROWS = 2048

# half float -> float32 for every bit pattern (block scales are read through this table)
F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, inline="always")
def _f16(table, row, o):
    return table[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]


@njit(cache=True, inline="always")
def round_to_f16(x):
    """x rounded to the nearest half float (ties to even), as float32: ggml's FP32_TO_FP16."""
    ax = abs(x)
    if ax == 0.0 or not math.isfinite(x):
        return np.float32(x)
    if ax >= 65520.0:
        return np.float32(math.copysign(math.inf, x))
    if ax < 6.103515625e-05:  # half subnormals: a fixed quantum of 2**-24
        return np.float32(np.rint(x * 16777216.0) / 16777216.0)
    m, e = math.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1: 11 significant bits in a half
    return np.float32(math.ldexp(np.rint(m * 2048.0), e - 11))


@njit(cache=True, inline="always")
def _round_to_bf16(x):
    # ggml's FP32_TO_BF16: round to nearest even on the top 16 bits (NaN aside)
    if x == 0.0 or not math.isfinite(x):
        return np.float32(x)
    m, e = math.frexp(x)
    return np.float32(math.ldexp(np.rint(m * 256.0), e - 8))


@njit(cache=True)
def quantize_activations(x, mode, xq, xd, xs, xhat):
    """x f32 [T, K] -> the activations llama.cpp's dot products see.

    Q8_0/Q8_1: per 32 values d = amax/127 (stored as half), q = round(x/d); Q8_1 adds the
    block sum s = half(d*sum(q)). Q8_K: per 256 values iscale = -127/max (max: the signed
    value of largest magnitude), q = min(127, round(iscale*x)), d = 1/iscale as float32.
    Fills xq int8 [T, K], xd f32 [T, K/32] (each 32-group's scale), xs f32 [T, K/32] (each
    32-group's d*sum(q), used for the Q4_1/Q4_K offsets) and xhat f32 [T, K] = the rounded
    activations as floats (for the BLAS path).
    """
    n_tok, k = x.shape
    for t in range(n_tok):
        if mode == ACT_F32:
            for i in range(k):
                xhat[t, i] = x[t, i]
        elif mode == ACT_F16:
            for i in range(k):
                xhat[t, i] = round_to_f16(x[t, i])
        elif mode == ACT_BF16:
            for i in range(k):
                xhat[t, i] = _round_to_bf16(x[t, i])
        elif mode == ACT_Q8_0 or mode == ACT_Q8_1:
            for b in range(k // 32):
                amax = np.float32(0.0)
                for j in range(32):
                    amax = max(amax, abs(x[t, b * 32 + j]))
                d = amax / np.float32(127.0)
                # ggml's x86 quantize_row_q8_0/q8_1 scale by 127/amax (not 1/d)
                inv = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
                dh = round_to_f16(d)
                total = 0
                for j in range(32):
                    q = np.int32(np.rint(x[t, b * 32 + j] * inv))
                    xq[t, b * 32 + j] = q
                    xhat[t, b * 32 + j] = dh * q
                    total += q
                xd[t, b] = dh
                s = dh * np.float32(total)
                xs[t, b] = round_to_f16(d * np.float32(total)) if mode == ACT_Q8_1 else s
        else:  # ACT_Q8_K
            for b in range(k // 256):
                amax = np.float32(0.0)
                vmax = np.float32(0.0)
                for j in range(256):
                    v = x[t, b * 256 + j]
                    if abs(v) > amax:
                        amax = abs(v)
                        vmax = v
                if amax == 0.0:
                    for j in range(256):
                        xq[t, b * 256 + j] = 0
                        xhat[t, b * 256 + j] = 0.0
                    for g in range(8):
                        xd[t, b * 8 + g] = 0.0
                        xs[t, b * 8 + g] = 0.0
                    continue
                iscale = np.float32(-127.0) / vmax
                d = np.float32(1.0) / iscale
                for g in range(8):
                    total = 0
                    for j in range(32):
                        i = b * 256 + g * 32 + j
                        q = min(127, np.int32(np.rint(iscale * x[t, i])))
                        xq[t, i] = q
                        xhat[t, i] = d * q
                        total += q
                    xd[t, b * 8 + g] = d
                    xs[t, b * 8 + g] = d * np.float32(total)


@njit(cache=True, parallel=True)
def _quantize_activations_rows(x, mode, xq, xd, xs, xhat):
    """quantize_activations with the tokens split over threads (a prompt's batch)."""
    for t in prange(x.shape[0]):
        quantize_activations(x[t:t + 1], mode, xq[t:t + 1], xd[t:t + 1], xs[t:t + 1], xhat[t:t + 1])


# --- fused decode kernels: one output row per iteration, rows split over threads ------------

# The 32-value formats multiply through runtime.simd: ggml's AVX2 block dot products written as
# LLVM vector IR, reading the file's own rows (see that module). The same integer lanes summed
# in the same order give llama.cpp's floats bit for bit; the greedy continuations depend on it
# (llama.cpp's F16 KV cache rounds these outputs, and this small model amplifies one flipped
# rounding). `table` is unused by them (the IR converts half floats itself); it keeps one
# signature for every kernel.


@njit(cache=True, parallel=True)
def _matvec_q4_1(w, table, xq, xd, xs, out):
    """w = d*q + m, as ggml's AVX2 vec_dot_q4_1_q8_1: per block 8 integer lanes (values
    4l..4l+3; the low nibbles are values 0-15, the high ones 16-31), each accumulated over
    blocks as fma(d*dx, lane, acc_l); the min terms fma'd into one scalar (m * the Q8_1 block
    sum); result = hsum_float_8(acc) + mins."""
    for r in prange(w.shape[0]):
        out[r] = q4_1_dot(w, r, xq, xd, xs)


@njit(cache=True, parallel=True)
def _matvec_q8_0(w, table, xq, xd, out):
    """As ggml's AVX2 vec_dot_q8_0_q8_0 (and llamafile's tinyBLAS_Q0_AVX, the same order): per
    block 8 integer lanes, acc_l = fma(d_w*d_x, lane, acc_l), result hsum_float_8(acc). (The
    tied output product of SmolLM2: the logits.)"""
    for r in prange(w.shape[0]):
        out[r] = q8_0_dot(w, r, xq, xd)


@njit(cache=True, parallel=True)
def _matvec_q4_0(w, table, xq, xd, out):
    """w = d*(q-8), a Q4_0 matrix llama.cpp leaves in the file's layout (rows not a multiple of
    8, or the token embeddings as a tied output): ggml's AVX2 vec_dot_q4_0_q8_0, Q8_0's lanes
    and order."""
    for r in prange(w.shape[0]):
        out[r] = q4_0_dot(w, r, xq, xd)


GEMM_TOKENS = 4  # tokens per q4_0x8_gemm step (2, 3 and 4 measured alike)


@njit(cache=True)
def _block_sums8(xq, ysum8):
    """ysum8[t, b] = 8 * the sum of token t's int8 activations in block b (the -8 of Q4_0's
    quants, taken out of the integer products)."""
    for t in range(xq.shape[0]):
        for b in range(ysum8.shape[1]):
            s = np.int32(0)
            for j in range(32):
                s += np.int32(xq[t, 32 * b + j])
            ysum8[t, b] = 8 * s


@njit(cache=True, parallel=True)
def _matvec_q4_0x8(w, table, xq, xd, out):
    """One token times a repacked Q4_0 matrix (`repack`), as llama.cpp's
    ggml_gemv_q4_0_8x8_q8_0: per row and block the exact integer sum of the 32 products, acc =
    fma(sum, d*dx, acc), one chain per row; 8 rows per step (runtime.simd.q4_0x8_gemv)."""
    k = xq.shape[0]
    xq2 = xq.reshape((1, k))
    xd2 = xd.reshape((1, k // 32))
    out2 = out.reshape((1, out.shape[0]))
    ysum8 = np.empty((1, k // 32), np.int32)
    _block_sums8(xq2, ysum8)
    for g in prange(w.shape[0] // 8):
        q4_0x8_gemv(w, 8 * g, xq2, xd2, ysum8, 0, out2)


@njit(cache=True, parallel=True)
def _matmat_q4_0x8(w, xq, xd, out):
    """out [T, rows] = the T tokens' products with a repacked Q4_0 matrix, bit for bit as
    one-token decode and as llama.cpp's batches (its gemm for tokens in fours, gemv for the
    rest: the same per-(row, token) chains): 8 rows x 4 tokens per step
    (runtime.simd.q4_0x8_gemm), the 8 rows' weights staying in cache while every token passes."""
    n_tok, k = xq.shape
    ysum8 = np.empty((n_tok, k // 32), np.int32)
    for t in prange(n_tok):
        _block_sums8(xq[t:t + 1], ysum8[t:t + 1])
    t4 = n_tok // GEMM_TOKENS
    for g in prange(w.shape[0] // 8):
        for tg in range(t4):
            q4_0x8_gemm(w, 8 * g, xq, xd, ysum8, GEMM_TOKENS * tg, out)
        for t in range(GEMM_TOKENS * t4, n_tok):
            q4_0x8_gemv(w, 8 * g, xq, xd, ysum8, t, out)


_X8_BLOCK = {T.Q4_0: 18, T.Q4_1: 20}  # file block bytes of the interleaved formats


def _x8_layout(blocks: np.ndarray, t) -> np.ndarray:
    """[g, 8 rows, nb, block bytes] (any dtype) -> [g, nb, 8 * block bytes] in runtime.simd's
    interleaved layout of format t: the 8 scales (Q4_1: then the 8 minimums), then 4 vectors of 4
    rows x 8 quant bytes."""
    g, _, nb, bs = blocks.shape
    order = list(Q4_0X8_ROWS_LO + Q4_0X8_ROWS_HI)

    def row_order(a):  # [g, 8, nb, k] -> [g, nb, 8 * k]
        return a.transpose(0, 2, 1, 3).reshape(g, nb, -1)

    parts = [row_order(blocks[:, :, :, :2])]
    if t == T.Q4_1:
        parts.append(row_order(blocks[:, :, :, 2:4]))
    qs = blocks[:, order, :, bs - 16:].reshape(g, 2, 4, nb, 2, 8)  # [g, s, row, nb, v, byte]
    parts.append(qs.transpose(0, 3, 1, 4, 2, 5).reshape(g, nb, 128))
    return np.concatenate(parts, axis=2)


@njit(cache=True, parallel=True)
def _matvec_q4_1x8(w, table, xq, xd, xs, out):
    """One token times a repacked Q4_1 matrix: vec_dot_q4_1_q8_1's lanes, 8 rows at a time
    (runtime.simd.q4_1x8_gemv), the same floats as _matvec_q4_1 on the file's rows."""
    k = xq.shape[0]
    xq2 = xq.reshape((1, k))
    xd2 = xd.reshape((1, k // 32))
    xs2 = xs.reshape((1, k // 32))
    out2 = out.reshape((1, out.shape[0]))
    for g in prange(w.shape[0] // 8):
        q4_1x8_gemv(w, 8 * g, xq2, xd2, xs2, 0, out2)


@njit(cache=True, parallel=True)
def _matmat_q4_1x8(w, xq, xd, xs, out):
    """out [T, rows] = the T tokens' products with a repacked Q4_1 matrix, each (row, token)
    vec_dot_q4_1_q8_1's floats (as one-token decode): 8 rows x Q4_1X8_TOKENS tokens per step,
    the leftover token by the one-token kernel."""
    n_tok = xq.shape[0]
    steps = n_tok // Q4_1X8_TOKENS
    for g in prange(w.shape[0] // 8):
        for s in range(steps):
            q4_1x8_gemm(w, 8 * g, xq, xd, xs, Q4_1X8_TOKENS * s, out)
        for t in range(Q4_1X8_TOKENS * steps, n_tok):
            q4_1x8_gemv(w, 8 * g, xq, xd, xs, t, out)


def pack_x8(rows: np.ndarray, t, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of format t [n, row bytes] (n a multiple of 8) -> the same weights interleaved 8
    rows at a time (runtime.simd), into `out` (may be `rows` itself) or a new array."""
    n, rb = rows.shape
    bs = _X8_BLOCK[t]
    packed = _x8_layout(np.ascontiguousarray(rows).reshape(n // 8, 8, rb // bs, bs), t).reshape(n, rb)
    if out is None:
        return packed
    out[...] = packed
    return out


@njit(cache=True, parallel=True)
def _matvec_q5_0(w, table, xq, xd, out):
    """Q5_0 (22 B / 32: d, qh[4] = the 32 fifth bits, qs[16] nibbles ordered as in Q4_0),
    w = d*(q - 16), as ggml's AVX2 vec_dot_q5_0_q8_0: Q8_0's lanes and order."""
    for r in prange(w.shape[0]):
        out[r] = q5_0_dot(w, r, xq, xd)


@njit(cache=True, inline="always")
def _q4k_scale_min(sc, j):
    if j < 4:
        return np.int32(sc[j] & 63), np.int32(sc[j + 4] & 63)
    return (np.int32((sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4)),
            np.int32((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)))


# fastmath 'contract' only: the two fma chains below, nothing reassociated
@njit(cache=True, parallel=True, fastmath={"contract"})
def _matvec_q4_k(w, table, xq, xd, xs, out):
    """Q4_K summed as llama.cpp does on an AVX2 CPU, where Q4_K matrices (rows a multiple of 8)
    are repacked at load and multiplied by ggml_gemv_q4_K_8x8_q8_K: per 256-value block the
    exact integer sums isum = sum_j scale_j * dot_j and imin = sum_j min_j * bsum_j (bsum: the
    sum of a 32-group's int8 activations), acc = fma(isum, d*dx, acc) and
    accm = fma(imin, dmin*dx, accm) over blocks, result acc - accm."""
    n_rows, nb = w.shape[0], xd.shape[0] // 8
    n8 = n_rows // 8
    xq2 = xq.reshape((1, xq.shape[0]))
    xd2 = xd.reshape((1, xd.shape[0]))
    out2 = out.reshape((1, n_rows))
    for g in prange(n8):  # 8 rows at a time in vector IR (runtime.simd), as ggml's kernels
        q4_k_dot8(w, 8 * g, xq2, xd2, 0, out2)
    bsum = np.zeros(nb * 8, np.int32)
    for g in range(nb * 8):
        for j in range(32):
            bsum[g] += np.int32(xq[g * 32 + j])
    for r in range(8 * n8, n_rows):  # the other rows: the same sums, one row at a time
        row = w[r]
        acc = np.float32(0.0)
        accm = np.float32(0.0)
        for b in range(nb):
            o = b * 144
            sc = row[o + 4:o + 16]
            isum = 0
            imin = 0
            for c in range(4):
                qs = row[o + 16 + 32 * c:o + 48 + 32 * c]
                xlo = xq[b * 256 + 64 * c:b * 256 + 64 * c + 32]
                xhi = xq[b * 256 + 64 * c + 32:b * 256 + 64 * c + 64]
                slo = np.int32(0)
                shi = np.int32(0)
                for j in range(32):
                    q = np.int32(qs[j])
                    slo += (q & 15) * np.int32(xlo[j])
                    shi += (q >> 4) * np.int32(xhi[j])
                s1, m1 = _q4k_scale_min(sc, 2 * c)
                s2, m2 = _q4k_scale_min(sc, 2 * c + 1)
                isum += s1 * slo + s2 * shi
                imin += m1 * bsum[b * 8 + 2 * c] + m2 * bsum[b * 8 + 2 * c + 1]
            dx = xd[b * 8]
            acc = np.float32(isum) * (_f16(table, row, o) * dx) + acc
            accm = np.float32(imin) * (_f16(table, row, o + 2) * dx) + accm
        out[r] = acc - accm


@njit(cache=True, parallel=True)
def _matvec_q6_k(w, table, xq, xd, out):
    """As ggml's AVX2 vec_dot_q6_K_q8_K: per 256-value block 8 integer lanes of
    scale * (q - 32) * x, acc_l = fma(dx*d, lane, acc_l), result hsum_float_8(acc)."""
    for r in prange(w.shape[0]):
        out[r] = q6_k_dot(w, r, xq, xd)


@njit(cache=True, parallel=True)
def _matvec_f16(w, table, x, out):
    """As ggml's AVX2 ggml_vec_dot_f16 (x: the activations rounded to half): the vector IR's 4
    accumulators over 32-value steps and their reduction, then the K % 32 leftovers in double."""
    k = x.shape[0]
    tail = k - k % 32
    for r in prange(w.shape[0]):
        acc = np.float64(f16_dot(w, r, x))
        if tail < k:
            row = w[r].view(np.uint16)
            for i in range(tail, k):
                acc += np.float64(table[row[i]] * x[i])
        out[r] = np.float32(acc)


@njit(cache=True, parallel=True, fastmath=True)
def _matvec_f32(w, x, out):
    n_rows = w.shape[0]
    k = x.shape[0]
    for r in prange(n_rows):
        row = w[r].view(np.float32)
        acc = np.float32(0.0)
        for i in range(k):
            acc += row[i] * x[i]
        out[r] = acc


# --- the tile path and the dispatcher ------------------------------------------------------

def dequantize_rows(raw: np.ndarray, ggml_type, n_per_row: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of a weight as float32 [n_rows, n_per_row], through the quants registry's kernel
    (into `out` when given: a reused tile buffer)."""
    from .quants import FORMATS

    ggml_type = T(ggml_type)
    if out is None:
        out = np.empty((raw.shape[0], n_per_row), np.float32)
    fmt = FORMATS.get(ggml_type)
    if fmt is None:  # formats the registry does not have yet: gguf-py's reference numpy code
        from gguf.quants import dequantize as gguf_dequantize

        out[...] = gguf_dequantize(np.ascontiguousarray(raw), ggml_type).reshape(raw.shape[0], n_per_row)
        return out
    fmt.dequantize_rows(np.ascontiguousarray(raw), out)
    return out


class QuantWeight:
    """A weight matrix [n_out, n_in] left quantized in the memory map: `rows` is uint8
    [n_out, row bytes] (ggml shape (n_in, n_out)), the file's blocks; or, once `repack`ed
    (`packed`), the same bytes interleaved 8 rows at a time for runtime.simd's Q4_0 / Q4_1
    kernels."""

    __slots__ = ("name", "ggml_type", "n_in", "n_out", "rows", "act_mode", "packed")

    def __init__(self, name: str, ggml_type, n_in: int, n_out: int, rows: np.ndarray):
        self.name = name
        self.ggml_type = T(ggml_type)
        self.n_in = int(n_in)
        self.n_out = int(n_out)
        self.rows = rows
        self.act_mode = VEC_DOT_TYPE[self.ggml_type]
        self.packed = False

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)

    @property
    def kernel(self) -> int:
        """The code matvec_fused dispatches on: the ggml type, or its repacked kernel's."""
        return _X8_KERNEL[self.ggml_type] if self.packed else int(self.ggml_type)


def repackable(w: QuantWeight) -> bool:
    """Whether `repack` applies: Q4_0 (as llama.cpp repacks it on an AVX2 CPU) and Q4_1 (faster
    decode, the same floats as its vec_dot), rows a multiple of 8."""
    return w.ggml_type in _X8_BLOCK and w.n_out % 8 == 0 and w.n_in % 32 == 0 and not w.packed


def repack(w: QuantWeight) -> None:
    """Interleave a repackable matrix's rows into a new array for the 8-row kernels; `rows` then
    holds that layout and `packed` is set. Only matrix products read it: never repack the token
    embeddings. (fused_layers packs its stacked copies in place with pack_x8.)"""
    w.rows = pack_x8(w.rows, w.ggml_type)
    w.packed = True


class Activations:
    """x rounded to a weight format's vec_dot_type, reusable by every weight of that format
    that multiplies the same x (q, k and v; gate and up)."""

    __slots__ = ("mode", "xq", "xd", "xs", "xhat")

    def __init__(self, x: np.ndarray, mode: int):
        n_tok, k = x.shape
        self.mode = mode
        self.xq = np.empty((n_tok, k), np.int8)
        self.xd = np.empty((n_tok, max(k // 32, 1)), np.float32)
        self.xs = np.empty((n_tok, max(k // 32, 1)), np.float32)
        self.xhat = np.empty((n_tok, k), np.float32)
        if mode == ACT_F16 and n_tok > 1:  # numpy's IEEE conversion: the same rounding, 4x faster
            with np.errstate(over="ignore"):  # beyond the half range: inf, as ggml's FP32_TO_FP16
                np.copyto(self.xhat, x.astype(np.float16))
        elif n_tok > 1:
            _quantize_activations_rows(x, mode, self.xq, self.xd, self.xs, self.xhat)
        else:
            quantize_activations(x, mode, self.xq, self.xd, self.xs, self.xhat)


def quantize_for(x: np.ndarray, w: QuantWeight) -> Activations:
    return Activations(np.ascontiguousarray(x, dtype=np.float32), w.act_mode)


@njit(cache=True, inline="always")
def _rows_step(t, w, r, xq, xd, xs, t0, out, n):
    """Row r of a file-layout matrix of type t times tokens t0..t0+n-1 (n: ROW_TOKENS or 1)."""
    if n == ROW_TOKENS:
        if t == _Q4_1:
            q4_1_rows4(w, r, xq, xd, xs, t0, out)
        elif t == _Q8_0:
            q8_0_rows4(w, r, xq, xd, t0, out)
        elif t == _Q4_0:
            q4_0_rows4(w, r, xq, xd, t0, out)
        elif t == _Q5_0:
            q5_0_rows4(w, r, xq, xd, t0, out)
        else:
            q6_k_rows4(w, r, xq, xd, t0, out)
    else:
        if t == _Q4_1:
            q4_1_rows1(w, r, xq, xd, xs, t0, out)
        elif t == _Q8_0:
            q8_0_rows1(w, r, xq, xd, t0, out)
        elif t == _Q4_0:
            q4_0_rows1(w, r, xq, xd, t0, out)
        elif t == _Q5_0:
            q5_0_rows1(w, r, xq, xd, t0, out)
        else:
            q6_k_rows1(w, r, xq, xd, t0, out)


@njit(cache=True, parallel=True)
def _matmat_rows(t, w, xq, xd, xs, out):
    """out [T, rows] = the T tokens' products with a matrix in the file's layout (t: Q4_1, Q8_0,
    Q4_0, Q5_0 or Q6_K), each (row, token) the one-token kernel's floats: per row, its blocks
    unpacked once for ROW_TOKENS tokens at a time, rows over threads."""
    n_tok = xq.shape[0]
    in_steps = n_tok - n_tok % ROW_TOKENS
    for r in prange(w.shape[0]):
        for t0 in range(0, in_steps, ROW_TOKENS):
            _rows_step(t, w, r, xq, xd, xs, t0, out, ROW_TOKENS)
        for t0 in range(in_steps, n_tok):
            _rows_step(t, w, r, xq, xd, xs, t0, out, 1)


@njit(cache=True, parallel=True)
def _matmat_f16(w, table, x, out):
    """out [T, rows] = the T tokens' products with an F16 matrix (x: the activations rounded
    to half), each (row, token) _matvec_f16's floats: ROW_TOKENS tokens per step."""
    n_tok, k = x.shape
    tail = k - k % 32
    in_steps = n_tok - n_tok % ROW_TOKENS
    for r in prange(w.shape[0]):
        for t0 in range(0, in_steps, ROW_TOKENS):
            f16_rows4(w, r, x, t0, out)
        for t0 in range(in_steps, n_tok):
            f16_rows1(w, r, x, t0, out)
        if tail < k:
            row = w[r].view(np.uint16)
            for t in range(n_tok):
                acc = np.float64(out[t, r])
                for i in range(tail, k):
                    acc += np.float64(table[row[i]] * x[t, i])
                out[t, r] = np.float32(acc)


@njit(cache=True, parallel=True)
def _matmat_q4_k(w, xq, xd, out):
    """out [T, rows] = the T tokens' products with a Q4_K matrix of rows a multiple of 8, each
    (row, token) _matvec_q4_k's floats: 8 rows x Q4_K_TOKENS tokens per step."""
    n_tok = xq.shape[0]
    steps = n_tok // Q4_K_TOKENS
    for g in prange(w.shape[0] // 8):
        for s in range(steps):
            q4_k_gemm8(w, 8 * g, xq, xd, Q4_K_TOKENS * s, out)
        for t in range(Q4_K_TOKENS * steps, n_tok):
            q4_k_dot8(w, 8 * g, xq, xd, t, out)


# formats whose batches go through _matmat_rows (file layout) or their repacked kernels
_ROW_BATCH_TYPES = frozenset({T.Q4_1, T.Q8_0, T.Q4_0, T.Q5_0, T.Q6_K})


def matmul(w: QuantWeight, x: np.ndarray | Activations, out: np.ndarray | None = None) -> np.ndarray:
    """x [T, n_in] (or Activations for w's format) -> x @ W.T as float32 [T, n_out]. For the
    fused formats each token's row is the same bits whatever T (one arithmetic for prompts and
    decode); the others multiply float32 tiles with BLAS."""
    act = x if isinstance(x, Activations) else quantize_for(x, w)
    if act.mode != w.act_mode:
        raise ValueError(f"{w.name}: activations are in the wrong format")
    n_tok = act.xhat.shape[0]
    if act.xhat.shape[1] != w.n_in:
        raise ValueError(f"{w.name}: expects {w.n_in} inputs, got {act.xhat.shape[1]}")
    if out is None:
        out = np.empty((n_tok, w.n_out), np.float32)
    t = w.ggml_type
    if n_tok > 1 and w.packed:
        if t == T.Q4_0:
            _matmat_q4_0x8(w.rows, act.xq, act.xd, out)
        else:
            _matmat_q4_1x8(w.rows, act.xq, act.xd, act.xs, out)
        return out
    if n_tok > 1 and t in _ROW_BATCH_TYPES and w.n_in % 32 == 0:
        _matmat_rows(int(t), np.ascontiguousarray(w.rows), act.xq, act.xd, act.xs, out)
        return out
    if n_tok > 1 and t == T.Q4_K and w.n_out % 8 == 0:
        _matmat_q4_k(np.ascontiguousarray(w.rows), act.xq, act.xd, out)
        return out
    if n_tok > 1 and t == T.Q5_K:
        q5_k.matmul(np.ascontiguousarray(w.rows), act.xq, act.xd, out)
        return out
    if n_tok > 1 and t == T.F16:
        _matmat_f16(np.ascontiguousarray(w.rows), F16_TABLE, act.xhat, out)
        return out
    if t in FUSED_TYPES:
        # (Q4_K: every token in the order of llama.cpp's repacked gemv, which it uses for one
        # token; its batches take its gemm for tokens in fours - other fma steps, so a token's
        # floats there depend on its place in the batch - and we do not follow it there)
        rows = np.ascontiguousarray(w.rows)
        for i in range(n_tok):
            matvec_fused(w.kernel, rows, F16_TABLE, act.xq[i], act.xd[i], act.xs[i], act.xhat[i], out[i])
        return out
    tile = np.empty((min(TILE_ROWS, w.n_out), w.n_in), np.float32)
    for start in range(0, w.n_out, TILE_ROWS):
        stop = min(start + TILE_ROWS, w.n_out)
        dequantize_rows(w.rows[start:stop], t, w.n_in, tile[:stop - start])
        np.matmul(act.xhat, tile[:stop - start].T, out=out[:, start:stop])
    if act.mode == ACT_Q8_1:  # Q5_1
        # llama.cpp's Q8_1 carries each block's sum as half(d*sum(q)), not sum(half(d)*q):
        # add min * (that sum - the sum of our rounded activations) so both paths agree
        bs = GGML_QUANT_SIZES[t][1]
        mins = F16_TABLE[w.rows.reshape(w.n_out, -1, bs)[:, :, 2:4].copy().view(np.uint16)[:, :, 0]]
        delta = act.xs - act.xhat.reshape(n_tok, -1, 32).sum(axis=2, dtype=np.float32)
        out += delta @ mins.T
    return out


# --- one compiled call per layer for single-token decode ------------------------------------

_ACT_OF_TYPE = np.full(128, -1, np.int64)
for _t, _mode in VEC_DOT_TYPE.items():
    _ACT_OF_TYPE[int(_t)] = _mode
# matrices repacked 8 rows at a time (`repack`)
Q4_0X8, Q4_1X8 = 113, 114
_ACT_OF_TYPE[Q4_0X8] = ACT_Q8_0
_ACT_OF_TYPE[Q4_1X8] = ACT_Q8_1
_X8_KERNEL = {T.Q4_0: Q4_0X8, T.Q4_1: Q4_1X8}
_Q4_0, _Q4_1, _Q5_0, _Q8_0, _Q4_K, _Q6_K, _F16, _F32 = (int(T.Q4_0), int(T.Q4_1), int(T.Q5_0), int(T.Q8_0),
                                                          int(T.Q4_K), int(T.Q6_K), int(T.F16), int(T.F32))
_Q5_K = int(T.Q5_K)


@njit(cache=True)
def matvec_fused(t, w, table, xq, xd, xs, xhat, out):
    """out = W x for one token with W's fused kernel (t: its ggml type, in FUSED_TYPES); x given as its rounded activations (xq/xd/xs for the
    integer kernels, xhat for floats)."""
    if t == _Q4_1:
        _matvec_q4_1(w, table, xq, xd, xs, out)
    elif t == Q4_0X8:
        _matvec_q4_0x8(w, table, xq, xd, out)
    elif t == Q4_1X8:
        _matvec_q4_1x8(w, table, xq, xd, xs, out)
    elif t == _Q4_0:
        _matvec_q4_0(w, table, xq, xd, out)
    elif t == _Q8_0:
        _matvec_q8_0(w, table, xq, xd, out)
    elif t == _Q5_0:
        _matvec_q5_0(w, table, xq, xd, out)
    elif t == _Q4_K:
        _matvec_q4_k(w, table, xq, xd, xs, out)
    elif t == _Q6_K:
        _matvec_q6_k(w, table, xq, xd, out)
    elif t == _Q5_K:
        q5_k.matmul(w, xq.reshape((1, xq.shape[0])), xd.reshape((1, xd.shape[0])), out.reshape((1, out.shape[0])))
    elif t == _F16:
        _matvec_f16(w, table, xhat, out)
    else:
        _matvec_f32(w, xhat, out)


@njit(cache=True)
def act_mode_of(t):
    return _ACT_OF_TYPE[t]
