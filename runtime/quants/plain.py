"""The unblocked float formats F32, F16 and BF16 (numpy, and numba for F16 -> F32, which numpy
does slowly).

Layouts: F32 = 4-byte IEEE single per value; F16 = 2-byte IEEE half per value;
BF16 = the upper 16 bits of the float32 (ggml_bf16_t).
Conversions follow ggml: F32->F16 rounds to nearest even (GGML_FP32_TO_FP16 == numpy's
astype); F32->BF16 is ggml_compute_fp32_to_bf16 (round to nearest even, NaN forced quiet).
Each `dequantize_X(raw, out)` / `quantize_X(x, out)` works on whole 2-D row arrays.

Products: F16 as ggml's AVX2 ggml_vec_dot_f16 (vector IR below), against the activations
rounded to half, one token (matvec_f16) or a batch (matmat_f16: tiles of rows x tokens whose
every (row, token) is the one-token float, bit for bit); F32 as a plain float32 loop.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import c_arrays, host_isas, isa_typer, _f32, _fma, _halves_to_float, _i8, _i16, _i32, _i64, _load, _mask, _prefetch, _state_loop, _vec

F16_MAGIC = np.float32(2.0**-14)  # subtracting it turns a denormal half's rebased bits into its value


@njit(cache=True, nogil=True)
def dequantize_f16_row(row, y):
    """One row of halves (raw bytes) -> float32, bit-exact (NaN payloads aside): the half's
    fields are moved into float32 position with integer selects (vectorizable), then the
    denormals, rebased to 2^-14 * (1 + m/1024), get 2^-14 subtracted."""
    h = row.view(np.uint16)
    u = y.view(np.uint32)
    for i in range(h.shape[0]):
        x = np.uint32(h[i])
        o = (x & np.uint32(0x7FFF)) << np.uint32(13)
        e = o & np.uint32(0x0F800000)
        o += np.uint32(112 << 23)  # rebias the exponent 15 -> 127
        o = o + np.uint32(112 << 23) if e == np.uint32(0x0F800000) else o  # inf / NaN: exponent 255
        o = o + np.uint32(1 << 23) if e == np.uint32(0) else o  # zero / denormal: see below
        u[i] = o | ((x & np.uint32(0x8000)) << np.uint32(16))
    for i in range(h.shape[0]):
        x = np.uint32(h[i])
        if (x & np.uint32(0x7C00)) == np.uint32(0):
            v = abs(y[i]) - F16_MAGIC
            y[i] = -v if x & np.uint32(0x8000) else v


def dequantize_f32(raw, out):
    out[...] = raw.view(np.float32)


def quantize_f32(x, out):
    out.view(np.float32)[...] = x


F16_DENORM_MAGIC = np.float32(0.5)  # bits ((127 - 15) + (23 - 10) + 1) << 23: adding it rounds a tiny value to a half denormal


@njit(cache=True, nogil=True)
def quantize_f16_row(x, row):
    """One row float32 -> halves, round to nearest even like GGML_FP32_TO_FP16 (NaN -> 0x7E00):
    integer arithmetic on the bits for normal halves (add 0xFFF + the lowest kept bit, shift),
    and for denormals a float add of 0.5 that leaves the rounded half mantissa in the low bits.
    numpy's own cast is right too, but slow."""
    u = x.view(np.uint32)
    h = row.view(np.uint16)
    tmp = np.empty(x.shape[0], np.float32)
    for i in range(x.shape[0]):
        tmp[i] = abs(x[i]) + F16_DENORM_MAGIC
    t = tmp.view(np.uint32)
    for i in range(x.shape[0]):
        f = u[i] & np.uint32(0x7FFFFFFF)
        sign = (u[i] >> np.uint32(16)) & np.uint32(0x8000)
        normal = (f + np.uint32(((15 - 127) << 23) + 0xFFF) + ((f >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        denormal = t[i] - np.uint32(0x3F000000)
        big = np.uint32(0x7E00) if f > np.uint32(0x7F800000) else np.uint32(0x7C00)
        o = big if f >= np.uint32(0x47800000) else (denormal if f < np.uint32(0x38800000) else normal)
        h[i] = o | sign


HALF_ROUNDING_MAGIC = np.float32(0.5)  # its ulp is 2^-24, a half denormal's quantum: |x| + 0.5 - 0.5 rounds to it


@njit(cache=True)  # (not inline="always": see forward.py's row helpers)
def round_row_to_half(x, out, tmp):
    """out = x (float32 [K], contiguous) rounded to the nearest half, ties to even, as float32:
    GGML_FP32_TO_FP16 and back, as rounding.round_to_f16 value by value (beyond the half range
    inf; NaN kept), in selects on the bits that LLVM vectorizes: the mantissa rounded to 10 bits
    for normal halves, |x| + 0.5 - 0.5 for the denormals (tmp: float32 [K] scratch). out may
    be x itself."""
    u = x.view(np.uint32)
    o = out.view(np.uint32)
    for i in range(tmp.shape[0]):
        tmp[i] = (abs(x[i]) + HALF_ROUNDING_MAGIC) - HALF_ROUNDING_MAGIC
    d = tmp.view(np.uint32)
    for i in range(tmp.shape[0]):
        f = u[i] & np.uint32(0x7FFFFFFF)
        normal = (f + np.uint32(0xFFF) + ((f >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
        mag = d[i] if f < np.uint32(0x38800000) else (normal if f < np.uint32(0x477FF000) else np.uint32(0x7F800000))
        o[i] = u[i] if f > np.uint32(0x7F800000) else (mag | (u[i] & np.uint32(0x80000000)))


@njit(cache=True, nogil=True)
def round_rows_to_half(x, out):
    """round_row_to_half of each row of x (float32 [T, K], C-contiguous) into out."""
    tmp = np.empty(x.shape[1], np.float32)
    for t in range(x.shape[0]):
        round_row_to_half(x[t], out[t], tmp)


def dequantize_bf16(raw, out):
    out.view(np.uint32)[...] = raw.view(np.uint16).astype(np.uint32) << 16


def quantize_bf16(x, out):
    u = x.view(np.uint32).astype(np.uint64)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    bits = np.where(is_nan, (u >> 16) | 64, rounded)
    out.view(np.uint16)[...] = bits.astype(np.uint16)


# --- products ---------------------------------------------------------------------------------

def _f16_dot_typer(typingctx, w, r, x, isa):
    """(w uint8 [rows, 2*K] of IEEE halves, r, x float32 [K] already rounded to half) ->
    float32: ggml's AVX2 ggml_vec_dot_f16 over the first K - K % 32 values: 4 accumulators of 8
    lanes, fma per 32-value step; reduced (a0+a2) + (a1+a3), then its 128-bit halves added and
    two horizontal adds. (The K % 32 leftovers are the caller's, in double as ggml's.)"""
    if not c_arrays(w, x):
        return None

    def codegen(context, builder, signature, args):
        wt, _, xt = signature.args[:-1]
        warr = context.make_array(wt)(context, builder, args[0])
        row_bytes = builder.extract_value(warr.shape, 1)
        row = builder.gep(warr.data, [builder.mul(args[1], builder.extract_value(warr.strides, 0))])
        xp = builder.bitcast(context.make_array(xt)(context, builder, args[2]).data, _i8.as_pointer())
        n_steps = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, 64))
        # ggml's 4 accumulators of 8 lanes held as two of 16, a0|a1 and a2|a3 (as _f16_tile's):
        # fma is lane by lane, so each lane's chain is the same; on AVX-512 half the
        # instructions (vcvtph2ps and vfmadd on zmm), elsewhere LLVM splits them in two
        f32x16 = _vec(_f32, 16)
        slots = [cgutils.alloca_once_value(builder, ir.Constant(f32x16, [0.0] * 16)) for _ in range(2)]
        with cgutils.for_range(builder, n_steps) as loop:
            o = builder.mul(loop.index, ir.Constant(loop.index.type, 64))
            _prefetch(builder, row, o, 64)
            xo = builder.mul(loop.index, ir.Constant(loop.index.type, 128))
            for j in range(2):
                bits = _load(builder, row, _vec(_i16, 16), builder.add(o, ir.Constant(o.type, 32 * j)))
                wv = _halves_to_float(builder, bits)
                xv = _load(builder, xp, f32x16, builder.add(xo, ir.Constant(xo.type, 64 * j)))
                builder.store(_fma(builder, wv, xv, builder.load(slots[j])), slots[j])
        s = builder.fadd(builder.load(slots[0]), builder.load(slots[1]))  # (a0 + a2) | (a1 + a3)
        v = builder.fadd(builder.shuffle_vector(s, s, _mask(range(8))), builder.shuffle_vector(s, s, _mask(range(8, 16))))
        t0 = builder.fadd(builder.shuffle_vector(v, v, _mask([0, 1, 2, 3])), builder.shuffle_vector(v, v, _mask([4, 5, 6, 7])))
        # _mm_hadd_ps(t0, t0) twice: (t0_0 + t0_1) + (t0_2 + t0_3)
        e = [builder.extract_element(t0, ir.Constant(_i32, i)) for i in range(4)]
        return builder.fadd(builder.fadd(e[0], e[1]), builder.fadd(e[2], e[3]))

    return types.float32(w, r, x, isa), codegen


f16_dot = intrinsic(isa_typer(_f16_dot_typer))


def _f16_widen_typer(typingctx, w, r, wf, i, isa):
    """(w uint8 [rows, 2*K] of IEEE halves, r, wf float32 [n, K'], i): wf[i] = row r's first K'
    halves as float32 (K' a multiple of 32; vcvtph2ps with F16C, exact: the halves' values)."""
    if not c_arrays(w, wf):
        return None

    def codegen(context, builder, signature, args):
        wt, _, wft = signature.args[:-2]
        warr = context.make_array(wt)(context, builder, args[0])
        row = builder.gep(warr.data, [builder.mul(args[1], builder.extract_value(warr.strides, 0))])
        farr = context.make_array(wft)(context, builder, args[2])
        k = builder.extract_value(farr.shape, 1)
        dst = builder.bitcast(builder.gep(farr.data, [builder.mul(args[3], k)]), _i8.as_pointer())
        with cgutils.for_range(builder, builder.sdiv(k, ir.Constant(k.type, 16))) as loop:
            o = builder.mul(loop.index, ir.Constant(loop.index.type, 32))
            v = _halves_to_float(builder, _load(builder, row, _vec(_i16, 16), o))
            builder.store(v, builder.bitcast(builder.gep(dst, [builder.add(o, o)]), v.type.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(w, r, wf, i, isa), codegen


f16_widen = intrinsic(isa_typer(_f16_widen_typer))


def _f16_sums(builder, pairs):
    """f16_dot's final float of each (lo, hi) pair of 16-lane accumulators (a0|a1, a2|a3):
    s = lo + hi, v = s[:8] + s[8:], h = v[:4] + v[4:], (h0 + h1) + (h2 + h3), the same adds
    in the same order, but done for up to 16 pairs side by side in 16-lane vectors (each
    stage's halves gathered from two vectors by one shuffle) instead of one pair at a time."""
    f32x16 = _vec(_f32, 16)
    zero = ir.Constant(f32x16, [0.0] * 16)
    out = []
    for g in range(0, len(pairs), 16):
        vs = [builder.fadd(lo, hi) for lo, hi in pairs[g:g + 16]]
        vs += [zero] * (16 - len(vs))
        # v: [s_a[:8] | s_b[:8]] + [s_a[8:] | s_b[8:]]; h: the 4-lane halves of 4 pairs' v;
        # then even + odd lanes twice: (h0 + h1), (h2 + h3), then their sum
        for first, second in (([*range(8), *range(16, 24)], [*range(8, 16), *range(24, 32)]),
                              ([8 * q + j for q in range(4) for j in range(4)], [8 * q + 4 + j for q in range(4) for j in range(4)]),
                              (list(range(0, 32, 2)), list(range(1, 32, 2))),
                              (list(range(0, 32, 2)), list(range(1, 32, 2)))):
            vs = [builder.fadd(builder.shuffle_vector(a, b, _mask(first)), builder.shuffle_vector(a, b, _mask(second)))
                  for a, b in zip(vs[0::2], vs[1::2])]
        out += [builder.extract_element(vs[0], ir.Constant(_i32, j)) for j in range(min(16, len(pairs) - g))]
    return out


def _f16_tile(n_rows, n_tok):
    """An intrinsic (wf, i0, r_base, x, tile, s0, n_s, acc, slot, out, isa): rows i0.. of wf
    (float32 [n, K'], a work item's rows converted from halves by f16_widen; wf[i] is the
    matrix's row r_base + i) times the n_tok tokens of tile `tile` of x (float32 [T, K], the
    tokens tile * n_tok.., each read from its own row: no copy of the batch in another layout),
    over the 32-value steps s0..s0+n_s-1: started from
    zero when s0 = 0, else from the accumulators left in acc[slot] (float32 [slots, 2 * n_rows
    * n_tok * 16]) by the steps before; left there again unless the steps end the row, when
    the sums go to out[t, r] (float32 [T, rows]), each (row, token) f16_dot's float:
    per pair ggml's 4 accumulators of 8 lanes, held as two 16-lane vectors (a0|a1 and a2|a3:
    fma is lane by lane, so the lanes' chains are the same), reduced (a0+a2) + (a1+a3), 128-bit
    halves, two horizontal adds. A step's n_rows weight vectors and n_tok activation vectors
    feed n_rows*n_tok fmas (the one-token kernel loads one activation vector per fma).
    Rows past wf's last and tokens past the batch's last repeat the last ones (the same value
    stored twice), so a matrix's and a batch's leftovers take the same kernel. (Splitting the
    steps changes no float: each lane's chain goes on from the same bits.)"""

    def typer(typingctx, wf, i0, r_base, x, tile, s0, n_s, acc, slot, out, isa):
        if not c_arrays(wf, x, acc, out, ndim=2):
            return None
        return types.none(wf, i0, r_base, x, tile, s0, n_s, acc, slot, out, isa), codegen

    def codegen(context, builder, signature, args):
        wft, _, _, xt, _, _, _, acct, _, outt = signature.args[:-1]
        farr = context.make_array(wft)(context, builder, args[0])
        i0, r_base, tile, s0, n_s, slot = args[1], args[2], args[4], args[5], args[6], args[8]
        k = builder.extract_value(farr.shape, 1)
        last_row = builder.sub(builder.extract_value(farr.shape, 0), ir.Constant(k.type, 1))

        def clamp(v, hi):
            return builder.select(builder.icmp_signed("<", v, hi), v, hi)

        local = [clamp(builder.add(i0, ir.Constant(i0.type, i)), last_row) for i in range(n_rows)]
        rows = [builder.bitcast(builder.gep(farr.data, [builder.mul(li, k)]), _i8.as_pointer()) for li in local]
        oarr = context.make_array(outt)(context, builder, args[9])
        n_out = builder.extract_value(oarr.shape, 1)
        last_tok = builder.sub(builder.extract_value(oarr.shape, 0), ir.Constant(n_out.type, 1))
        t0 = builder.mul(tile, ir.Constant(tile.type, n_tok))
        tok = [clamp(builder.add(t0, ir.Constant(t0.type, t)), last_tok) for t in range(n_tok)]
        xarr = context.make_array(xt)(context, builder, args[3])
        x_stride = builder.extract_value(xarr.strides, 0)
        xdata = builder.bitcast(xarr.data, _i8.as_pointer())
        xrows = [builder.gep(xdata, [builder.mul(tt, x_stride)]) for tt in tok]
        n_steps = builder.sdiv(k, ir.Constant(k.type, 32))
        f32x16 = _vec(_f32, 16)
        zero16 = ir.Constant(f32x16, [0.0] * 16)
        n_acc = 2 * n_rows * n_tok
        aarr = context.make_array(acct)(context, builder, args[7])
        kept = builder.bitcast(builder.gep(aarr.data, [builder.mul(slot, builder.extract_value(aarr.shape, 1))]), f32x16.as_pointer())
        kept = [builder.gep(kept, [ir.Constant(_i64, j)]) for j in range(n_acc)]
        before = builder.basic_block
        resume = builder.append_basic_block("tile.resume")
        start = builder.append_basic_block("tile.start")
        builder.cbranch(builder.icmp_signed("==", s0, ir.Constant(s0.type, 0)), start, resume)
        builder.position_at_end(resume)
        loaded = [builder.load(a, align=4) for a in kept]
        builder.branch(start)
        builder.position_at_end(start)
        init = []
        for v in loaded:
            phi = builder.phi(f32x16)
            phi.add_incoming(zero16, before)
            phi.add_incoming(v, resume)
            init.append(phi)

        def step(j, accs):
            i = builder.add(j, s0)
            o = builder.mul(i, ir.Constant(i.type, 128))
            wv = [[_load(builder, row, f32x16, builder.add(o, ir.Constant(o.type, 64 * h))) for h in range(2)] for row in rows]
            new = list(accs)
            for t in range(n_tok):
                for h in range(2):
                    xv = _load(builder, xrows[t], f32x16, builder.add(o, ir.Constant(o.type, 64 * h)))
                    for r in range(n_rows):
                        j = 2 * (r * n_tok + t) + h
                        new[j] = _fma(builder, wv[r][h], xv, accs[j])
            return new

        accs = _state_loop(builder, n_s, init, step)
        ends = builder.icmp_signed(">=", builder.add(s0, n_s), n_steps)
        with builder.if_else(ends) as (last, more):
            with more:  # the row goes on in a later call
                for a, v in zip(kept, accs):
                    builder.store(v, a, align=4)
            with last:
                sums = _f16_sums(builder, [(accs[2 * p], accs[2 * p + 1]) for p in range(n_rows * n_tok)])
                toks = [builder.mul(tt, n_out) for tt in tok]
                for r in range(n_rows):
                    col = builder.add(r_base, local[r])
                    for t in range(n_tok):
                        builder.store(sums[r * n_tok + t], builder.gep(oarr.data, [builder.add(toks[t], col)]))
        return context.get_dummy_value()

    return intrinsic(isa_typer(typer))


# the tile's rows x tokens: with AVX-512 2 x 6 pairs' accumulators take 24 of the 32 vector
# registers; with 16 (AVX2: a 16-lane vector is two) 1 x 3 take 12 (the code is compiled for
# this CPU's registers whatever the instruction set the kernels' IR is emitted for)
TILE_ROWS, TILE_TOKENS = (2, 6) if host_isas()[0] == "avx512vnni" else (1, 3)
_tile = _f16_tile(TILE_ROWS, TILE_TOKENS)
CHUNK_ROWS = 64  # at most this many rows per work item: their floats stay in L2 while the token tiles pass
CHUNK_BYTES = 1 << 18  # and at most this many bytes of them (K = 1536: 42 rows), beside the batch in L2
STEPS_IN_L1 = 32  # at most this many 32-value steps of a tile's tokens (24 KiB) per pass over the rows


@njit(cache=True)
def chunk_rows(n_rows, k):
    """matmat_f16's rows per work item for a matrix of n_rows rows of k values: at most
    CHUNK_ROWS and CHUNK_BYTES of floats, a multiple of TILE_ROWS, and an even number of equal
    work items (two threads take equal shares; numba's thread count, read in compiled code,
    would keep the function out of the cache). Each item's first pass over a tile of tokens
    reads them from L2, the other passes from L1: the more rows, the fewer such passes."""
    most = max(TILE_ROWS, min(CHUNK_ROWS, CHUNK_BYTES // max(4 * k, 1)))
    n_items = -(-n_rows // most)  # (-(-a // b): a / b rounded up)
    n_items += n_items % 2
    per_item = -(-n_rows // n_items)
    return -(-per_item // TILE_ROWS) * TILE_ROWS


@njit(cache=True, parallel=True)
def matvec_f16(w, ctx, xq, xd, xs, x, out):
    """As ggml's AVX2 ggml_vec_dot_f16 (x: the activations rounded to half): the vector IR's 4
    accumulators over 32-value steps and their reduction, then the K % 32 leftovers in double."""
    k = x.shape[0]
    tail = k - k % 32
    for r in prange(w.shape[0]):
        acc = np.float64(f16_dot(w, r, x, ctx.isa))
        if tail < k:
            row = w[r].view(np.uint16)
            for i in range(tail, k):
                acc += np.float64(ctx.table[row[i]] * x[i])
        out[r] = np.float32(acc)


@njit(cache=True, parallel=True)
def matmat_f16(w, ctx, xq, xd, xs, x, out):
    """out [T, rows] = the T tokens' products with an F16 matrix (x: the activations rounded
    to half), each (row, token) matvec_f16's float: TILE_ROWS rows x TILE_TOKENS tokens per
    pass (_f16_tile), a work item's chunk_rows rows, converted to float32 once, meeting every
    tile of tokens in turn, a block of at most STEPS_IN_L1 steps at a time, so that the
    block's activations stay in L1 while the rows pass (the accumulators kept between
    blocks); the K % 32 leftovers in double, as matvec_f16."""
    n_tok, k = x.shape
    n_rows = w.shape[0]
    tail = k - k % 32
    n_tiles = (n_tok + TILE_TOKENS - 1) // TILE_TOKENS
    n_steps = k // 32
    n_blocks = max(1, (n_steps + STEPS_IN_L1 - 1) // STEPS_IN_L1)
    block = max(1, (n_steps + n_blocks - 1) // n_blocks)  # (equal blocks)
    rows = chunk_rows(n_rows, tail)
    n_chunks = (n_rows + rows - 1) // rows
    for c in prange(n_chunks):
        r0 = c * rows
        r1 = min(n_rows, r0 + rows)
        wf = np.empty((r1 - r0, tail), np.float32)
        for i in range(wf.shape[0]):
            f16_widen(w, r0 + i, wf, i, ctx.isa)
        acc = np.empty(((wf.shape[0] + TILE_ROWS - 1) // TILE_ROWS, 32 * TILE_ROWS * TILE_TOKENS), np.float32)
        for p in range(n_tiles):
            for s0 in range(0, max(n_steps, 1), block):
                for i0 in range(0, wf.shape[0], TILE_ROWS):
                    _tile(wf, i0, r0, x, p, s0, min(block, n_steps - s0), acc, i0 // TILE_ROWS, out, ctx.isa)
        if tail < k:
            for r in range(r0, r1):
                row = w[r].view(np.uint16)
                for t in range(n_tok):
                    acc = np.float64(out[t, r])
                    for i in range(tail, k):
                        acc += np.float64(ctx.table[row[i]] * x[t, i])
                    out[t, r] = np.float32(acc)


@njit(cache=True, parallel=True, fastmath=True)
def matvec_f32(w, ctx, xq, xd, xs, x, out):
    n_rows = w.shape[0]
    k = x.shape[0]
    for r in prange(n_rows):
        row = w[r].view(np.float32)
        acc = np.float32(0.0)
        for i in range(k):
            acc += row[i] * x[i]
        out[r] = acc
