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
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .simd import (_ZERO8, isa_typer, _broadcast8, _fma, _half, _halves_to_float, _i8, _i16, _f32, _lane_accumulate, _lanes_finish,
                    _lanes_signed, _load, _nibbles, _pair_add, _prefetch, _quad_lanes, _splat, _state_loop, _vec, row_kernels)
from .block32 import pack_x8, vnni_kernels
from .ksearch import signed_absmax
from .rounding import read_f16, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
HALF = QK // 2


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d = read_f16(row, o)
        for j in range(HALF):
            q = np.int32(row[o + 2 + j])
            y[b * QK + j] = np.float32((q & 0xF) - 8) * d
            y[b * QK + HALF + j] = np.float32((q >> 4) - 8) * d


@njit(cache=True, nogil=True)
def quantize_row(xr, row):
    n = xr.shape[0]
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        o = b * BLOCK_BYTES
        vmax, _ = signed_absmax(QK, xb)
        d = vmax / np.float32(-8)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        write_f16(row, o, d)
        for j in range(HALF):
            q0 = min(15, int(xb[j] * inv + np.float32(8.5)))
            q1 = min(15, int(xb[HALF + j] * inv + np.float32(8.5)))
            row[o + 2 + j] = np.uint8(q0 | (q1 << 4))


# --- the product with Q8_0 activations, file layout (ggml's AVX2 vec_dot_q4_0_q8_0) --------

def _dot_body(builder, blk, y, scales, state):
    qy = _load(builder, y, _vec(_i8, 32), 0)
    qx = builder.sub(_nibbles(builder, _load(builder, blk, _vec(_i8, 16), 2)), ir.Constant(_vec(_i8, 32), [8] * 32))
    lanes = _lanes_signed(builder, qx, qy)
    return [_lane_accumulate(builder, builder.fmul(_half(builder, blk, 0), scales[0]), lanes, state[0])]



dot, rows = row_kernels(BLOCK_BYTES, 1, [_ZERO8], _dot_body, _lanes_finish)


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


def _q4_0x8(n_t, prefetch):
    """The typer of an interleaved-Q4_0 kernel (w, r0, xq, xd, ysum8, t0, out, isa): rows r0..r0+7
    (r0 a multiple of 8; w uint8 [rows, row bytes], C-contiguous, each 8 rows' bytes in the
    layout above) times tokens t0..t0+n_t-1 (xq int8 [T, K], xd float32 [T, K/32], ysum8 int32
    [T, K/32]: 8 * each block's sum of activations) into out[t0:t0+n_t, r0:r0+8] (float32
    [T, rows])."""

    def typer(typingctx, w, r0, xq, xd, ysum8, t0, out, isa):
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in (w, xq, xd, ysum8, out)):
            return None

        def codegen(context, builder, signature, args):
            wt, _, xqt, xdt, yst, _, outt = signature.args[:-1]
            warr = context.make_array(wt)(context, builder, args[0])
            r0, t0 = args[1], args[5]
            group = builder.gep(warr.data, [builder.mul(r0, builder.extract_value(warr.strides, 0))])
            xarr = context.make_array(xqt)(context, builder, args[2])
            k_vals = builder.extract_value(xarr.shape, 1)
            nb = builder.sdiv(k_vals, ir.Constant(k_vals.type, 32))
            oarr = context.make_array(outt)(context, builder, args[6])
            n_out = builder.extract_value(oarr.shape, 1)
            toks = [builder.add(t0, ir.Constant(t0.type, t)) for t in range(n_t)]
            yq = [builder.gep(builder.bitcast(xarr.data, _i8.as_pointer()), [builder.mul(tk, k_vals)]) for tk in toks]
            yd = [builder.gep(context.make_array(xdt)(context, builder, args[3]).data, [builder.mul(tk, nb)]) for tk in toks]
            ys = [builder.gep(context.make_array(yst)(context, builder, args[4]).data, [builder.mul(tk, nb)]) for tk in toks]
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
                dst = builder.gep(oarr.data, [builder.add(builder.mul(toks[t], n_out), r0)])
                builder.store(accs[t], builder.bitcast(dst, _vec(_f32, 8).as_pointer()), align=4)
            return context.get_dummy_value()

        return types.none(w, r0, xq, xd, ysum8, t0, out, isa), codegen

    return isa_typer(typer)


x8_gemm = intrinsic(_q4_0x8(4, False))  # 4 tokens (a batch; the 8 rows' bytes stay in cache)
x8_gemv = intrinsic(_q4_0x8(1, True))  # 1 token, prefetching 8 KiB ahead



GEMM_TOKENS = 4  # tokens per x8_gemm step


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
    same per-(row, token) chains): 8 rows x 4 tokens per step, the 8 rows' weights staying in
    cache while every token passes."""
    n_tok, k = xq.shape
    ysum8 = np.empty((n_tok, k // 32), np.int32)
    for t in prange(n_tok):
        _block_sums8(xq[t:t + 1], ysum8[t:t + 1])
    t4 = n_tok // GEMM_TOKENS
    for g in prange(w.shape[0] // 8):
        for tg in range(t4):
            x8_gemm(w, 8 * g, xq, xd, ysum8, GEMM_TOKENS * tg, out, ctx.isa)
        for t in range(GEMM_TOKENS * t4, n_tok):
            x8_gemv(w, 8 * g, xq, xd, ysum8, t, out, ctx.isa)
