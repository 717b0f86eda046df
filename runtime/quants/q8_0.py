"""Q8_0: blocks of 32 values, one scale, int8 quants (x = d * q).

block_q8_0 (34 bytes): d    f16   bytes 0..1
                       qs   int8  bytes 2..33   value j = d * qs[j]
quantize is quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d) (half away from zero).
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, prange

from llvmlite import ir

from .simd import (_ZERO8, _half, _i8, _lane_accumulate, _lanes_finish, _lanes_signed, _load, _vec, has_vnni,
                    pair_layout, pair_tile_kernel, row_kernels, tile_kernel)
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
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(xb[j]))
        d = amax / np.float32(127)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        write_f16(row, o, d)
        for j in range(QK):
            row[o + 2 + j] = np.uint8(np.int32(roundf(xb[j] * inv)) & 0xFF)


# --- the product with Q8_0 activations (ggml's AVX2 vec_dot_q8_0_q8_0) ---------------------

def _dot_body(builder, blk, y, scales, state):
    qy = _load(builder, y, _vec(_i8, 32), 0)
    lanes = _lanes_signed(builder, _load(builder, blk, _vec(_i8, 32), 2), qy)
    return [_lane_accumulate(builder, builder.fmul(_half(builder, blk, 0), scales[0]), lanes, state[0])]



dot, rows = row_kernels(BLOCK_BYTES, 1, [_ZERO8], _dot_body, _lanes_finish)


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


TILE_ROWS, TILE_PAIRS = 4, 4  # the VNNI batch kernel's step: rows x pairs of tokens
_tile = pair_tile_kernel(BLOCK_BYTES, _unpack_shifted, TILE_ROWS, TILE_PAIRS)
CHUNK_GROUPS = 32  # row groups per work item
_tile1 = tile_kernel(BLOCK_BYTES, _unpack_shifted, TILE_ROWS, 1)  # a batch's leftover tokens


@njit(cache=True, parallel=True)
def matmat(w, ctx, xq, xd, xs, xhat, out):
    """A batch: each (row, token) matvec's float. With VNNI TILE_ROWS rows x TILE_PAIRS pairs of
    tokens at a time (runtime.quants.simd.pair_tile_kernel: a pair per 512-bit vector, one
    vpdpbusd per two block products, the pairs' activations laid out once by pair_layout), each
    tile's tokens meeting CHUNK_GROUPS groups of rows while their activations stay in L1; the
    leftover tokens one at a time (tile_kernel); elsewhere one row and four tokens at a time."""
    if has_vnni(ctx.isa):
        n_rows, n_tok = w.shape[0], xq.shape[0]
        yp, sp, dp = pair_layout(xq, xd)
        n_tiles = n_tok // (2 * TILE_PAIRS)
        n_groups = n_rows // TILE_ROWS
        n_chunks = (n_groups + CHUNK_GROUPS - 1) // CHUNK_GROUPS
        # a tile's activations stay in L1 while a chunk of rows passes
        for job in prange(n_tiles * n_chunks):
            p0 = job // n_chunks * TILE_PAIRS
            c = job % n_chunks
            for g in range(c * CHUNK_GROUPS, min(n_groups, (c + 1) * CHUNK_GROUPS)):
                _tile(w, TILE_ROWS * g, yp, sp, dp, p0, out, ctx.isa)
        for g in prange(n_groups):
            for t in range(2 * TILE_PAIRS * n_tiles, n_tok):
                _tile1(w, TILE_ROWS * g, xq, xd, t, out, ctx.isa)
        for r in range(n_rows - n_rows % TILE_ROWS, n_rows):
            rows(w, r, xq, xd, out, ctx.isa)
    else:
        for r in prange(w.shape[0]):
            rows(w, r, xq, xd, out, ctx.isa)
