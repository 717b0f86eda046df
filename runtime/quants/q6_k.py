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
from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange
from numba.extending import intrinsic

from . import simd
from .simd import (_ZERO8, _dpbusd, _f32, _fn, _half, _hsum8, _i16, _i32, _i8, _lane_accumulate, _lanes_finish, _load,
                   _mask, _scaled_lanes, _vec, _vnni, has_vnni)
from . import kbatch
from .ksearch import GROUP_MAX_EPS, f32, make_qx_quants, quantize_row16
from .rounding import nearest_int, read_f16, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K]


@njit(cache=True, inline='always')
def _scale(sc, j):
    """Sub-block j's int8 scale."""
    s = np.int32(sc[j])
    return s - ((s & 0x80) << 1)


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
                    yb[128 * h + 32 * s + l] = d * f32(_scale(sc, 2 * s + l // 16)) * f32(q)


@njit(cache=True, inline='always')
def _write_scales(blk, scales, max_scale, max_abs_scale, L):
    """The 16 int8 scales against max_scale (iscale = -128 / max_scale); d. An all-zero block
    (scales below GROUP_MAX_EPS) is all-zero bytes: d = +0.0 and quants 0."""
    if max_abs_scale < GROUP_MAX_EPS:
        blk[:] = 0
        L[:] = 0
        return f32(0.0)
    iscale = f32(-128) / max_scale
    sc = blk[192:208]
    for j in range(16):
        sc[j] = np.uint8(min(127, nearest_int(iscale * scales[j])) & 0xFF)
    return write_f16(blk, 208, f32(1.0) / iscale)


@njit(cache=True, inline='always')
def _write_quants(L, blk):
    """L (0..63): the low 4 bits into ql, the high 2 into qh."""
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


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row(xr, row):
    quantize_row16(make_qx_quants, 32, _write_scales, _scale, 192, _write_quants, BLOCK_BYTES, xr, row)


# --- the product with Q8_K activations (ggml's AVX2 vec_dot_q6_K_q8_K) ---------------------

def _quants(builder, blk):
    """The block's 256 quants q (0..63) as 8 <32 x i8> vectors, vector g = values 32g..32g+31:
    per 128 values (half j) their low 4 bits from ql's 64 bytes (values 0-31 and 32-63 in the
    low nibbles of its two 32-byte halves, 64-95 and 96-127 in the high ones), their 2 high
    bits from qh's 32 bytes (bits 2k..2k+1 of byte l for value 32k + l)."""
    v32 = _vec(_i8, 32)
    m4 = ir.Constant(v32, [15] * 32)
    m2 = ir.Constant(v32, [3] * 32)
    quants = []
    for j in range(2):
        bits1 = _load(builder, blk, v32, 64 * j)
        bits2 = _load(builder, blk, v32, 64 * j + 32)
        bits_h = _load(builder, blk, v32, 128 + 32 * j)
        low = [builder.and_(bits1, m4), builder.and_(bits2, m4),
               builder.lshr(bits1, ir.Constant(v32, [4] * 32)), builder.lshr(bits2, ir.Constant(v32, [4] * 32))]
        for k in range(4):
            high = builder.and_(builder.lshr(bits_h, ir.Constant(v32, [2 * k] * 32)), m2)
            quants.append(builder.or_(low[k], builder.shl(high, ir.Constant(v32, [4] * 32))))
    return quants


def _dot_body(builder, blk, y, scales, state):
    """ggml's AVX2 vec_dot_q6_K_q8_K for one 256-value block (210 B: ql[128], qh[64],
    int8 scales[16], d): 8 int32 lanes of sum(scale * (q - 32) * y) (q: `_quants`), then
    acc = fma(d*dx, lanes, acc), scale scales[v / 16] for value v."""
    v32 = _vec(_i8, 32)
    v16 = _vec(_i16, 16)
    # the 16 scales as int16 words (one vpmovsxbw); a group's pair of scales, the first on words
    # 0-7 (its values 0-15: lanes 0-3), the second on words 8-15, by one shuffle
    sc = builder.sext(_load(builder, blk, _vec(_i8, 16), 192), v16)
    lanes = None
    for g, q in enumerate(_quants(builder, blk)):
        qy = _load(builder, y, v32, 32 * g)
        # (q - 32) * y in int16 pairs: vpmaddubsw(q, y) - vpmaddubsw(32, y), exact (ggml's)
        pairs = builder.sub(simd._pairs_us(builder, q, qy), simd._pairs_us(builder, ir.Constant(v32, [32] * 32), qy))
        pair_scales = builder.shuffle_vector(sc, sc, _mask([2 * g] * 8 + [2 * g + 1] * 8))
        lanes = simd._scaled_pairs_acc(builder, lanes, pairs, pair_scales)
    d = builder.fmul(scales[0], _half(builder, blk, 208))  # ggml: y.d * x.d
    return [_lane_accumulate(builder, d, lanes, state[0])]


def _wide_dot_body(builder, blk, y, st, dx, state):
    """_dot_body's 8 integer lanes on AVX-512 VNNI, 64 values per step. Per 128 values (half h)
    the quants q (0..63): qh's 32 bytes twice in a 512-bit vector, masked to the 2-bit fields of
    values 0-31 and 64-95 (bits 0-1, 4-5; first copy) and 32-63 and 96-127 (bits 2-3, 6-7;
    second copy), shifted per copy to bits 4-5 (word shifts: what crosses into a neighbouring
    byte lands in its bits 0-3, which the select replaces) and one bit select with ql's nibbles
    each. Then per 64 values vpdpbusd(st, q, y) = sum4((q - 32) * y) per int32 lane (st: the
    token's -32 * sum4(y), `offsets32`; |.| <= 4 * 32 * 128 < 2^15, so the lane is its own low
    word) and one vpdpwssd multiplies the lanes with their scales (words sc | 0 << 16: the
    lane's high word, its sign, meets 0). Lanes 0-7 of the 16 hold the even 32-groups, 8-15 the
    odd ones: added, the 8 lanes of ggml's AVX2 loop, the same exact integers, so the same fma
    steps give its floats. (Two vpdpwssd chains, one per half: on one chain of four LLVM splits
    three into vpmaddwd + vpaddd.)"""
    v64, w32, i32x16 = _vec(_i8, 64), _vec(_i16, 32), _vec(_i32, 16)
    # the 16 scales as dwords sc | 0 << 16
    sc = builder.and_(builder.sext(_load(builder, blk, _vec(_i8, 16), 192), i32x16), ir.Constant(i32x16, [0xFFFF] * 16))
    dpwssd = _fn(builder, "llvm.x86.avx512.vpdpwssd.512", i32x16, [i32x16] * 3)
    low4, high4 = ir.Constant(v64, [0x0F] * 64), ir.Constant(v64, [0xF0] * 64)
    halves = []
    for h in range(2):
        ql = _load(builder, blk, v64, 64 * h)
        qh = _load(builder, blk, _vec(_i8, 32), 128 + 32 * h)
        qh2 = builder.and_(builder.bitcast(builder.shuffle_vector(qh, qh, _mask(list(range(32)) * 2)), w32),
                           ir.Constant(w32, [0x3333] * 16 + [0xCCCC] * 16))
        hi_a = builder.bitcast(builder.shl(qh2, ir.Constant(w32, [4] * 16 + [2] * 16)), v64)  # values 0-63
        hi_b = builder.bitcast(builder.lshr(qh2, ir.Constant(w32, [0] * 16 + [2] * 16)), v64)  # values 64-127
        lo_b = builder.bitcast(builder.lshr(builder.bitcast(ql, w32), ir.Constant(w32, [4] * 32)), v64)
        acc = ir.Constant(i32x16, [0] * 16)
        for c, (lo, hi) in enumerate(((ql, hi_a), (lo_b, hi_b)), start=2 * h):  # values 64c..64c+63
            q = builder.or_(builder.and_(lo, low4), builder.and_(hi, high4))
            lanes = _dpbusd(builder, _load(builder, st, i32x16, 64 * c), q, _load(builder, y, v64, 64 * c))
            words = builder.shuffle_vector(sc, sc, _mask([4 * c + i // 4 for i in range(16)]))  # scales 4c..4c+3, 4 lanes each
            acc = builder.call(dpwssd, [acc, lanes, words])
        halves.append(acc)
    acc = builder.add(*halves)
    lanes8 = builder.add(builder.shuffle_vector(acc, acc, _mask(range(8))), builder.shuffle_vector(acc, acc, _mask(range(8, 16))))
    d = builder.fmul(dx, _half(builder, blk, 208))  # ggml: y.d * x.d
    return _lane_accumulate(builder, d, lanes8, state)




def _row_body(builder, blk, y, scales, state, st):
    """A block of dot's row: _wide_dot_body on AVX-512 VNNI (st: the block's part of
    offsets32), _dot_body elsewhere."""
    if _vnni():
        return [_wide_dot_body(builder, blk, y, st, scales[0], state[0])]
    return _dot_body(builder, blk, y, scales, state)


# An intrinsic (w, r, xq, xd, st, isa) -> float32: row r of w times one token (xq int8 [K], xd
# float32 [K/32]; st int32 [K/4] = offsets32(xq), one byte per value, read on AVX-512 VNNI only),
# as ggml's AVX2 vec_dot_q6_K_q8_K (_dot_body; _wide_dot_body with VNNI: the same integer lanes).
dot = intrinsic(simd._row_kernel(BLOCK_BYTES, 1, [_ZERO8], _row_body, _lanes_finish, QK, per_value=(1,)))


# (inlined, as q4_k.bsum_pairs)
@njit(cache=True, inline="always")
def offsets32(xq):
    """_wide_dot_body's start lanes: -32 times each 4 activations' sum, int32 [K/4]."""
    st = np.empty(xq.shape[0] // 4, np.int32)
    for i in range(st.shape[0]):
        st[i] = -32 * (np.int32(xq[4 * i]) + np.int32(xq[4 * i + 1]) + np.int32(xq[4 * i + 2]) + np.int32(xq[4 * i + 3]))
    return st


def _batch_body(builder, blk, ys, dx, bsp, state):
    """One block of a row times 8 tokens (runtime.quants.kbatch), each token's 8 integer lanes
    and fma step those of _dot_body. The block is unpacked once, to q - 32 (signed bytes), and
    the activations come as y + 128 (unsigned bytes, `ys` points into matmat's shifted copy),
    so one vpmaddubsw per 32 values and token gives (y + 128) * (q - 32) and the lanes
    sc * (q - 32) * y = sc * (y + 128) * (q - 32) - 128 * sc * (q - 32), the last term the
    row's alone: computed once for the 8 tokens (exact integers; pairs within int16:
    |255 * 32 * 2| < 2^15)."""
    v32 = _vec(_i8, 32)
    sc = [builder.sext(_load(builder, blk, _i8, 192 + i), _i32) for i in range(16)]
    quants = [builder.sub(q, ir.Constant(v32, [32] * 32)) for q in _quants(builder, blk)]  # q - 32
    ones = ir.Constant(v32, [1] * 32)
    offset = None  # 128 * sc * (q - 32), per lane
    for g in range(8):
        part = _scaled_lanes(builder, ones, quants[g], sc[2 * g], sc[2 * g + 1], 0)
        offset = part if offset is None else builder.add(offset, part)
    offset = builder.shl(offset, ir.Constant(offset.type, [7] * 8))
    d = _half(builder, blk, 208)
    new = []
    for i, y in enumerate(ys):
        lanes = None
        for g in range(8):
            part = _scaled_lanes(builder, _load(builder, y, v32, 32 * g), quants[g], sc[2 * g], sc[2 * g + 1], 0)
            lanes = part if lanes is None else builder.add(lanes, part)
        dx_i = builder.extract_element(dx, ir.Constant(_i32, i))
        new.append(_lane_accumulate(builder, builder.fmul(dx_i, d), builder.sub(lanes, offset), state[i]))
    return new


# the batch product (runtime.quants.kbatch), the activations as y + 128
matmat = kbatch.batch_products("Q6_K", BLOCK_BYTES, [_ZERO8] * kbatch.GROUP, _batch_body,
                               lambda builder, state: kbatch.gather8(builder, [_hsum8(builder, a) for a in state], _f32),
                               __name__, shifted=True)


@njit(cache=True, parallel=True)
def matvec(w, ctx, xq, xd, xs, xhat, out):
    """As ggml's AVX2 vec_dot_q6_K_q8_K: per 256-value block 8 integer lanes of
    scale * (q - 32) * x, acc_l = fma(dx*d, lane, acc_l), result hsum_float_8(acc)."""
    st = offsets32(xq) if has_vnni(ctx.isa) else np.empty(0, np.int32)
    for r in prange(w.shape[0]):
        out[r] = dot(w, r, xq, xd, st, ctx.isa)

