"""Q6_K: super-blocks of 256 values in 16 sub-blocks of 16, each with an int8 scale
(x = d * sc * (q - 32), q 6-bit: 4 low bits in ql, 2 high bits in qh).

block_q6_K (210 bytes): ql      128 B  bytes 0..127    per 128 values (half h): 64 bytes; value
                                                       128h + 32s + l takes the low (s < 2) or
                                                       high (s >= 2) nibble of ql[64h + 32(s%2) + l]
                        qh      64 B   bytes 128..191  per half: 32 bytes; bits 2s..2s+1 of
                                                       qh[32h + l] are that value's high 2 bits
                        scales  16 B   bytes 192..207  int8 per sub-block
                        d       f16    bytes 208..209
quantize is quantize_row_q6_K_ref: make_qx_quants(16, 32, rmse_type 1) per sub-block, int8
scales against the one of largest magnitude (iscale = -128 / that scale), values requantized.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange

from ..simd import _ZERO8, _half, _i32, _i8, _lane_accumulate, _lanes_finish, _load, _scaled_lanes, _vec, row_kernels
from .ksearch import GROUP_MAX_EPS, f32, make_qx_quants, signed_absmax
from .rounding import nearest_int, read_f16, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K]


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d = read_f16(row, o + 208)
        yb = y[b * QK:(b + 1) * QK]
        for h in range(2):
            ql = row[o + 64 * h:o + 64 * h + 64]
            qh = row[o + 128 + 32 * h:o + 128 + 32 * h + 32]
            sc = row[o + 192 + 8 * h:o + 192 + 8 * h + 8]
            for s in range(4):
                for l in range(32):
                    lo = np.int32(ql[32 * (s % 2) + l])
                    lo = (lo & 0xF) if s < 2 else (lo >> 4)
                    q = (lo | (((np.int32(qh[l]) >> (2 * s)) & 3) << 4)) - 32
                    scale = np.int32(sc[2 * s + l // 16])
                    scale = scale - ((scale & 0x80) << 1)
                    yb[128 * h + 32 * s + l] = d * f32(scale) * f32(q)


@njit(cache=True, nogil=True)
def quantize_row(xr, row):
    n = xr.shape[0]
    L = np.empty(QK, np.int8)
    scales = np.empty(16, np.float32)
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        blk = row[b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES]
        for j in range(16):
            scales[j] = make_qx_quants(16, 32, xb[16 * j:16 * j + 16], L[16 * j:16 * j + 16])
        max_scale, max_abs_scale = signed_absmax(16, scales)
        if max_abs_scale < GROUP_MAX_EPS:
            blk[:] = 0  # all-zero block; d = +0.0 is also all-zero bytes
            continue
        iscale = f32(-128) / max_scale
        d = write_f16(blk, 208, f32(1.0) / iscale)
        sc = blk[192:208]
        for j in range(16):
            sc[j] = np.uint8(min(127, nearest_int(iscale * scales[j])) & 0xFF)
        for j in range(16):
            s = np.int32(sc[j])
            s = s - ((s & 0x80) << 1)
            dj = d * f32(s)
            if dj == 0:
                continue
            for ii in range(16):
                l = nearest_int(xb[16 * j + ii] / dj)
                L[16 * j + ii] = max(-32, min(31, l)) + 32
        for h in range(2):
            ql = blk[64 * h:64 * h + 64]
            qh = blk[128 + 32 * h:128 + 32 * h + 32]
            for l in range(32):
                o = 128 * h + l
                q1 = np.int32(L[o])
                q2 = np.int32(L[o + 32])
                q3 = np.int32(L[o + 64])
                q4 = np.int32(L[o + 96])
                ql[l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
                ql[l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
                qh[l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


# --- the product with Q8_K activations (ggml's AVX2 vec_dot_q6_K_q8_K) ---------------------

def _dot_body(builder, blk, y, scales, state):
    """ggml's AVX2 vec_dot_q6_K_q8_K for one 256-value block (210 B: ql[128], qh[64],
    int8 scales[16], d): 8 int32 lanes of sum(scale * (q - 32) * y), then
    acc = fma(d*dx, lanes, acc). Value v: low 4 bits from ql (64 bytes per 128 values: values
    0-31 and 32-63 in the low nibbles, 64-95 and 96-127 in the high ones), 2 high bits from qh
    (bits 2k of byte l for values l + 32k), scale scales[v / 16]."""
    v32 = _vec(_i8, 32)
    m4 = ir.Constant(v32, [15] * 32)
    m2 = ir.Constant(v32, [3] * 32)
    sc = [builder.sext(_load(builder, blk, _i8, 192 + i), _i32) for i in range(16)]
    lanes = None
    for j in range(2):
        bits1 = _load(builder, blk, v32, 64 * j)
        bits2 = _load(builder, blk, v32, 64 * j + 32)
        bits_h = _load(builder, blk, v32, 128 + 32 * j)
        low = [builder.and_(bits1, m4), builder.and_(bits2, m4),
               builder.lshr(bits1, ir.Constant(v32, [4] * 32)), builder.lshr(bits2, ir.Constant(v32, [4] * 32))]
        for k in range(4):
            high = builder.and_(builder.lshr(bits_h, ir.Constant(v32, [2 * k] * 32)), m2)
            q = builder.or_(low[k], builder.shl(high, ir.Constant(v32, [4] * 32)))
            qy = _load(builder, y, v32, 128 * j + 32 * k)
            part = _scaled_lanes(builder, q, qy, sc[8 * j + 2 * k], sc[8 * j + 2 * k + 1], 32)
            lanes = part if lanes is None else builder.add(lanes, part)
    d = builder.fmul(scales[0], _half(builder, blk, 208))  # ggml: y.d * x.d
    return [_lane_accumulate(builder, d, lanes, state[0])]



dot, rows = row_kernels(BLOCK_BYTES, 1, [_ZERO8], _dot_body, _lanes_finish, block_values=QK)


@njit(cache=True, parallel=True)
def matvec(w, ctx, xq, xd, xs, xhat, out):
    """As ggml's AVX2 vec_dot_q6_K_q8_K: per 256-value block 8 integer lanes of
    scale * (q - 32) * x, acc_l = fma(dx*d, lane, acc_l), result hsum_float_8(acc)."""
    for r in prange(w.shape[0]):
        out[r] = dot(w, r, xq, xd, ctx.isa)


@njit(cache=True, parallel=True)
def matmat(w, ctx, xq, xd, xs, xhat, out):
    """A batch: each (row, token) matvec's float; rows over threads."""
    for r in prange(w.shape[0]):
        rows(w, r, xq, xd, out, ctx.isa)
