"""Q8_0: blocks of 32 values, one scale, int8 quants (x = d * q).

block_q8_0 (34 bytes): d    f16   bytes 0..1
                       qs   int8  bytes 2..33   value j = d * qs[j]
quantize is quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d) (half away from zero).
"""

import numpy as np
from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, prange

from llvmlite import ir

from .simd import (_ZERO8, _half, _i8, _lane_accumulate, _lanes_finish, _lanes_signed, _load, _vec, row_kernels)
from .block32 import vnni_kernels
from .ksearch import signed_absmax
from .rounding import read_f16, roundf, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d = read_f16(row, o)
        for j in range(QK):
            q = np.int32(row[o + 2 + j])
            y[b * QK + j] = np.float32(q - ((q & 0x80) << 1)) * d


@njit(cache=True, nogil=True)
def quantize_row(xr, row):
    n = xr.shape[0]
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        o = b * BLOCK_BYTES
        _, amax = signed_absmax(QK, xb)
        d = amax / np.float32(127)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        write_f16(row, o, d)
        for j in range(QK):
            row[o + 2 + j] = np.uint8(np.int32(roundf(xb[j] * inv)) & 0xFF)


# --- the product with Q8_0 activations (ggml's AVX2 vec_dot_q8_0_q8_0) ---------------------

def _dot_body(builder, blk, y, scales, state):
    qy = _load(builder, y, _vec(_i8, 32), 0)
    lanes = _lanes_signed(builder, _load(builder, blk, _vec(_i8, 32), 2), qy)
    return [_lane_accumulate(builder, scales[0], lanes, state[0])]  # (scales[0]: d * d_y, d_at=0)


dot, rows = row_kernels(BLOCK_BYTES, 1, [_ZERO8], _dot_body, _lanes_finish, d_at=0)


@njit(cache=True, parallel=True)
def matvec(w, ctx, xq, xd, xs, xhat, out):
    """As ggml's AVX2 vec_dot_q8_0_q8_0 (and llamafile's tinyBLAS_Q0_AVX, the same order): per
    block 8 integer lanes, acc_l = fma(d_w*d_x, lane, acc_l), result hsum_float_8(acc)."""
    for r in prange(w.shape[0]):
        out[r] = dot(w, r, xq, xd, ctx.isa)


def _unpack_shifted(builder, blk):
    """A block's scale and its quants + 128 as unsigned bytes (runtime.quants.simd.tile_kernel)."""
    qs = _load(builder, blk, _vec(_i8, 32), 2)
    return _half(builder, blk, 0), builder.xor(qs, ir.Constant(_vec(_i8, 32), [128 - 256] * 32))


matmat = vnni_kernels("Q8_0", BLOCK_BYTES, _unpack_shifted, rows)  # the batch product (runtime.quants.block32.matmat)
