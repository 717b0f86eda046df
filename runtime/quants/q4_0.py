"""Q4_0: blocks of 32 values, one scale, 4-bit quants offset by 8 (x = d * (q - 8)).

block_q4_0 (18 bytes): d    f16    bytes 0..1
                       qs   16 B   bytes 2..17: low nibble of qs[j] = value j,
                                                high nibble of qs[j] = value j + 16
quantize is quantize_row_q4_0_ref: d = (the value of largest magnitude) / -8,
q = min(15, (int8)(x / d + 8.5)) (truncation toward zero, as the C cast does).

Products: `dot`/`rows` (ggml's AVX2 vec_dot_q4_0_q8_0) read the file's rows; matrices of rows a
multiple of 8 are repacked at load as llama.cpp repacks them on an AVX2 CPU (block_q4_0x8,
runtime.quants.block32.pack_x8) and multiplied in the order of its ggml_gemv/gemm_q4_0_8x8_q8_0.
"""

from __future__ import annotations

import numpy as np
from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import (_ZERO8, isa_typer, _broadcast8, _fma, _half, _halves_to_float, _i8, _i16, _f32, _lane_accumulate, _lanes_finish,
                    _lanes_signed, _load, _nibbles, _pair_add, _prefetch, _quad_lanes, _splat, _state_loop, _vec, row_kernels,
                    _dpbusd, _i32, _i64, _mask, _vnni, c_arrays, has_vnni)
from .block32 import Layout32, pack_x8, row_converters, vnni_kernels

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
LAYOUT = Layout32(BLOCK_BYTES, m=0, qh=0, qs=2, offset=8, nmax=15)  # the fields above
# ggml's dequantize_row_q4_0 and quantize_row_q4_0_ref (above), compiled for LAYOUT
dequantize_row, quantize_row = row_converters(LAYOUT, __name__)


# --- the product with Q8_0 activations, file layout (ggml's AVX2 vec_dot_q4_0_q8_0) --------

def _dot_body(builder, blk, y, scales, state):
    qy = _load(builder, y, _vec(_i8, 32), 0)
    qx = builder.sub(_nibbles(builder, _load(builder, blk, _vec(_i8, 16), 2)), ir.Constant(_vec(_i8, 32), [8] * 32))
    lanes = _lanes_signed(builder, qx, qy)
    return [_lane_accumulate(builder, scales[0], lanes, state[0])]  # (scales[0]: d * d_y, d_at=0)


dot, rows = row_kernels(BLOCK_BYTES, 1, [_ZERO8], _dot_body, _lanes_finish, d_at=0)


@njit(cache=True, parallel=True)
def matvec(w, ctx, xq, xd, xs, xhat, out):
    """A Q4_0 matrix llama.cpp leaves in the file's layout (rows not a multiple of 8, or the
    token embeddings as a tied output): ggml's AVX2 vec_dot_q4_0_q8_0, Q8_0's lanes and order."""
    for r in prange(w.shape[0]):
        out[r] = dot(w, r, xq, xd, ctx.isa)


def _unpack_shifted(builder, blk):
    """A block's scale and its values (q - 8) + 128 as unsigned bytes (runtime.quants.simd.tile_kernel)."""
    qx = builder.add(_nibbles(builder, _load(builder, blk, _vec(_i8, 16), 2)), ir.Constant(_vec(_i8, 32), [120] * 32))
    return _half(builder, blk, 0), qx


matmat = vnni_kernels("Q4_0", BLOCK_BYTES, _unpack_shifted, rows)  # the batch product (runtime.quants.block32.matmat)


# --- the repacked layout: 8 rows interleaved ------------------------------------------------
#
# On an AVX2 CPU llama.cpp repacks every Q4_0 matrix whose rows are a multiple of 8 at load
# (block_q4_0x8) and multiplies it by ggml_gemv_q4_0_8x8_q8_0 / ggml_gemm_q4_0_8x8_q8_0: per
# (row, token) and 32-value block the exact integer sum of the 32 products, then one fma chain
# acc = fma(sum, d*dx, acc). Any layout gives those floats (the sums are exact); the one below
# makes them cheap (runtime.quants.block32.pack_x8), X8_BLOCK bytes per block of 8 rows:
#   bytes 0-15    the 8 rows' scales d (half floats), row order
#   bytes 16-47   rows 0, 1, 4, 5: quant bytes 0-7 of each (8 bytes per row)
#   bytes 48-79   rows 0, 1, 4, 5: quant bytes 8-15
#   bytes 80-111  rows 2, 3, 6, 7: quant bytes 0-7
#   bytes 112-143 rows 2, 3, 6, 7: quant bytes 8-15
# A quant byte j holds value j (low nibble) and value j + 16 (high nibble), so each 32-byte
# vector's low nibbles meet one 8-byte piece of the activations broadcast 4 times, its high
# nibbles another: 4 vpmaddubsw per 4 rows, summed as int16 (|sum| <= 4*2*15*128, no
# saturation), one vpmaddwd to 2 int32 lanes per row, and one vphaddd of the two 4-row halves
# gives the 8 rows' sums in row order (the row order above is what makes it so). (The file's
# layout would need a vpmaddwd per row and three vphaddd transposes.) sum((q - 8) * y) = sum(q * y) - 8 * sum(y): the callers pass 8*sum(y)
# per block (ysum8).
X8_BLOCK = 8 * BLOCK_BYTES


def _x8_steps(builder, group, r0, yq, yd, ys, n_t, nb, out, n_out, prefetch, toks):
    """Emit the 8 rows at byte pointer `group` (row r0 of out) times the n_t tokens whose
    activations start at yq[t] / yd[t] / ys[t] (token toks[t] of out): 256-bit vectors, the
    AVX2 instructions (vpdpbusd under VNNI but for one token)."""
    v32 = _vec(_i8, 32)

    def block(b, accs):
        o = builder.mul(b, ir.Constant(b.type, X8_BLOCK))
        if prefetch:  # one token: the weights stream from DRAM
            _prefetch(builder, group, o, X8_BLOCK)
        d = _halves_to_float(builder, _load(builder, group, _vec(_i16, 8), o))
        raw = [_load(builder, group, v32, builder.add(o, ir.Constant(o.type, 16 + 32 * i))) for i in range(4)]
        lo = [builder.and_(v, ir.Constant(v32, [15] * 32)) for v in raw]
        hi = [builder.lshr(v, ir.Constant(v32, [4] * 32)) for v in raw]
        y0 = builder.mul(b, ir.Constant(b.type, 32))
        new = []
        for t in range(n_t):
            bc = [_broadcast8(builder, yq[t], builder.add(y0, ir.Constant(y0.type, 8 * j))) for j in range(4)]
            sums = _pair_add(builder, _quad_lanes(builder, [lo[0], lo[1], hi[0], hi[1]], bc, n_t > 1),
                             _quad_lanes(builder, [lo[2], lo[3], hi[2], hi[3]], bc, n_t > 1))
            sums = builder.sub(sums, _splat(builder, builder.load(builder.gep(ys[t], [b])), 8))
            dd = builder.fmul(d, _splat(builder, builder.load(builder.gep(yd[t], [b])), 8))
            new.append(_fma(builder, builder.sitofp(sums, _vec(_f32, 8)), dd, accs[t]))
        return new

    accs = _state_loop(builder, nb, [_ZERO8] * n_t, block)
    for t in range(n_t):
        dst = builder.gep(out, [builder.add(builder.mul(toks[t], n_out), r0)])
        builder.store(accs[t], builder.bitcast(dst, _vec(_f32, 8).as_pointer()), align=4)


def _x16_steps(builder, groups, rs, yq, yd, ys, n_t, nb, out, n_out, toks):
    """Emit two groups of 8 rows (byte pointers `groups`, rows rs of out) times n_t tokens on
    512-bit vectors (AVX-512 VNNI): each vector holds the same 32 bytes of both groups, so one
    vpdpbusd multiplies 8 bytes of 8 rows (two int32 lanes per row) with a token's 8
    activations broadcast to every lane. Per 128-bit lane, one even/odd shuffle pair and an
    add (vphaddd's sums) give the 16 rows' block sums in row order; the float steps are
    _x8_steps' (the sums are the same exact integers)."""
    v64, i32x16, f32x16 = _vec(_i8, 64), _vec(_i32, 16), _vec(_f32, 16)
    zero = ir.Constant(i32x16, [0] * 16)

    def both(offset, ty):  # the two groups' `ty` at offset, side by side
        a, b = (_load(builder, g, ty, offset) for g in groups)
        return builder.shuffle_vector(a, b, _mask(range(2 * ty.count)))

    def block(b, accs):
        o = builder.mul(b, ir.Constant(b.type, X8_BLOCK))
        d = _halves_to_float(builder, both(o, _vec(_i16, 8)))
        raw = [both(builder.add(o, ir.Constant(o.type, 16 + 32 * i)), _vec(_i8, 32)) for i in range(4)]
        lo = [builder.and_(v, ir.Constant(v64, [15] * 64)) for v in raw]
        hi = [builder.lshr(v, ir.Constant(v64, [4] * 64)) for v in raw]
        y0 = builder.mul(b, ir.Constant(b.type, 32))
        new = []
        for t in range(n_t):
            bc = [builder.bitcast(_splat(builder, _load(builder, yq[t], _i64, builder.add(y0, ir.Constant(y0.type, 8 * j))), 8), v64)
                  for j in range(4)]
            half = []
            for q in (0, 2):  # rows 0, 1, 4, 5 (raw 0, 1), rows 2, 3, 6, 7 (raw 2, 3)
                a = zero
                for x, y in ((lo[q], bc[0]), (lo[q + 1], bc[1]), (hi[q], bc[2]), (hi[q + 1], bc[3])):
                    a = _dpbusd(builder, a, x, y)
                half.append(a)
            even = builder.shuffle_vector(half[0], half[1], _mask([4 * c + k for c in range(4) for k in (0, 2, 16, 18)]))
            odd = builder.shuffle_vector(half[0], half[1], _mask([4 * c + k for c in range(4) for k in (1, 3, 17, 19)]))
            sums = builder.sub(builder.add(even, odd), _splat(builder, builder.load(builder.gep(ys[t], [b])), 16))
            dd = builder.fmul(d, _splat(builder, builder.load(builder.gep(yd[t], [b])), 16))
            new.append(_fma(builder, builder.sitofp(sums, f32x16), dd, accs[t]))
        return new

    accs = _state_loop(builder, nb, [ir.Constant(f32x16, [0.0] * 16)] * n_t, block)
    for t in range(n_t):
        for h in range(2):
            dst = builder.gep(out, [builder.add(builder.mul(toks[t], n_out), rs[h])])
            part = builder.shuffle_vector(accs[t], accs[t], _mask(range(8 * h, 8 * h + 8)))
            builder.store(part, builder.bitcast(dst, _vec(_f32, 8).as_pointer()), align=4)


def _x8_args(context, builder, signature, args, n_t, t0):
    """The pointers the kernels below read: (w's data and row stride, per token its activations,
    scales and ysum8, out's data and row length, blocks per row, the tokens)."""
    wt, xqt, xdt, yst, outt = (signature.args[i] for i in (0, -6, -5, -4, -2))
    warr = context.make_array(wt)(context, builder, args[0])
    xarr = context.make_array(xqt)(context, builder, args[-6])
    k_vals = builder.extract_value(xarr.shape, 1)
    nb = builder.sdiv(k_vals, ir.Constant(k_vals.type, 32))
    oarr = context.make_array(outt)(context, builder, args[-2])
    toks = [builder.add(t0, ir.Constant(t0.type, t)) for t in range(n_t)]
    yq = [builder.gep(builder.bitcast(xarr.data, _i8.as_pointer()), [builder.mul(tk, k_vals)]) for tk in toks]
    yd = [builder.gep(context.make_array(xdt)(context, builder, args[-5]).data, [builder.mul(tk, nb)]) for tk in toks]
    ys = [builder.gep(context.make_array(yst)(context, builder, args[-4]).data, [builder.mul(tk, nb)]) for tk in toks]
    return (warr.data, builder.extract_value(warr.strides, 0), yq, yd, ys, oarr.data,
            builder.extract_value(oarr.shape, 1), nb, toks)


def _gemv_typer(typingctx, w, r0, xq, xd, ysum8, t0, out, isa):
    """The typer of x8_gemv (w, r0, xq, xd, ysum8, t0, out, isa): rows r0..r0+7 (r0 a multiple of
    8; w uint8 [rows, row bytes], C-contiguous, each 8 rows' bytes in the layout above) times
    token t0 (xq int8 [T, K], xd float32 [T, K/32], ysum8 int32 [T, K/32]: 8 * each block's
    sum of activations) into out[t0, r0:r0+8] (float32 [T, rows]), prefetching the weights."""
    if not c_arrays(w, xq, xd, ysum8, out):
        return None

    def codegen(context, builder, signature, args):
        data, stride, yq, yd, ys, out_data, n_out, nb, toks = _x8_args(context, builder, signature, args, 1, args[5])
        group = builder.gep(data, [builder.mul(args[1], stride)])
        _x8_steps(builder, group, args[1], yq, yd, ys, 1, nb, out_data, n_out, True, toks)
        return context.get_dummy_value()

    return types.none(w, r0, xq, xd, ysum8, t0, out, isa), codegen


GEMM_TOKENS, GEMM_TOKENS_VNNI = 4, 8  # tokens per x8_gemm step (without, with AVX-512 VNNI)


def _gemm_typer(typingctx, w, r0, r1, xq, xd, ysum8, t0, out, isa):
    """The typer of x8_gemm (w, r0, r1, xq, xd, ysum8, t0, out, isa): the 8-row groups at rows r0
    and r1 (r1 == r0: that one group) times a step of tokens from t0, as x8_gemv's. AVX-512 VNNI: both groups at once on 512-bit vectors, GEMM_TOKENS_VNNI tokens; else one
    group after the other, GEMM_TOKENS tokens (the 8 rows' bytes stay in cache)."""
    if not c_arrays(w, xq, xd, ysum8, out):
        return None

    def codegen(context, builder, signature, args):
        r0, r1, t0 = args[1], args[2], args[6]
        n_t = GEMM_TOKENS_VNNI if _vnni() else GEMM_TOKENS
        data, stride, yq, yd, ys, out_data, n_out, nb, toks = _x8_args(context, builder, signature, args, n_t, t0)
        if _vnni():
            groups = [builder.gep(data, [builder.mul(r, stride)]) for r in (r0, r1)]
            _x16_steps(builder, groups, (r0, r1), yq, yd, ys, n_t, nb, out_data, n_out, toks)
        else:  # (a loop over the groups: one copy of the code)
            count = builder.select(builder.icmp_signed("==", r0, r1), ir.Constant(r0.type, 1), ir.Constant(r0.type, 2))
            with cgutils.for_range(builder, count) as loop:
                r = builder.select(builder.icmp_signed("==", loop.index, ir.Constant(r0.type, 0)), r0, r1)
                group = builder.gep(data, [builder.mul(r, stride)])
                _x8_steps(builder, group, r, yq, yd, ys, n_t, nb, out_data, n_out, False, toks)
        return context.get_dummy_value()

    return types.none(w, r0, r1, xq, xd, ysum8, t0, out, isa), codegen


x8_gemm = intrinsic(isa_typer(_gemm_typer))  # a batch: two groups of 8 rows x GEMM_TOKENS(_VNNI) tokens
x8_gemv = intrinsic(isa_typer(_gemv_typer))  # 1 token, prefetching 16 KiB ahead into L2


def pack(rows, out=None):
    return pack_x8(rows, BLOCK_BYTES, 1, out)


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
def matvec_x8(w, ctx, xq, xd, xs, xhat, out):
    """One token times a repacked matrix, as llama.cpp's ggml_gemv_q4_0_8x8_q8_0: per row and
    block the exact integer sum of the 32 products, acc = fma(sum, d*dx, acc), one chain per
    row; 8 rows per step."""
    k = xq.shape[0]
    xq2 = xq.reshape((1, k))
    xd2 = xd.reshape((1, k // 32))
    out2 = out.reshape((1, out.shape[0]))
    ysum8 = np.empty((1, k // 32), np.int32)
    _block_sums8(xq2, ysum8)
    for g in prange(w.shape[0] // 8):
        x8_gemv(w, 8 * g, xq2, xd2, ysum8, 0, out2, ctx.isa)


@njit(cache=True, parallel=True)
def matmat_x8(w, ctx, xq, xd, xs, xhat, out):
    """out [T, rows] = the T tokens' products with a repacked matrix, bit for bit as one-token
    decode and as llama.cpp's batches (its gemm for tokens in fours, gemv for the rest: the
    same per-(row, token) chains): two groups of 8 rows x GEMM_TOKENS (AVX-512 VNNI: GEMM_TOKENS_VNNI) tokens per step
    (an odd last group paired with itself), the 16 rows' weights staying in cache while every
    token passes; the leftover tokens one at a time."""
    n_tok, k = xq.shape
    ysum8 = np.empty((n_tok, k // 32), np.int32)
    _block_sums8(xq, ysum8)  # (serial: a few microseconds; a second parallel loop costs a cold start ~0.3 s of compile)
    step = GEMM_TOKENS_VNNI if has_vnni(ctx.isa) else GEMM_TOKENS
    n_steps = n_tok // step
    n_groups = w.shape[0] // 8
    for p in prange((n_groups + 1) // 2):
        g0 = 2 * p
        g1 = min(g0 + 1, n_groups - 1)
        for s in range(n_steps):
            x8_gemm(w, 8 * g0, 8 * g1, xq, xd, ysum8, step * s, out, ctx.isa)
        for t in range(step * n_steps, n_tok):
            for g in range(g0, g1 + 1):  # (one call site: each is compiled in)
                x8_gemv(w, 8 * g, xq, xd, ysum8, t, out, ctx.isa)
