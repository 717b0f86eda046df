"""Q5_1: blocks of 32 values, a scale and a minimum, 5-bit quants (x = d * q + m).

block_q5_1 (24 bytes): d    f16         bytes 0..1
                       m    f16         bytes 2..3
                       qh   uint32 LE   bytes 4..7: bit j = 5th bit of value j (j < 32)
                       qs   16 B        bytes 8..23: low nibble of qs[j] = value j,
                                                     high nibble of qs[j] = value j + 16
quantize is quantize_row_q5_1_ref: d = (max - min) / 31, m = min,
q = (uint8)((x - min) / d + 0.5) (no clamp, as in ggml).

Products: `dot`/`rows` (ggml's AVX2 vec_dot_q5_1_q8_1) against Q8_1 activations, whose
per-block sums carry the minimum's term.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange

from .simd import (_i1, _i8, _i32, _load, _nibbles, _vec)
from .block32 import high_bits, min_kernels, min_max, pack_pair, read_qh, write_qh
from .rounding import read_f16_pair, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_1]
HALF = QK // 2


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d, m = read_f16_pair(row, o)
        qh = read_qh(row, o + 4)
        for j in range(HALF):
            q = np.int32(row[o + 8 + j])
            h0, h1 = high_bits(qh, j)
            y[b * QK + j] = np.float32((q & 0xF) | h0) * d + m
            y[b * QK + HALF + j] = np.float32((q >> 4) | h1) * d + m


@njit(cache=True, nogil=True)
def quantize_row(xr, row):
    n = xr.shape[0]
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        o = b * BLOCK_BYTES
        vmin, vmax = min_max(QK, xb)
        d = (vmax - vmin) / np.float32(31)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        write_f16(row, o, d)
        write_f16(row, o + 2, vmin)
        qh = np.int64(0)
        for j in range(HALF):
            q0 = int((xb[j] - vmin) * inv + np.float32(0.5)) & 0xFF
            q1 = int((xb[HALF + j] - vmin) * inv + np.float32(0.5)) & 0xFF
            qh = pack_pair(row, o + 8, qh, j, q0, q1)
        write_qh(row, o + 4, qh)


# --- the product with Q8_1 activations (ggml's AVX2 vec_dot_q5_1_q8_1) ---------------------

def _values(builder, blk):
    """ggml's qx = nibbles | (fifth bit & 0x10): the values 0..31 as unsigned bytes."""
    bits = builder.bitcast(_load(builder, blk, _i32, 4), _vec(_i1, 32))
    high = builder.select(bits, ir.Constant(_vec(_i8, 32), [0x10] * 32), ir.Constant(_vec(_i8, 32), [0] * 32))
    return builder.or_(_nibbles(builder, _load(builder, blk, _vec(_i8, 16), 8)), high)


dot, rows = min_kernels(BLOCK_BYTES, _values)


@njit(cache=True, parallel=True)
def matvec(w, ctx, xq, xd, xs, xhat, out):
    """w = d*q + m, as ggml's AVX2 vec_dot_q5_1_q8_1: per block 8 integer lanes (values
    4l..4l+3 of the 5-bit quants), each accumulated over blocks as fma(d*dx, lane, acc_l); the
    min terms fma'd into one scalar (m * the Q8_1 block sum); result = hsum_float_8(acc) + mins."""
    for r in prange(w.shape[0]):
        out[r] = dot(w, r, xq, xd, xs, ctx.isa)


@njit(cache=True, parallel=True)
def matmat(w, ctx, xq, xd, xs, xhat, out):
    """A batch: each (row, token) matvec's float; rows over threads."""
    for r in prange(w.shape[0]):
        rows(w, r, xq, xd, xs, out, ctx.isa)
