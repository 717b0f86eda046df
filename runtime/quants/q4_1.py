"""Q4_1: blocks of 32 values, a scale and a minimum, 4-bit quants (x = d * q + m).

block_q4_1 (20 bytes): d    f16    bytes 0..1
                       m    f16    bytes 2..3
                       qs   16 B   bytes 4..19: low nibble of qs[j] = value j,
                                                high nibble of qs[j] = value j + 16
quantize is quantize_row_q4_1_ref: d = (max - min) / 15, m = min,
q = min(15, (int8)((x - min) / d + 0.5)).

Products: `dot`/`rows` (ggml's AVX2 vec_dot_q4_1_q8_1) read the file's rows; matrices of rows a
multiple of 8 are repacked at load (runtime.quants.block32.pack_x8) for 8-row kernels that give
vec_dot's floats.
"""

from __future__ import annotations

from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .simd import (_ZERO8, array_args, c_arrays, isa_typer, offsets, row_at, _broadcast8, _fma, _halves_to_float, _i8, _i16, _f32, _lanes_unsigned, _load, _mask,
                    _nibbles, _pair_add, _prefetch, _splat, _state_loop, _vec)
from .block32 import Layout32, min_products, pack_x8, row_converters

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_1]
LAYOUT = Layout32(BLOCK_BYTES, m=2, qh=0, qs=4, offset=0, nmax=15)  # the fields above
# ggml's dequantize_row_q4_1 and quantize_row_q4_1_ref (above), compiled for LAYOUT
dequantize_row, quantize_row = row_converters(LAYOUT, __name__)


# --- the product with Q8_1 activations, file layout (ggml's AVX2 vec_dot_q4_1_q8_1) --------

def _values(builder, blk):
    """The 32 quants as unsigned bytes: the low nibbles are values 0-15, the high ones 16-31."""
    return _nibbles(builder, _load(builder, blk, _vec(_i8, 16), 4))


# w = d*q + m, as ggml's AVX2 vec_dot_q4_1_q8_1 (see min_kernels)
dot, rows, matvec, matmat = min_products("Q4_1", BLOCK_BYTES, _values, __name__)


# --- the repacked layout: 8 rows interleaved, in vec_dot's lane order ------------------------
#
# # llama.cpp does not repack Q4_1; its vec_dot_q4_1_q8_1 keeps 8 float lanes per row (lane l: the
# integer sum of values 4l..4l+3 times the activations, acc_l = fma(d*dx, lane, acc_l) over
# blocks), a scalar chain summs = fma(m, s, summs), and ends with hsum_float_8(acc) + summs.
# Every step is per lane, so the lanes may be computed for 4 rows at a time: in the layout of
# the Q4_0 copy (4 rows x 8 quant bytes per vector) one vpmaddubsw + vpmaddwd against one
# broadcast 8-byte piece of the activations yields lanes 2c, 2c+1 of 4 rows; 4 such vectors per
# 4 rows are all 8 lanes, fma'd into 4 accumulators (8 for 8 rows), and the same additions as
# hsum_float_8 finish the 8 rows at once. Per 8 rows and block (X8_BLOCK bytes): the 8 scales d, the
# 8 minimums m (half floats), the 128 quant bytes.
X8_BLOCK = 8 * BLOCK_BYTES


def _q4_1x8(n_t, prefetch):
    """The typer of an interleaved-Q4_1 kernel (w, r0, xq, xd, xs, t0, out, isa): rows r0..r0+7 (r0 a
    multiple of 8) times tokens t0..t0+n_t-1 (xq int8 [T, K], xd/xs float32 [T, K/32]: their
    Q8_1 activations) into out[t0:t0+n_t, r0:r0+8] (float32 [T, rows]). Each (row, token) is
    vec_dot_q4_1_q8_1's lanes and order, whatever n_t."""

    def typer(typingctx, w, r0, xq, xd, xs, t0, out, isa):
        if not (c_arrays(w) and c_arrays(xq, xd, xs, out, ndim=2)):
            return None
        return types.none(w, r0, xq, xd, xs, t0, out, isa), codegen

    def codegen(context, builder, signature, args):
        warr, r0, xarr, darr, sarr, t0, oarr, _ = array_args(context, builder, signature, args)
        group = row_at(builder, warr, r0)
        row_bytes = builder.extract_value(warr.shape, 1)
        nb = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, BLOCK_BYTES))
        toks = offsets(builder, t0, n_t)
        yq = [row_at(builder, xarr, tk) for tk in toks]
        yd = [row_at(builder, darr, tk) for tk in toks]
        ys = [row_at(builder, sarr, tk) for tk in toks]
        v32, f32x8 = _vec(_i8, 32), _vec(_f32, 8)

        def block(b, state):
            o = builder.mul(b, ir.Constant(b.type, X8_BLOCK))
            if prefetch:  # one token: the weights stream from DRAM
                _prefetch(builder, group, o, X8_BLOCK)
            d = _halves_to_float(builder, _load(builder, group, _vec(_i16, 8), o))
            m = _halves_to_float(builder, _load(builder, group, _vec(_i16, 8), builder.add(o, ir.Constant(o.type, 16))))
            halves = []  # per quant vector: (rows 0,1,4,5: bytes 0-7, 8-15), (rows 2,3,6,7: ...)
            for i in range(4):
                raw = _load(builder, group, v32, builder.add(o, ir.Constant(o.type, 32 + 32 * i)))
                halves.append([builder.and_(raw, ir.Constant(v32, [15] * 32)), builder.lshr(raw, ir.Constant(v32, [4] * 32))])
            y0 = builder.mul(b, ir.Constant(b.type, 32))
            new = []
            for t in range(n_t):
                accs = list(state[9 * t:9 * t + 8])
                dx = _splat(builder, builder.load(builder.gep(yd[t], [b])), 8)
                d_sets = [builder.fmul(builder.shuffle_vector(d, d, _mask(mk)), dx)
                          for mk in ([0, 0, 1, 1, 4, 4, 5, 5], [2, 2, 3, 3, 6, 6, 7, 7])]
                mins = _fma(builder, m, _splat(builder, builder.load(builder.gep(ys[t], [b])), 8), state[9 * t + 8])  # summs += m * s
                bc = [_broadcast8(builder, yq[t], builder.add(y0, ir.Constant(y0.type, 8 * c))) for c in range(4)]
                for i in range(4):
                    for h in range(2):  # values 8*(i%2).. (low nibbles), 16 + 8*(i%2).. (high)
                        c = 2 * h + i % 2  # activation piece c: lanes 2c, 2c+1
                        k = 4 * (i // 2) + c
                        accs[k] = _fma(builder, d_sets[i // 2], builder.sitofp(_lanes_unsigned(builder, halves[i][h], bc[c]), f32x8), accs[k])
                new += accs + [mins]
            return new

        state = _state_loop(builder, nb, [_ZERO8] * (9 * n_t), block)
        for t in range(n_t):
            st = state[9 * t:9 * t + 9]
            # hsum_float_8 per row: ((a4 + a0) + (a6 + a2)) + ((a5 + a1) + (a7 + a3)), then + summs
            sets = [builder.fadd(builder.fadd(st[4 * s + 2], st[4 * s]), builder.fadd(st[4 * s + 3], st[4 * s + 1]))
                    for s in range(2)]
            total = builder.fadd(_pair_add(builder, sets[0], sets[1]), st[8])
            builder.store(total, builder.bitcast(builder.gep(row_at(builder, oarr, toks[t]), [r0]), f32x8.as_pointer()), align=4)
        return context.get_dummy_value()

    return isa_typer(typer)


X8_TOKENS = 2  # tokens per step of the batch kernel (9 vector accumulators per token)
x8_gemm = intrinsic(_q4_1x8(X8_TOKENS, False))  # a batch's tokens, X8_TOKENS at a time
x8_gemv = intrinsic(_q4_1x8(1, True))  # one token, prefetching 16 KiB ahead into L2


def pack(rows, out=None):
    return pack_x8(rows, BLOCK_BYTES, 2, out)


@njit(cache=True, parallel=True)
def matvec_x8(w, ctx, xq, xd, xs, xhat, out):
    """One token times a repacked matrix: vec_dot_q4_1_q8_1's lanes, 8 rows at a time, the
    same floats as matvec on the file's rows."""
    k = xq.shape[0]
    xq2 = xq.reshape((1, k))
    xd2 = xd.reshape((1, k // 32))
    xs2 = xs.reshape((1, k // 32))
    out2 = out.reshape((1, out.shape[0]))
    for g in prange(w.shape[0] // 8):
        x8_gemv(w, 8 * g, xq2, xd2, xs2, 0, out2, ctx.isa)


@njit(cache=True, parallel=True)
def matmat_x8(w, ctx, xq, xd, xs, xhat, out):
    """out [T, rows] = the T tokens' products with a repacked matrix, each (row, token)
    vec_dot_q4_1_q8_1's floats (as one-token decode): 8 rows x X8_TOKENS tokens per step,
    the leftover token by the one-token kernel."""
    n_tok = xq.shape[0]
    steps = n_tok // X8_TOKENS
    for g in prange(w.shape[0] // 8):
        for s in range(steps):
            x8_gemm(w, 8 * g, xq, xd, xs, X8_TOKENS * s, out, ctx.isa)
        for t in range(X8_TOKENS * steps, n_tok):
            x8_gemv(w, 8 * g, xq, xd, xs, t, out, ctx.isa)
