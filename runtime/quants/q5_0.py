"""Q5_0: blocks of 32 values, one scale, 5-bit quants offset by 16 (x = d * (q - 16)).

block_q5_0 (22 bytes): d    f16         bytes 0..1
                       qh   uint32 LE   bytes 2..5: bit j = 5th bit of value j (j < 32)
                       qs   16 B        bytes 6..21: low nibble of qs[j] = value j,
                                                     high nibble of qs[j] = value j + 16
quantize is quantize_row_q5_0_ref: d = (the value of largest magnitude) / -16,
q = min(31, (int8)(x / d + 16.5)).
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange

from .simd import (_ZERO8, _half, _i1, _i8, _i32, _nibbles, _lane_accumulate, _lanes_finish, _lanes_signed, _load, _vec, row_kernels)
from .block32 import high_bits, pack_pair, read_qh, vnni_kernels, write_qh
from .ksearch import signed_absmax
from .rounding import read_f16, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_0]
HALF = QK // 2


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d = read_f16(row, o)
        qh = read_qh(row, o + 2)
        for j in range(HALF):
            q = np.int32(row[o + 6 + j])
            h0, h1 = high_bits(qh, j)
            y[b * QK + j] = np.float32(((q & 0xF) | h0) - 16) * d
            y[b * QK + HALF + j] = np.float32(((q >> 4) | h1) - 16) * d


@njit(cache=True, nogil=True)
def quantize_row(xr, row):
    n = xr.shape[0]
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        o = b * BLOCK_BYTES
        vmax, _ = signed_absmax(QK, xb)
        d = vmax / np.float32(-16)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        write_f16(row, o, d)
        qh = np.int64(0)
        for j in range(HALF):
            q0 = min(31, int(xb[j] * inv + np.float32(16.5)))
            q1 = min(31, int(xb[HALF + j] * inv + np.float32(16.5)))
            qh = pack_pair(row, o + 6, qh, j, q0, q1)
        write_qh(row, o + 2, qh)


# --- the product with Q8_0 activations (ggml's AVX2 vec_dot_q5_0_q8_0) ---------------------

def _values(builder, blk):
    """ggml's qx = nibbles | (~fifth bit & 0xF0): the 32 values less 16 as signed bytes."""
    bits = builder.bitcast(_load(builder, blk, _i32, 2), _vec(_i1, 32))
    high = builder.select(bits, ir.Constant(_vec(_i8, 32), [0] * 32), ir.Constant(_vec(_i8, 32), [0xF0] * 32))
    return builder.or_(_nibbles(builder, _load(builder, blk, _vec(_i8, 16), 6)), high)


def _dot_body(builder, blk, y, scales, state):
    qy = _load(builder, y, _vec(_i8, 32), 0)
    lanes = _lanes_signed(builder, _values(builder, blk), qy)
    return [_lane_accumulate(builder, builder.fmul(_half(builder, blk, 0), scales[0]), lanes, state[0])]


def _unpack_shifted(builder, blk):
    """A block's scale and its values less 16, + 128, as unsigned bytes (runtime.quants.simd.tile_kernel)."""
    return _half(builder, blk, 0), builder.xor(_values(builder, blk), ir.Constant(_vec(_i8, 32), [128 - 256] * 32))



dot, rows = row_kernels(BLOCK_BYTES, 1, [_ZERO8], _dot_body, _lanes_finish)


@njit(cache=True, parallel=True)
def matvec(w, ctx, xq, xd, xs, xhat, out):
    """As ggml's AVX2 vec_dot_q5_0_q8_0: Q8_0's lanes and order."""
    for r in prange(w.shape[0]):
        out[r] = dot(w, r, xq, xd, ctx.isa)


matmat = vnni_kernels("Q5_0", BLOCK_BYTES, _unpack_shifted, rows)  # the batch product (runtime.quants.block32.matmat)
