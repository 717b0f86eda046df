"""Products of quantized weight matrices with float activations: `y = x @ W.T`.

W is a GGUF tensor left as it sits in the memory map (rows of ggml blocks, `TensorInfo.rows()`);
x is float32 [T, K] (T tokens). Numerics follow llama.cpp's CPU backend: before a product the
activations are converted to the weight format's "vec_dot_type" (Q8_0 for Q8_0/Q4_0/Q5_0, Q8_1
for Q4_1/Q5_1, Q8_K for the K-quants, F16 for F16, BF16 for BF16), so our sums use the same
rounded activations as llama.cpp's integer dot products.

Two paths, chosen per call:
- decode (few tokens) on the hot formats (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16, F32): fused numba
  kernels reading the blocks directly, integer dot products against the int8 activations,
  rows split over threads.
- everything else (prefill blocks, and every format without a fused kernel): a tile of rows
  dequantized to float32 once (`runtime.quants.dequantize`), multiplied by the block of rounded
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
import os

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from numba import njit, prange

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
FUSED_TYPES = frozenset({T.F32, T.F16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K})
# at or above this many tokens a dequantized tile times BLAS (much faster, not bit-identical
# to ggml) replaces the per-token fused kernels (llama.cpp's exact sums)
PREFILL_MIN_TOKENS = 16
# llama.cpp's CPU batches use the same per-row sums as decode for every fused format
# (llamafile's sgemm has no Q4_1/Q5_1/K-quant kernel, and its Q8_0/Q4_0/Q5_0 kernel sums in
# vec_dot's lane order), so with EXACT_PREFILL the fused kernels serve batches of any size:
# prompts and perplexity then reproduce llama.cpp bit for bit (forward.py also switches batches
# of 64+ tokens to ggml's tiled flash attention). It costs prompt speed (SmolLM2 Q4_1, 2 threads:
# pp256 about 50 tok/s exact vs 120 default), so it is opt-in: LLAMACHAT_EXACT_PREFILL=1.
# Single-token decode is exact either way, and prompts under 16 tokens too.
EXACT_PREFILL = os.environ.get("LLAMACHAT_EXACT_PREFILL", "") == "1"
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


# --- fused decode kernels: one output row per iteration, rows split over threads ------------

# The 32-value formats: a block is a header (scales) and then its quants. The activations are
# first spread to the byte positions of a row (zeros under the header bytes), so the products
# become one contiguous elementwise pass over the row's bytes into an int16 scratch row, which
# LLVM vectorizes; the per-block integer sums and float scaling come after. (Indexing the
# quants block by block instead made LLVM gather bytes one at a time: 10x slower.)
ROWS_PER_TASK = 16


# fastmath 'contract' only (see _matvec_q4_1): sums in ggml's AVX2 order, bit for bit
@njit(cache=True, parallel=True, fastmath={"contract"})
def _matvec_q8_0(w, table, xq, xd, out):
    """Summed as ggml's AVX2 vec_dot_q8_0_q8_0 (and llamafile's tinyBLAS_Q0_AVX, the same
    order) does: per block 8 integer lanes (values 4l..4l+3), each accumulated over blocks as
    fma(d_w*d_x, lane, acc_l); result = hsum_float_8(acc). (This is the tied output product
    of Q4_1 SmolLM2: the logits.)"""
    n_rows, rb = w.shape
    nb = xd.shape[0]
    xe = np.zeros(rb, np.int16)
    for b in range(nb):
        for j in range(32):
            xe[b * 34 + 2 + j] = xq[b * 32 + j]
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        prod = np.empty(rb, np.int16)
        for r in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            row = w[r]
            qs = row.view(np.int8)
            for i in range(rb):
                prod[i] = np.int16(qs[i]) * xe[i]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
            for b in range(nb):
                o = b * 34 + 2
                d = _f16(table, row, b * 34) * xd[b]
                a0 = d * _lane(prod, o) + a0
                a1 = d * _lane(prod, o + 4) + a1
                a2 = d * _lane(prod, o + 8) + a2
                a3 = d * _lane(prod, o + 12) + a3
                a4 = d * _lane(prod, o + 16) + a4
                a5 = d * _lane(prod, o + 20) + a5
                a6 = d * _lane(prod, o + 24) + a6
                a7 = d * _lane(prod, o + 28) + a7
            out[r] = ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3))


@njit(cache=True, inline="always")
def _spread_q4(xq, rb, bs):
    """int8 activations -> int16 rows aligned with a Q4 row's bytes (low/high nibble partners)."""
    nb = rb // bs
    xlo = np.zeros(rb, np.int16)
    xhi = np.zeros(rb, np.int16)
    xsum = np.zeros(nb, np.int32)
    for b in range(nb):
        for j in range(16):
            xlo[b * bs + bs - 16 + j] = xq[b * 32 + j]
            xhi[b * bs + bs - 16 + j] = xq[b * 32 + 16 + j]
        for j in range(32):
            xsum[b] += np.int32(xq[b * 32 + j])
    return xlo, xhi, xsum


@njit(cache=True, inline="always")
def _nibble_products(row, xlo, xhi, prod):
    for i in range(row.shape[0]):
        q = np.int16(row[i])
        prod[i] = (q & 15) * xlo[i] + (q >> 4) * xhi[i]


@njit(cache=True, inline="always")
def _sum16(prod, base):
    s = np.int32(0)
    for j in range(16):  # a constant trip count: LLVM unrolls it into vector adds
        s += np.int32(prod[base + j])
    return s


@njit(cache=True, inline="always")
def fma32(a, b, c):
    """float32 fused multiply-add (a*b exact in double, one rounding to double, then float32)."""
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


@njit(cache=True, inline="always")
def hsum8(acc):
    """ggml's hsum_float_8: (x_i + x_{i+4}), then (0+2), (1+3), then the two."""
    r0 = acc[4] + acc[0]
    r1 = acc[5] + acc[1]
    r2 = acc[6] + acc[2]
    r3 = acc[7] + acc[3]
    return (r0 + r2) + (r1 + r3)


@njit(cache=True, inline="always")
def _lane(p, o):
    return np.float32(np.int32(p[o]) + np.int32(p[o + 1]) + np.int32(p[o + 2]) + np.int32(p[o + 3]))


# fastmath 'contract' only: a*b + c becomes one fused multiply-add (as ggml's
# _mm256_fmadd_ps and GCC's contraction of `summs += m*s`), nothing is reassociated
@njit(cache=True, parallel=True, fastmath={"contract"})
def _matvec_q4_1(w, table, xq, xd, xs, out):
    """w = d*q + m, summed exactly as ggml's AVX2 vec_dot_q4_1_q8_1 does: per block 8 integer
    lanes (values 4l..4l+3; the low nibbles are values 0-15, the high ones 16-31), each
    accumulated over blocks as fma(d*dx, lane, acc_l); the min terms fma'd into one scalar;
    result = hsum_float_8(acc) + mins. Float rounding identical to llama.cpp's matters: its
    F16 KV cache rounds these outputs, and this small model amplifies a flipped rounding."""
    n_rows, rb = w.shape
    nb = rb // 20
    xlo, xhi, _ = _spread_q4(xq, rb, 20)
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        plo = np.empty(rb, np.int16)
        phi = np.empty(rb, np.int16)
        for r in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            row = w[r]
            for i in range(rb):  # contiguous: vectorized
                q = np.int16(row[i])
                plo[i] = (q & 15) * xlo[i]
                phi[i] = (q >> 4) * xhi[i]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
            mins = np.float32(0.0)
            for b in range(nb):
                o = b * 20 + 4
                d = _f16(table, row, b * 20) * xd[b]
                mins = _f16(table, row, b * 20 + 2) * xs[b] + mins
                a0 = d * _lane(plo, o) + a0
                a1 = d * _lane(plo, o + 4) + a1
                a2 = d * _lane(plo, o + 8) + a2
                a3 = d * _lane(plo, o + 12) + a3
                a4 = d * _lane(phi, o) + a4
                a5 = d * _lane(phi, o + 4) + a5
                a6 = d * _lane(phi, o + 8) + a6
                a7 = d * _lane(phi, o + 12) + a7
            # hsum_float_8
            out[r] = (((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3))) + mins


@njit(cache=True, parallel=True, fastmath=True)
def _matvec_q4_0(w, table, xq, xd, out):
    """w = d*(q-8): sum = d*dx*(sum(q*xq) - 8*sum(xq))."""
    n_rows, rb = w.shape
    xlo, xhi, xsum = _spread_q4(xq, rb, 18)
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        prod = np.empty(rb, np.int16)
        for r in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            row = w[r]
            _nibble_products(row, xlo, xhi, prod)
            acc = np.float32(0.0)
            for b in range(rb // 18):
                s = _sum16(prod, b * 18 + 2)
                acc += _f16(table, row, b * 18) * xd[b] * np.float32(s - 8 * xsum[b])
            out[r] = acc


@njit(cache=True, parallel=True, fastmath=True)
def _matvec_q5_0(w, table, xq, xd, out):
    """Q5_0 (22 B / 32: d, qh[4] = the 32 fifth bits, qs[16] nibbles ordered as in Q4_0):
    w = d*(q - 16), so sum(w*x) = d*(sum(nibble*x) + 16*sum(bit*x) - 16*sum(x)); the nibble
    part is Q4_0's contiguous pass, the bit part one 32-step loop per block."""
    n_rows, rb = w.shape
    nb = rb // 22
    xlo, xhi, xsum = _spread_q4(xq, rb, 22)
    x32 = np.empty(nb * 32, np.int32)
    for i in range(nb * 32):
        x32[i] = xq[i]
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        prod = np.empty(rb, np.int16)
        for r in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            row = w[r]
            _nibble_products(row, xlo, xhi, prod)  # header bytes meet zeros in xlo/xhi
            acc = np.float32(0.0)
            for b in range(nb):
                o = b * 22
                qh = np.int32(row[o + 2]) | (np.int32(row[o + 3]) << 8) | (np.int32(row[o + 4]) << 16) | (np.int32(row[o + 5]) << 24)
                bits = np.int32(0)
                for j in range(32):
                    bits += ((qh >> j) & 1) * x32[b * 32 + j]
                s = _sum16(prod, o + 6) + 16 * bits - 16 * xsum[b]
                acc += _f16(table, row, o) * xd[b] * np.float32(s)
            out[r] = acc


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
    bsum = np.zeros(nb * 8, np.int32)
    for g in range(nb * 8):
        for j in range(32):
            bsum[g] += np.int32(xq[g * 32 + j])
    for r in prange(n_rows):
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


@njit(cache=True, parallel=True, fastmath=True)
def _matvec_q6_k(w, table, xq, xd, out):
    n_rows, nb = w.shape[0], xd.shape[0] // 8
    for r in prange(n_rows):
        row = w[r]
        acc = np.float32(0.0)
        for b in range(nb):
            o = b * 210
            scales = row[o + 192:o + 208].view(np.int8)
            isum = np.int32(0)
            for half in range(2):
                ql = row[o + 64 * half:o + 64 * half + 64]
                qh = row[o + 128 + 32 * half:o + 128 + 32 * half + 32]
                xb = xq[b * 256 + 128 * half:b * 256 + 128 * half + 128]
                for g in range(2):  # 16-value groups share a scale
                    s0 = np.int32(0)
                    s1 = np.int32(0)
                    s2 = np.int32(0)
                    s3 = np.int32(0)
                    for l in range(16 * g, 16 * g + 16):
                        a = np.int32(ql[l])
                        c = np.int32(ql[l + 32])
                        h = np.int32(qh[l])
                        s0 += (((a & 15) | ((h & 3) << 4)) - 32) * np.int32(xb[l])
                        s1 += (((c & 15) | (((h >> 2) & 3) << 4)) - 32) * np.int32(xb[l + 32])
                        s2 += (((a >> 4) | (((h >> 4) & 3) << 4)) - 32) * np.int32(xb[l + 64])
                        s3 += (((c >> 4) | (((h >> 6) & 3) << 4)) - 32) * np.int32(xb[l + 96])
                    sc = scales[8 * half + g:8 * half + g + 8]
                    isum += (np.int32(sc[0]) * s0 + np.int32(sc[2]) * s1
                             + np.int32(sc[4]) * s2 + np.int32(sc[6]) * s3)
            acc += _f16(table, row, o + 208) * xd[b * 8] * np.float32(isum)
        out[r] = acc


@njit(cache=True, parallel=True, fastmath=True)
def _matvec_f16(w, table, x, out):
    n_rows = w.shape[0]
    k = x.shape[0]
    for r in prange(n_rows):
        row = w[r].view(np.uint16)
        acc = np.float32(0.0)
        for i in range(k):
            acc += table[row[i]] * x[i]
        out[r] = acc


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
    [n_out, row_bytes] (ggml shape (n_in, n_out))."""

    __slots__ = ("name", "ggml_type", "n_in", "n_out", "rows", "act_mode", "packed")

    def __init__(self, name: str, ggml_type, n_in: int, n_out: int, rows: np.ndarray):
        self.name = name
        self.ggml_type = T(ggml_type)
        self.n_in = int(n_in)
        self.n_out = int(n_out)
        self.rows = rows
        self.act_mode = VEC_DOT_TYPE[self.ggml_type]
        # Q4_1/Q8_0 only: the same rows repacked by pack_rows (then used instead of `rows`,
        # whose memory-map pages can be released)
        self.packed: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)


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
        quantize_activations(x, mode, self.xq, self.xd, self.xs, self.xhat)


def quantize_for(x: np.ndarray, w: QuantWeight) -> Activations:
    return Activations(np.ascontiguousarray(x, dtype=np.float32), w.act_mode)


def matmul(w: QuantWeight, x: np.ndarray | Activations, out: np.ndarray | None = None) -> np.ndarray:
    """x [T, n_in] (or Activations for w's format) -> x @ W.T as float32 [T, n_out]."""
    act = x if isinstance(x, Activations) else quantize_for(x, w)
    if act.mode != w.act_mode:
        raise ValueError(f"{w.name}: activations are in the wrong format")
    n_tok = act.xhat.shape[0]
    if act.xhat.shape[1] != w.n_in:
        raise ValueError(f"{w.name}: expects {w.n_in} inputs, got {act.xhat.shape[1]}")
    if out is None:
        out = np.empty((n_tok, w.n_out), np.float32)
    t = w.ggml_type
    if t in FUSED_TYPES and (EXACT_PREFILL or n_tok < PREFILL_MIN_TOKENS):
        for i in range(n_tok):
            if w.packed is not None:
                matvec_fused(PACKED_CODE[t], w.packed, F16_TABLE, act.xq[i], act.xd[i], act.xs[i], act.xhat[i], out[i])
            elif t == T.Q4_1:
                _matvec_q4_1(w.rows, F16_TABLE, act.xq[i], act.xd[i], act.xs[i], out[i])
            elif t == T.Q4_0:
                _matvec_q4_0(w.rows, F16_TABLE, act.xq[i], act.xd[i], out[i])
            elif t == T.Q8_0:
                _matvec_q8_0(w.rows, F16_TABLE, act.xq[i], act.xd[i], out[i])
            elif t == T.Q5_0:
                _matvec_q5_0(w.rows, F16_TABLE, act.xq[i], act.xd[i], out[i])
            elif t == T.Q4_K:
                _matvec_q4_k(w.rows, F16_TABLE, act.xq[i], act.xd[i], act.xs[i], out[i])
            elif t == T.Q6_K:
                _matvec_q6_k(w.rows, F16_TABLE, act.xq[i], act.xd[i], out[i])
            elif t == T.F16:
                _matvec_f16(w.rows, F16_TABLE, act.xhat[i], out[i])
            else:
                _matvec_f32(w.rows, act.xhat[i], out[i])
        return out
    tile = np.empty((min(TILE_ROWS, w.n_out), w.n_in), np.float32)
    mins = np.empty((w.n_out, w.n_in // 32), np.float32) if w.packed is not None and t == T.Q4_1 else None
    for start in range(0, w.n_out, TILE_ROWS):
        stop = min(start + TILE_ROWS, w.n_out)
        if w.packed is None:
            dequantize_rows(w.rows[start:stop], t, w.n_in, tile[:stop - start])
        else:
            _dequantize_packed(PACKED_CODE[t], w.packed[start:stop], F16_TABLE, tile[:stop - start],
                               mins[start:stop] if mins is not None else tile[:0])
        np.matmul(act.xhat, tile[:stop - start].T, out=out[:, start:stop])
    if act.mode == ACT_Q8_1:
        # llama.cpp's Q8_1 carries each block's sum as half(d*sum(q)), not sum(half(d)*q):
        # add min * (that sum - the sum of our rounded activations) so both paths agree
        bs = GGML_QUANT_SIZES[t][1]
        if mins is None:
            mins = F16_TABLE[w.rows.reshape(w.n_out, -1, bs)[:, :, 2:4].copy().view(np.uint16)[:, :, 0]]
        delta = act.xs - act.xhat.reshape(n_tok, -1, 32).sum(axis=2, dtype=np.float32)
        out += delta @ mins.T
    return out


# --- one compiled call per layer for single-token decode ------------------------------------

_ACT_OF_TYPE = np.full(128, -1, np.int64)
for _t, _mode in VEC_DOT_TYPE.items():
    _ACT_OF_TYPE[int(_t)] = _mode
_Q4_0, _Q4_1, _Q5_0, _Q8_0, _Q4_K, _Q6_K, _F16, _F32 = (int(T.Q4_0), int(T.Q4_1), int(T.Q5_0), int(T.Q8_0),
                                                          int(T.Q4_K), int(T.Q6_K), int(T.F16), int(T.F32))


# --- Q4_1, Q4_0 and Q5_0 repacked for decode -----------------------------------------------
#
# _matvec_q4_1 spends most of its time on the per-block lane sums (8 lanes of 4 products, read
# one by one). Repacked rows put the 16 quant bytes of all blocks first, ordered so that the 4
# bytes of one lane are 4*nb apart: byte (4l+k) of block b sits at k*4*nb + 4*b + l. The lane
# sums are then 4 contiguous vector adds. Q5_0's fifth bits follow as 4*nb bytes: byte 4*b + l
# holds, at bits 2k and 2k+1, those of the low and high nibble of quant byte (4l+k). Then the
# block headers as half floats: d of every block, then (Q4_1) m of every block. Same bytes,
# same size as the file's rows.
Q4_1_PACKED = 100  # pseudo type codes of such rows in matvec_fused
Q4_0_PACKED = 102
Q5_0_PACKED = 103


_BIT = np.arange(4)


def _pack_q4(raw: np.ndarray, bs: int) -> np.ndarray:
    """Q4_1 (bs 20: d, m, qs), Q4_0 (bs 18: d, qs) or Q5_0 (bs 22: d, qh, qs) rows uint8
    [n, nb*bs] -> repacked rows of the same size (layout above)."""
    n, rb = raw.shape
    nb = rb // bs
    blocks = np.asarray(raw).reshape(n, nb, bs)
    qs = blocks[:, :, bs - 16:].reshape(n, nb, 4, 4)  # [row, block, lane l, k]
    out = np.empty((n, rb), np.uint8)
    out[:, :16 * nb] = qs.transpose(0, 3, 1, 2).reshape(n, 16 * nb)  # [row, k, block, l]
    at = 16 * nb
    if bs == 22:  # qh bit j = fifth bit of value j (value 4l+k: low nibble, 16+4l+k: high)
        qh = blocks[:, :, 2:6].copy().view("<u4")[:, :, 0]
        bits = ((qh[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8).reshape(n, nb, 2, 4, 4)
        hb = ((bits[:, :, 0] << (2 * _BIT)) | (bits[:, :, 1] << (2 * _BIT + 1))).sum(axis=3, dtype=np.uint8)
        out[:, at:at + 4 * nb] = hb.reshape(n, 4 * nb)
        at += 4 * nb
    for h in range(0, 4 if bs == 20 else 2, 2):  # d, then m
        out[:, at:at + 2 * nb] = blocks[:, :, h:h + 2].reshape(n, 2 * nb)
        at += 2 * nb
    return out


def _unpack_q4(packed: np.ndarray, bs: int) -> np.ndarray:
    """_pack_q4's inverse: repacked rows -> the file's rows."""
    n, rb = packed.shape
    nb = rb // bs
    raw = np.empty((n, nb, bs), np.uint8)
    raw[:, :, bs - 16:] = packed[:, :16 * nb].reshape(n, 4, nb, 4).transpose(0, 2, 3, 1).reshape(n, nb, 16)
    at = 16 * nb
    if bs == 22:
        hb = packed[:, at:at + 4 * nb].reshape(n, nb, 4, 1)  # [row, block, lane l, -]
        bits = np.stack([(hb >> (2 * _BIT)) & 1, (hb >> (2 * _BIT + 1)) & 1], axis=2)  # [row, block, lo/hi, l, k]
        qh = (bits.reshape(n, nb, 32).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(axis=2, dtype=np.uint32)
        raw[:, :, 2:6] = qh.astype("<u4")[:, :, None].view(np.uint8)
        at += 4 * nb
    for h in range(0, 4 if bs == 20 else 2, 2):
        raw[:, :, h:h + 2] = packed[:, at:at + 2 * nb].reshape(n, nb, 2)
        at += 2 * nb
    return raw.reshape(n, rb)


# fastmath 'contract' only, as _matvec_q4_1: the same fused multiply-adds, nothing reassociated
@njit(cache=True, parallel=True, fastmath={"contract"})
def _matvec_q4_packed(w, table, xq, xd, xs, out, bs):
    """Q4_1 (bs 20), Q4_0 (18) or Q5_0 (22) on _pack_q4 rows, summed as llama.cpp does on an
    AVX2 CPU. Q4_1 and Q5_0 as ggml's vec_dot_q4_1_q8_1 / vec_dot_q5_0_q8_0: per block 8 integer
    lanes (values 4l..4l+3; the low nibbles are values 0-15, the high ones 16-31; Q5_0's with
    their fifth bit less 16), each accumulated over blocks as fma(d*dx, lane, acc_l); Q4_1's
    min terms fma'd into one scalar; result = hsum_float_8(acc) (+ mins). For Q4_1
    bit-identical to _matvec_q4_1 on the file's rows (tested). Q4_0 weights (rows a multiple of
    8) are repacked by llama.cpp at load and multiplied by ggml_gemv_q4_0_8x8_q8_0: per block
    the exact integer sum of its 32 products (quants less 8), acc = fma(sum, d*dx, acc), one
    chain per row (llama.cpp's greedy output on Q4_0 files matches only this order)."""
    n_rows, rb = w.shape
    has_min = bs == 20
    five = bs == 22
    nb = rb // bs
    n4 = 4 * nb
    nq = 16 * nb
    hd = nq + 4 * nb if five else nq  # where the d of every block starts
    off = np.int16(0 if has_min else (16 if five else 8))
    xlo = np.empty(nq, np.int16)
    xhi = np.empty(nq, np.int16)
    for k in range(4):
        for b in range(nb):
            for l in range(4):
                xlo[k * n4 + 4 * b + l] = xq[b * 32 + 4 * l + k]
                xhi[k * n4 + 4 * b + l] = xq[b * 32 + 16 + 4 * l + k]
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        plo = np.empty(nq, np.int16)
        phi = np.empty(nq, np.int16)
        llo = np.empty(n4, np.float32)
        lhi = np.empty(n4, np.float32)
        for r in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            row = w[r]
            if five:
                for k in range(4):
                    for j in range(n4):  # contiguous: vectorized
                        i = k * n4 + j
                        q = np.int16(row[i])
                        h = np.int16(row[nq + j]) >> (2 * k)
                        plo[i] = (((q & 15) | ((h & 1) << 4)) - off) * xlo[i]
                        phi[i] = (((q >> 4) | ((h & 2) << 3)) - off) * xhi[i]
            else:
                for i in range(nq):  # contiguous: vectorized
                    q = np.int16(row[i])
                    plo[i] = ((q & 15) - off) * xlo[i]
                    phi[i] = ((q >> 4) - off) * xhi[i]
            for i in range(n4):  # lane sums (at most 4*16*127: int16), contiguous
                llo[i] = np.float32(np.int16(plo[i] + plo[n4 + i] + plo[2 * n4 + i] + plo[3 * n4 + i]))
                lhi[i] = np.float32(np.int16(phi[i] + phi[n4 + i] + phi[2 * n4 + i] + phi[3 * n4 + i]))
            if bs == 18:  # Q4_0: llama.cpp's repacked GEMV order, one chain per row (see above)
                acc = np.float32(0.0)
                for b in range(nb):
                    o = 4 * b
                    isum = ((llo[o] + llo[o + 1]) + (llo[o + 2] + llo[o + 3])) + ((lhi[o] + lhi[o + 1]) + (lhi[o + 2] + lhi[o + 3]))
                    acc = isum * (_f16(table, row, hd + 2 * b) * xd[b]) + acc
                out[r] = acc
                continue
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
            mins = np.float32(0.0)
            for b in range(nb):
                d = _f16(table, row, hd + 2 * b) * xd[b]
                if has_min:
                    mins = _f16(table, row, nq + 2 * nb + 2 * b) * xs[b] + mins
                a0 = d * llo[4 * b] + a0
                a1 = d * llo[4 * b + 1] + a1
                a2 = d * llo[4 * b + 2] + a2
                a3 = d * llo[4 * b + 3] + a3
                a4 = d * lhi[4 * b] + a4
                a5 = d * lhi[4 * b + 1] + a5
                a6 = d * lhi[4 * b + 2] + a6
                a7 = d * lhi[4 * b + 3] + a7
            acc = ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3))
            out[r] = acc + mins if has_min else acc


# Q8_0 repacked so that ggml's lanes are contiguous: ggml's AVX2 vec_dot_q8_0_q8_0 sums each
# block as 8 int32 lanes, lane L holding values 4L..4L+3. Byte 4L+k of block b sits at
# k*8*nb + 8*b + L (k < 4, L < 8), so a lane of every block is the sum of 4 contiguous
# vectors; then d of every block as half floats. Same bytes, same size as the file's rows.
Q8_0_PACKED = 101


def pack_q8_0(raw: np.ndarray) -> np.ndarray:
    """Q8_0 rows uint8 [n, nb*34] -> repacked rows uint8 [n, nb*34] (layout above)."""
    n, rb = raw.shape
    nb = rb // 34
    blocks = np.asarray(raw).reshape(n, nb, 34)
    out = np.empty((n, rb), np.uint8)
    out[:, :32 * nb] = blocks[:, :, 2:].reshape(n, nb, 8, 4).transpose(0, 3, 1, 2).reshape(n, 32 * nb)
    out[:, 32 * nb:] = blocks[:, :, :2].reshape(n, 2 * nb)
    return out


def unpack_q8_0(packed: np.ndarray) -> np.ndarray:
    """pack_q8_0's inverse."""
    n, rb = packed.shape
    nb = rb // 34
    raw = np.empty((n, nb, 34), np.uint8)
    raw[:, :, :2] = packed[:, 32 * nb:].reshape(n, nb, 2)
    raw[:, :, 2:] = packed[:, :32 * nb].reshape(n, 4, nb, 8).transpose(0, 2, 3, 1).reshape(n, nb, 32)
    return raw.reshape(n, rb)


# formats with a packed layout -> its pseudo type code in matvec_fused / _dequantize_packed
PACKED_CODE = {T.Q4_1: Q4_1_PACKED, T.Q4_0: Q4_0_PACKED, T.Q5_0: Q5_0_PACKED, T.Q8_0: Q8_0_PACKED}
_Q4_BLOCK = {T.Q4_1: 20, T.Q4_0: 18, T.Q5_0: 22}  # the _pack_q4 formats' block bytes


def pack_rows(raw: np.ndarray, ggml_type) -> np.ndarray | None:
    """The packed copy of a weight's rows if its format has a packed decode kernel, else None."""
    if ggml_type in _Q4_BLOCK:
        return _pack_q4(raw, _Q4_BLOCK[ggml_type])
    if ggml_type == T.Q8_0:
        return pack_q8_0(raw)
    return None


def unpack_rows(packed: np.ndarray, ggml_type) -> np.ndarray:
    """pack_rows' inverse."""
    if ggml_type in _Q4_BLOCK:
        return _unpack_q4(packed, _Q4_BLOCK[ggml_type])
    return unpack_q8_0(packed)


# the same sums as _matvec_q8_0 (ggml's AVX2 vec_dot_q8_0_q8_0 order), so the results are
# bit-identical. The lane sums are computed in int32 and stored as int32 before the float
# conversion: numba types int8*int32 as int64, and only the store lets LLVM narrow the
# vectors back to 8 lanes (with float or int64 arithmetic this loop ran 2-4x slower).
@njit(cache=True, parallel=True, fastmath={"contract"})
def _matvec_q8_0_packed(w, table, xq, xd, out):
    n_rows, rb = w.shape
    nb = rb // 34
    n8 = 8 * nb
    nq = 32 * nb
    xe = np.empty(nq, np.int32)
    for k in range(4):
        for b in range(nb):
            for lane in range(8):
                xe[k * n8 + 8 * b + lane] = xq[b * 32 + 4 * lane + k]
    for task in prange((n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        isum = np.empty(n8, np.int32)
        lanes = np.empty(n8, np.float32)
        for r in range(task * ROWS_PER_TASK, min(n_rows, (task + 1) * ROWS_PER_TASK)):
            row = w[r]
            qs = row.view(np.int8)
            for i in range(n8):  # contiguous: vectorized (vpmulld)
                isum[i] = (np.int32(qs[i]) * xe[i] + np.int32(qs[n8 + i]) * xe[n8 + i]
                           + np.int32(qs[2 * n8 + i]) * xe[2 * n8 + i] + np.int32(qs[3 * n8 + i]) * xe[3 * n8 + i])
            for i in range(n8):
                lanes[i] = np.float32(isum[i])
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
            for b in range(nb):
                o = 8 * b
                d = _f16(table, row, nq + 2 * b) * xd[b]
                a0 = d * lanes[o] + a0
                a1 = d * lanes[o + 1] + a1
                a2 = d * lanes[o + 2] + a2
                a3 = d * lanes[o + 3] + a3
                a4 = d * lanes[o + 4] + a4
                a5 = d * lanes[o + 5] + a5
                a6 = d * lanes[o + 6] + a6
                a7 = d * lanes[o + 7] + a7
            out[r] = ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3))


@njit(cache=True, parallel=True)
def _dequantize_packed(t, w, table, out, mins):
    """Packed rows (t: a PACKED_CODE value) -> float32 rows [n, K] for the prompt path,
    the same values as the quants registry's dequantize of the file's rows; Q4_1 also fills
    mins [n, K/32] with each block's m."""
    n_rows, rb = w.shape
    for r in prange(n_rows):
        row = w[r]
        y = out[r]
        if t != Q8_0_PACKED:
            has_min = t == Q4_1_PACKED
            five = t == Q5_0_PACKED
            nb = rb // 20 if has_min else (rb // 22 if five else rb // 18)
            n4 = 4 * nb
            nq = 16 * nb
            hd = nq + 4 * nb if five else nq
            off = 0 if has_min else (16 if five else 8)
            for b in range(nb):
                d = _f16(table, row, hd + 2 * b)
                m = np.float32(0.0)
                if has_min:
                    m = _f16(table, row, nq + 2 * nb + 2 * b)
                    mins[r, b] = m
                for lane in range(4):
                    h = np.int32(row[nq + 4 * b + lane]) if five else 0
                    for k in range(4):
                        q = np.int32(row[k * n4 + 4 * b + lane])
                        lo = (q & 15) | (((h >> (2 * k)) & 1) << 4)
                        hi = (q >> 4) | (((h >> (2 * k + 1)) & 1) << 4)
                        y[32 * b + 4 * lane + k] = np.float32(lo - off) * d + m
                        y[32 * b + 16 + 4 * lane + k] = np.float32(hi - off) * d + m
        else:
            nb = rb // 34
            n8 = 8 * nb
            nq = 32 * nb
            qs = row.view(np.int8)
            for b in range(nb):
                d = _f16(table, row, nq + 2 * b)
                for lane in range(8):
                    for k in range(4):
                        y[32 * b + 4 * lane + k] = np.float32(qs[k * n8 + 8 * b + lane]) * d


@njit(cache=True)
def matvec_fused(t, w, table, xq, xd, xs, xhat, out):
    """out = W x for one token with W's fused kernel (t: its ggml type, in FUSED_TYPES, or
    a PACKED_CODE value for pack_rows rows); x given as its rounded activations (xq/xd/xs for the
    integer kernels, xhat for floats)."""
    if t == Q4_1_PACKED:
        _matvec_q4_packed(w, table, xq, xd, xs, out, 20)
    elif t == Q4_0_PACKED:
        _matvec_q4_packed(w, table, xq, xd, xs, out, 18)
    elif t == Q5_0_PACKED:
        _matvec_q4_packed(w, table, xq, xd, xs, out, 22)
    elif t == Q8_0_PACKED:
        _matvec_q8_0_packed(w, table, xq, xd, out)
    elif t == _Q4_1:
        _matvec_q4_1(w, table, xq, xd, xs, out)
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
    elif t == _F16:
        _matvec_f16(w, table, xhat, out)
    else:
        _matvec_f32(w, xhat, out)


_ACT_OF_TYPE[Q4_1_PACKED] = ACT_Q8_1
_ACT_OF_TYPE[Q8_0_PACKED] = ACT_Q8_0
_ACT_OF_TYPE[Q4_0_PACKED] = ACT_Q8_0
_ACT_OF_TYPE[Q5_0_PACKED] = ACT_Q8_0


@njit(cache=True)
def act_mode_of(t):
    return _ACT_OF_TYPE[t]
