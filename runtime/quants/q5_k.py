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
and the row's result hsum_float_8(acc) + summs.
"""

import numpy as np
from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import simd
from .simd import array_args, c_arrays, isa_typer, offsets, row_at, _ZERO, _ZERO8, _f32, _fma, _half, _hsum8, _i8, _i16, _i32, _lane_accumulate, _load, _mask, _prefetch, _vec
from . import kbatch
from .ksearch import k4_row_converters
from .q4_k import PREFETCH_AHEAD, PREFETCH_LOCALITY, broadcast_word, scale_words, scales_mins_ir, scales_mins_vec

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
    sixteen = ir.Constant(v32, [16] * 32)
    quants = []
    for c in range(4):
        qs = _load(builder, blk, v32, 48 + 32 * c)
        for h in range(2):
            low = builder.and_(qs, ir.Constant(v32, [15] * 32)) if h == 0 else builder.lshr(qs, ir.Constant(v32, [4] * 32))
            bit = 2 * c + h  # moved to bit 4 of its byte, the rest masked off
            moved = (builder.shl(qh, ir.Constant(v32, [4 - bit] * 32)) if bit < 4 else
                     builder.lshr(qh, ir.Constant(v32, [bit - 4] * 32)) if bit > 4 else qh)
            quants.append(builder.or_(low, builder.and_(moved, sixteen)))
    return quants


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


def _rows_typer(n_t, prefetch):
    """The typer of an intrinsic (w, r, xq, xd, bsum, t0, out, isa): Q5_K row r times tokens
    t0..t0+n_t-1 (xq int8 [T, K], xd float32 [T, K/32] the Q8_K scale of each 32 values, bsum
    int16 [T, K/32] each 32 values' sum) into out[t0:t0+n_t, r] (float32 [T, rows]); the row's
    blocks unpacked once for the n_t tokens, each token's floats those of the one-token kernel."""

    def typer(typingctx, w, r, xq, xd, bsum, t0, out, isa):
        arrays = (w, xq, xd, bsum, out)
        if not c_arrays(*arrays, ndim=2):
            return None
        return types.none(w, r, xq, xd, bsum, t0, out, isa), codegen

    def codegen(context, builder, signature, args):
        warr, r, xarr, darr, barr, t0, oarr, _ = array_args(context, builder, signature, args)
        row_bytes = builder.extract_value(warr.shape, 1)
        row = row_at(builder, warr, r)
        toks = offsets(builder, t0, n_t)
        yq = [row_at(builder, xarr, tk) for tk in toks]
        yd = [row_at(builder, darr, tk) for tk in toks]
        bsums = [row_at(builder, barr, tk) for tk in toks]
        n_blocks = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, BLOCK_BYTES))

        def step(b, state):
            o = builder.mul(b, ir.Constant(b.type, BLOCK_BYTES))
            if prefetch:  # one token: the weights stream from DRAM
                _prefetch(builder, row, o, BLOCK_BYTES, PREFETCH_AHEAD, PREFETCH_LOCALITY)
            return _block(builder, builder.gep(row, [o]), n_t, yq, bsums, yd, b, state)

        state = simd._state_loop(builder, n_blocks, [_ZERO8, _ZERO] * n_t, step)
        for t in range(n_t):
            builder.store(builder.fadd(_hsum8(builder, state[2 * t]), state[2 * t + 1]), builder.gep(row_at(builder, oarr, toks[t]), [r]))
        return context.get_dummy_value()

    return typer


_rows1 = intrinsic(isa_typer(_rows_typer(1, True)))  # one token (decode), prefetching as Q4_K's kernels (16 KiB ahead into L2)


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
