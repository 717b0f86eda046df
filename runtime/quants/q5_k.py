"""Q5_K: super-blocks of 256 values in 8 sub-blocks of 32, each with a 6-bit scale and min
(x = d * sc * q - dmin * m, q 5-bit).

block_q5_K (176 bytes): d       f16    bytes 0..1
                        dmin    f16    bytes 2..3
                        scales  12 B   bytes 4..15    packed like Q4_K (get_scale_min_k4)
                        qh      32 B   bytes 16..47   5th bits: value 64*g + l (l < 32) has
                                                      bit 2g of qh[l], value 64*g + 32 + l bit 2g+1
                        qs      128 B  bytes 48..175  low 4 bits, nibble order as Q4_K
quantize is quantize_row_q5_K_ref: make_qkx2_quants(32, 31, weights = rms + |x|, rmin -0.5,
rdelta 0.1, 15 steps), then as Q4_K.

Products (`matmul`: one token or a batch, the same floats per (row, token) either way) are
ggml's AVX2 ggml_vec_dot_q5_K_q8_K, which llama.cpp runs for Q5_K (it does not repack Q5_K) for
one token and for every token of a batch: per block, with the Q8_K activations' scale dx
  lane l (8 int32)  sum over the 8 sub-blocks g of sc_g * sum_{k<4} q[32g + 4l + k] * y[32g + 4l + k]
                    (vpmaddubsw of q and y, vpmaddwd against the scales: exact integers)
  imin              sum_g m_g * (sum of sub-block g's activations)  (exact)
  acc_l = fma(dx * d, lane_l, acc_l),  summs = fma(-dx * dmin, imin, summs)
and the row's result hsum_float_8(acc) + summs. On an AVX-512 VNNI CPU the matrices are repacked
at load (8 rows interleaved, `pack`, at the end of this module) for a one-token kernel with no
per-row shuffles or reductions, the same floats.
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import simd
from .simd import array_args, c_arrays, isa_typer, offsets, row_at, _ZERO, _ZERO8, _f32, _fma, _half, _hsum8, _i8, _i16, _i32, _lane_accumulate, _load, _mask, _prefetch, _splat, _vec
from . import kbatch
from .ksearch import k4_row_converters
from .q4_k import (PREFETCH_AHEAD, PREFETCH_LOCALITY, broadcast_word, bcast8, bsum_pairs, interleave_qwords, scale_words,
                   scales_mins_ir, scales_mins_vec, _d_dmin, _dpwssd_any, _x8_mins, _x8_scales)

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_K]


# ggml's dequantize_row_q5_K and quantize_row_q5_K_ref (above): the fields at the offsets drawn there
dequantize_row, quantize_row = k4_row_converters(BLOCK_BYTES, qh_at=16, qs_at=48, nmax=31, rmin=-0.5, nstep=15, module=__name__)


# --- products: ggml_vec_dot_q5_K_q8_K's arithmetic in LLVM vector IR (runtime.quants.simd's helpers) ---

def _quants(builder, blk):
    """The block's 256 quants (0..31) as 8 <32 x i8> vectors, vector g = values 32g..32g+31:
    value 64c + l (l < 32) the low nibble of qs[32c + l] | bit 2c of qh[l] << 4, value
    64c + 32 + l the high nibble, bit 2c + 1."""
    v32 = _vec(_i8, 32)
    qh = _load(builder, blk, v32, 16)
    quants = []
    for c in range(4):
        qs = _load(builder, blk, v32, 48 + 32 * c)
        quants += [_with_high_bit(builder, qs, qh, 2 * c + h) for h in range(2)]
    return quants


def _with_high_bit(builder, qs, qh, bit):
    """Quants (0..31) from qs's low (bit even) or high (bit odd) nibbles and bit `bit` of the qh
    bytes at the same places (i8 vectors of one length) as their bit 4."""
    vt = qs.type
    n = vt.count
    low = builder.and_(qs, ir.Constant(vt, [15] * n)) if bit % 2 == 0 else builder.lshr(qs, ir.Constant(vt, [4] * n))
    moved = (builder.shl(qh, ir.Constant(vt, [4 - bit] * n)) if bit < 4 else
             builder.lshr(qh, ir.Constant(vt, [bit - 4] * n)) if bit > 4 else qh)
    return builder.or_(low, builder.and_(moved, ir.Constant(vt, [16] * n)))


def _block(builder, blk, n_t, yq, bsums, yd, b, state):
    """One 256-value block of a row against n_t tokens: state [acc, summs] per token. The scales
    and mins unpacked by vector steps (q4_k.scales_mins_vec), each group's scale broadcast by one
    vpshufb, the scaled pairs summed into the 8 lanes by vpdpwssd (VNNI) or vpmaddwd: the same
    exact lanes as ggml's vpmaddubsw / vpmaddwd / vpaddd; imin by one vpmaddwd of the mins with
    the groups' activation sums (bsums: int16 words)."""
    v32 = _vec(_i8, 32)
    sm = scales_mins_vec(builder, blk)
    sc_words = scale_words(builder, sm)
    quants = _quants(builder, blk)
    mins = builder.shuffle_vector(builder.bitcast(sm, _vec(_i8, 16)), ir.Constant(_vec(_i8, 16), [0] * 16),
                                  _mask([8 + i // 2 if i % 2 == 0 else 16 for i in range(16)]))  # 8 words
    dh, dminh = _half(builder, blk, 0), _half(builder, blk, 2)
    v8w = _vec(_i16, 8)
    new = []
    for t in range(n_t):
        y = builder.gep(yq[t], [builder.mul(b, ir.Constant(b.type, 256))])
        lanes = None
        for g in range(8):
            lanes = simd._scaled_pairs_acc(builder, lanes, simd._pairs_us(builder, quants[g], _load(builder, y, v32, 32 * g)),
                                           broadcast_word(builder, sc_words, g))
        bs = _load(builder, builder.bitcast(bsums[t], _i8.as_pointer()), v8w, builder.mul(b, ir.Constant(b.type, 16)))
        prods = builder.mul(builder.sext(builder.bitcast(mins, v8w), _vec(_i32, 8)), builder.sext(bs, _vec(_i32, 8)))
        imin = builder.call(simd._fn(builder, "llvm.vector.reduce.add.v8i32", _i32, [prods.type]), [prods])
        dx = builder.load(builder.gep(yd[t], [builder.mul(b, ir.Constant(b.type, 8))]))
        acc = _lane_accumulate(builder, builder.fmul(dx, dh), lanes, state[2 * t])
        dmin = builder.fmul(builder.fsub(ir.Constant(_f32, -0.0), dx), dminh)  # ggml: -y.d * dmin
        new += [acc, _fma(builder, dmin, builder.sitofp(imin, _f32), state[2 * t + 1])]
    return new


def _tokens_typer(emit):
    """The typer of an intrinsic (w, r, xq, xd, bsum, t0, out, isa): row (or 8-row group) r of w
    times tokens t0.. (xq int8 [T, K], xd float32 [T, K/32] the Q8_K scale of each 32 values,
    bsum the tokens' activation sums) into out (float32 [T, rows]).
    emit(builder, w's struct, r, the tokens' xq rows (i8*), xd rows, bsum rows, tokens, out's
    struct) emits the loops and the stores."""

    def typer(typingctx, w, r, xq, xd, bsum, t0, out, isa):
        arrays = (w, xq, xd, bsum, out)
        if not c_arrays(*arrays, ndim=2):
            return None
        return types.none(w, r, xq, xd, bsum, t0, out, isa), codegen

    def codegen(context, builder, signature, args):
        warr, r, xarr, darr, barr, t0, oarr, _ = array_args(context, builder, signature, args)
        toks = offsets(builder, t0, emit.n_t)
        emit(builder, warr, r, [row_at(builder, xarr, tk) for tk in toks], [row_at(builder, darr, tk) for tk in toks],
             [row_at(builder, barr, tk) for tk in toks], toks, oarr)
        return context.get_dummy_value()

    return isa_typer(typer)


def _rows_emit(n_t, prefetch):
    """_tokens_typer's emit for the file layout: row r times n_t tokens (bsum int16 [T, K/32]
    each 32 values' sum) into out[t0:t0+n_t, r]; the row's blocks unpacked once for the n_t
    tokens, each token's floats those of the one-token kernel."""

    def emit(builder, warr, r, yq, yd, bsums, toks, oarr):
        row_bytes = builder.extract_value(warr.shape, 1)
        row = row_at(builder, warr, r)
        n_blocks = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, BLOCK_BYTES))

        def step(b, state):
            o = builder.mul(b, ir.Constant(b.type, BLOCK_BYTES))
            if prefetch:  # one token: the weights stream from DRAM
                _prefetch(builder, row, o, BLOCK_BYTES, PREFETCH_AHEAD, PREFETCH_LOCALITY)
            return _block(builder, builder.gep(row, [o]), n_t, yq, bsums, yd, b, state)

        state = simd._state_loop(builder, n_blocks, [_ZERO8, _ZERO] * n_t, step)
        for t in range(n_t):
            builder.store(builder.fadd(_hsum8(builder, state[2 * t]), state[2 * t + 1]), builder.gep(row_at(builder, oarr, toks[t]), [r]))

    emit.n_t = n_t
    return emit


_rows1 = intrinsic(_tokens_typer(_rows_emit(1, True)))  # one token (decode), prefetching as Q4_K's kernels


def _batch_body(builder, blk, ys, dx, bsp, state):
    """One block of a row times 8 tokens (runtime.quants.kbatch): state [acc of token 0..7,
    summs of the 8 tokens]; each token's lanes and steps as _block's, the mins' fma on the 8
    tokens in one vector."""
    v32 = _vec(_i8, 32)
    pairs = scales_mins_ir(builder, blk)
    quants = _quants(builder, blk)
    dh, dminh = _half(builder, blk, 0), _half(builder, blk, 2)
    new = []
    for i, y in enumerate(ys):
        lanes = None
        for g in range(8):
            part = simd._scaled_lanes(builder, quants[g], _load(builder, y, v32, 32 * g), pairs[g][0], pairs[g][0], 0)
            lanes = part if lanes is None else builder.add(lanes, part)
        dx_i = builder.extract_element(dx, ir.Constant(_i32, i))
        new.append(_lane_accumulate(builder, builder.fmul(dx_i, dh), lanes, state[i]))
    f32x8 = _vec(_f32, 8)
    imin = builder.sitofp(kbatch.mins_dot(builder, [p[1] for p in pairs], bsp), f32x8)
    dmin = builder.fmul(builder.fsub(ir.Constant(f32x8, [-0.0] * 8), dx), simd._splat(builder, dminh, 8))  # ggml: -y.d * dmin
    return new + [_fma(builder, dmin, imin, state[kbatch.GROUP])]


def _batch_finish(builder, state):
    sums = kbatch.gather8(builder, [_hsum8(builder, a) for a in state[:kbatch.GROUP]], _f32)
    return builder.fadd(sums, state[kbatch.GROUP])


matmat = kbatch.batch_products("Q5_K", BLOCK_BYTES, [_ZERO8] * (kbatch.GROUP + 1), _batch_body, _batch_finish, __name__)  # (runtime.quants.kbatch)


@njit(cache=True, parallel=True)
def matvec(w, ctx, xq, xd, xs, xhat, out):
    """One token (xq [K], xd [K/32], out [rows]): ggml_vec_dot_q5_K_q8_K per row, matmat's
    floats for a batch of one."""
    k = xq.shape[0]
    bsum = np.empty((1, k // 32), np.int16)  # |sum of 32 int8| <= 4096
    for g in range(k // 32):
        s = np.int32(0)
        for j in range(32):
            s += np.int32(xq[32 * g + j])
        bsum[0, g] = np.int16(s)
    xq2 = xq.reshape((1, k))
    xd2 = xd.reshape((1, xd.shape[0]))
    out2 = out.reshape((1, out.shape[0]))
    for r in prange(w.shape[0]):
        _rows1(w, r, xq2, xd2, bsum, 0, out2, ctx.isa)


# --- the repacked layout: 8 rows interleaved ------------------------------------------------
#
# On an AVX-512 VNNI CPU Q5_K matrices whose rows are a multiple of 8 are repacked at load
# (`pack`), X8_BLOCK bytes per block of 8 rows, the same bytes as the file's in another order
# (q4_k.interleave_qwords, as Q4_K's layout with the qh words before the qs ones):
#   bytes 0-127      row i's first 16 bytes (d, dmin, the scales field) at 16 i
#   bytes 128-383    per qword m (0..3) of qh, 64 bytes: that qword of rows 0..7, row order
#   bytes 384-1407   per 64 values c (0..3), 256 bytes: per qword m (0..3) of the 32 qs bytes
#                    of c, 64 bytes: that qword of rows 0..7
# A 512-bit vector then holds 8 quants of each of the 8 rows: one vpmaddubsw multiplies them
# with the token's 8 activations broadcast to every row, one vpdpwssd scales them by each row's
# sub-block scale, and the int32 lanes are ggml's (row i's lanes 2m, 2m+1 in places 2i, 2i+1 of
# the vector of qword m): the same exact integers, the same fma per lane, the same
# hsum_float_8 at the end (done for 8 rows at once), so the floats are the file layout's, bit
# for bit - without the file layout's per-row shuffles, scale broadcasts and reductions. A batch
# puts each work item's rows back in the file's order and runs the file layout's batch kernel
# (kbatch.batch_products(interleaved=True)).
X8_BLOCK = 8 * BLOCK_BYTES


def pack(rows, out=None):
    """Rows [n, row bytes] (n a multiple of 8) -> the repacked layout above, into out (may be
    rows itself) or a new array of the same shape."""
    return interleave_qwords(rows, BLOCK_BYTES, out)


def _x8_emit(builder, warr, r0, yq, yd, bsums, toks, oarr):
    """_tokens_typer's emit for the repacked layout: rows r0..r0+7 (r0 a multiple of 8) times
    one token (bsum: q4_k.bsum_pairs of each token, uint32 [T, K/64]) into out[t0, r0:r0+8]."""
    ity = r0.type
    group = row_at(builder, warr, r0)
    row_bytes = builder.extract_value(warr.shape, 1)
    n_blocks = builder.sdiv(row_bytes, ir.Constant(ity, BLOCK_BYTES))
    v64, v16, i32x16, f32x8, f32x16 = _vec(_i8, 64), _vec(_i16, 16), _vec(_i32, 16), _vec(_f32, 8), _vec(_f32, 16)
    zero = ir.Constant(i32x16, [0] * 16)
    bp = builder.bitcast(bsums[0], _i32.as_pointer())

    def block(b, state):
        o = builder.mul(b, ir.Constant(ity, X8_BLOCK))
        _prefetch(builder, group, o, X8_BLOCK, PREFETCH_AHEAD, PREFETCH_LOCALITY)  # the weights stream from DRAM
        blk = builder.gep(group, [o])
        sm, dd8 = _x8_scales(builder, [_load(builder, blk, i32x16, 64 * k) for k in range(2)])
        dh, dminh = _d_dmin(builder, dd8)
        # sub-block g's scale of row i in words 4i..4i+3 (the row's 4 pairs of a qword; the high
        # bytes from the zero vector: the scales are below 64)
        zeros = ir.Constant(sm.type, [0] * sm.type.count)
        scales = [builder.bitcast(builder.shuffle_vector(sm, zeros, _mask([v for i in range(8) for v in [16 * i + g, 128] * 4])), _vec(_i16, 32))
                  for g in range(8)]
        qh = [_load(builder, blk, v64, 128 + 64 * m) for m in range(4)]
        y = builder.gep(yq[0], [builder.mul(b, ir.Constant(ity, 256))])
        lanes = [zero] * 4  # per qword m
        for c in range(4):  # (each quant vector used as soon as made: fewer live registers)
            for m in range(4):
                qs = _load(builder, blk, v64, 384 + 256 * c + 64 * m)
                for h in range(2):
                    g = 2 * c + h
                    pairs = simd._pairs_us(builder, _with_high_bit(builder, qs, qh[m], g), bcast8(builder, y, 32 * g + 8 * m))
                    lanes[m] = _dpwssd_any(builder, lanes[m], pairs, scales[g])
        dx = _splat(builder, builder.load(builder.gep(yd[0], [builder.mul(b, ir.Constant(ity, 8))])), 8)
        dxd = builder.fmul(dx, dh)
        dxd = builder.shuffle_vector(dxd, dxd, _mask([i // 2 for i in range(16)]))  # row i's in places 2i, 2i+1
        imin = _x8_mins(builder, sm, lambda p: builder.bitcast(
            _splat(builder, builder.load(builder.gep(bp, [builder.add(builder.mul(b, ir.Constant(ity, 4)), ir.Constant(ity, p))])), 8), v16))
        dmin = builder.fmul(builder.fsub(ir.Constant(f32x8, [-0.0] * 8), dx), dminh)  # ggml: -y.d * dmin
        return ([_fma(builder, dxd, builder.sitofp(lanes[m], f32x16), state[m]) for m in range(4)]
                + [_fma(builder, dmin, builder.sitofp(imin, f32x8), state[4])])

    state = simd._state_loop(builder, n_blocks, [ir.Constant(f32x16, [0.0] * 16)] * 4 + [_ZERO8], block)
    # hsum_float_8 of each row, its lanes 2m, 2m+1 in acc m: (a4+a0) + (a6+a2), then + (a5+a1) + (a7+a3)
    s = builder.fadd(builder.fadd(state[2], state[0]), builder.fadd(state[3], state[1]))
    rows = builder.fadd(builder.shuffle_vector(s, s, _mask(range(0, 16, 2))), builder.shuffle_vector(s, s, _mask(range(1, 16, 2))))
    dst = builder.gep(row_at(builder, oarr, toks[0]), [r0])
    builder.store(builder.fadd(rows, state[4]), builder.bitcast(dst, f32x8.as_pointer()), align=4)


_x8_emit.n_t = 1
_x8_rows1 = intrinsic(_tokens_typer(_x8_emit))


@njit(cache=True, parallel=True)
def matvec_x8(w, ctx, xq, xd, xs, xhat, out):
    """matvec for a repacked matrix (`pack`): the same floats, 8 rows per step."""
    k = xq.shape[0]
    bsp = bsum_pairs(xq).reshape((1, k // 64))
    xq2 = xq.reshape((1, k))
    xd2 = xd.reshape((1, xd.shape[0]))
    out2 = out.reshape((1, out.shape[0]))
    for g in prange(w.shape[0] // 8):
        _x8_rows1(w, 8 * g, xq2, xd2, bsp, 0, out2, ctx.isa)


# a batch of a repacked matrix: matmat's kernel, each work item's rows put back in the file's order
matmat_x8 = kbatch.batch_products("Q5_K", BLOCK_BYTES, [_ZERO8] * (kbatch.GROUP + 1), _batch_body, _batch_finish, __name__, interleaved=True)
