"""The unblocked float formats F32, F16 and BF16 (numpy, and numba for F16 -> F32, which numpy
does slowly).

Layouts: F32 = 4-byte IEEE single per value; F16 = 2-byte IEEE half per value;
BF16 = the upper 16 bits of the float32 (ggml_bf16_t).
Conversions follow ggml: F32->F16 rounds to nearest even (GGML_FP32_TO_FP16 == numpy's
astype); F32->BF16 is ggml_compute_fp32_to_bf16 (round to nearest even, NaN forced quiet).
Each `dequantize_X(raw, out)` / `quantize_X(x, out)` works on whole 2-D row arrays.

Products: F16 as ggml's AVX2 ggml_vec_dot_f16 (vector IR below), against the activations
rounded to half; F32 as a plain float32 loop.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import ROW_TOKENS, _ZERO8, isa_typer, _f32, _fma, _halves_to_float, _i8, _i16, _i32, _load, _mask, _prefetch, _state_loop, _vec

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
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in (w, x)):
        return None

    def codegen(context, builder, signature, args):
        wt, _, xt = signature.args[:-1]
        warr = context.make_array(wt)(context, builder, args[0])
        row_bytes = builder.extract_value(warr.shape, 1)
        row = builder.gep(warr.data, [builder.mul(args[1], builder.extract_value(warr.strides, 0))])
        xp = builder.bitcast(context.make_array(xt)(context, builder, args[2]).data, _i8.as_pointer())
        n_steps = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, 64))
        f32x8 = _vec(_f32, 8)
        slots = [cgutils.alloca_once_value(builder, _ZERO8) for _ in range(4)]
        with cgutils.for_range(builder, n_steps) as loop:
            o = builder.mul(loop.index, ir.Constant(loop.index.type, 64))
            _prefetch(builder, row, o, 64)
            xo = builder.mul(loop.index, ir.Constant(loop.index.type, 128))
            for j in range(4):
                bits = _load(builder, row, _vec(_i16, 8), builder.add(o, ir.Constant(o.type, 16 * j)))
                wv = _halves_to_float(builder, bits)
                xv = _load(builder, xp, f32x8, builder.add(xo, ir.Constant(xo.type, 32 * j)))
                builder.store(_fma(builder, wv, xv, builder.load(slots[j])), slots[j])
        a = [builder.load(sl) for sl in slots]
        v = builder.fadd(builder.fadd(a[0], a[2]), builder.fadd(a[1], a[3]))
        t0 = builder.fadd(builder.shuffle_vector(v, v, _mask([0, 1, 2, 3])), builder.shuffle_vector(v, v, _mask([4, 5, 6, 7])))
        # _mm_hadd_ps(t0, t0) twice: (t0_0 + t0_1) + (t0_2 + t0_3)
        e = [builder.extract_element(t0, ir.Constant(_i32, i)) for i in range(4)]
        return builder.fadd(builder.fadd(e[0], e[1]), builder.fadd(e[2], e[3]))

    return types.float32(w, r, x, isa), codegen


f16_dot = intrinsic(isa_typer(_f16_dot_typer))


def _f16_tokens(n_t):
    """The batch form of f16_dot: (w, r, x [T, K] float32 already rounded to half, t0, out
    [T, rows]) writes f16_dot(w, r, x[t]) into out[t, r] for the n_t tokens t0.. (each token the
    one-token floats; the row's halves converted once for all of them)."""

    def typer(typingctx, w, r, x, t0, out, isa):
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in (w, x, out)) or x.ndim != 2 or out.ndim != 2:
            return None
        return types.none(w, r, x, t0, out, isa), codegen

    def codegen(context, builder, signature, args):
        wt, _, xt, _, outt = signature.args[:-1]
        warr = context.make_array(wt)(context, builder, args[0])
        r, t0 = args[1], args[3]
        row_bytes = builder.extract_value(warr.shape, 1)
        row = builder.gep(warr.data, [builder.mul(r, builder.extract_value(warr.strides, 0))])
        xarr = context.make_array(xt)(context, builder, args[2])
        k_vals = builder.extract_value(xarr.shape, 1)
        oarr = context.make_array(outt)(context, builder, args[4])
        n_out = builder.extract_value(oarr.shape, 1)
        toks = [builder.add(t0, ir.Constant(t0.type, t)) for t in range(n_t)]
        xp = [builder.bitcast(builder.gep(xarr.data, [builder.mul(tk, k_vals)]), _i8.as_pointer()) for tk in toks]
        n_steps = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, 64))
        f32x8 = _vec(_f32, 8)

        def step(i, accs):
            o = builder.mul(i, ir.Constant(i.type, 64))
            xo = builder.mul(i, ir.Constant(i.type, 128))
            wv = [_halves_to_float(builder, _load(builder, row, _vec(_i16, 8), builder.add(o, ir.Constant(o.type, 16 * j))))
                  for j in range(4)]
            new = []
            for t in range(n_t):
                for j in range(4):
                    xv = _load(builder, xp[t], f32x8, builder.add(xo, ir.Constant(xo.type, 32 * j)))
                    new.append(_fma(builder, wv[j], xv, accs[4 * t + j]))
            return new

        accs = _state_loop(builder, n_steps, [_ZERO8] * (4 * n_t), step)
        for t in range(n_t):
            a = accs[4 * t:4 * t + 4]
            v = builder.fadd(builder.fadd(a[0], a[2]), builder.fadd(a[1], a[3]))
            h = builder.fadd(builder.shuffle_vector(v, v, _mask([0, 1, 2, 3])), builder.shuffle_vector(v, v, _mask([4, 5, 6, 7])))
            e = [builder.extract_element(h, ir.Constant(_i32, i)) for i in range(4)]
            dst = builder.gep(oarr.data, [builder.add(builder.mul(toks[t], n_out), r)])
            builder.store(builder.fadd(builder.fadd(e[0], e[1]), builder.fadd(e[2], e[3])), dst)
        return context.get_dummy_value()

    return typer


f16_rows4 = intrinsic(isa_typer(_f16_tokens(ROW_TOKENS)))
f16_rows1 = intrinsic(isa_typer(_f16_tokens(1)))



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
    to half), each (row, token) matvec_f16's floats: ROW_TOKENS tokens per step."""
    n_tok, k = x.shape
    tail = k - k % 32
    in_steps = n_tok - n_tok % ROW_TOKENS
    for r in prange(w.shape[0]):
        for t0 in range(0, in_steps, ROW_TOKENS):
            f16_rows4(w, r, x, t0, out, ctx.isa)
        for t0 in range(in_steps, n_tok):
            f16_rows1(w, r, x, t0, out, ctx.isa)
        if tail < k:
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
