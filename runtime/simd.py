"""ggml's AVX2 block dot products, written as LLVM vector IR (numba `@intrinsic`).

What LLVM's auto-vectorizer makes of numba loops is not what llama.cpp's hand-written kernels
do: per 32-value block the quants are unpacked into one 32-byte vector, multiplied with the
int8 activations by `vpmaddubsw` (unsigned x signed bytes, adjacent pairs summed to int16),
the pairs summed to 8 int32 lanes by `vpmaddwd`, the lanes converted to float and
fused-multiply-added into an 8-lane accumulator. Each row then costs about 14 instructions
per block (the numba loops needed 2-3 times as many cycles). Emitting that IR ourselves gives
the same instructions, and - because the same lanes are summed in the same order - the same
floats as llama.cpp, bit for bit.

The kernels read the file's own block layout, except the 8-row Q4_0 and Q4_1 ones (an interleaved
copy made at load, for Q4_0 as llama.cpp does; see the end of this module). On a CPU without AVX2 the
same functions emit portable vector IR (int32 products summed 4 by 4: the same integer lane
sums, the same floats, only slower); `AVX2` says which one the host gets, and tests compile
both.

Kernels (typed for numba, used inside jitted loops; w uint8 [rows, row bytes] with C-contiguous
rows, xq int8 [K], xd/xs float32 [K/32]; the 8-row ones write out[r0:r0+8]):
  q4_1_dot(w, r, xq, xd, xs)   Q4_1 row r against Q8_1 activations (vec_dot_q4_1_q8_1)
  q8_0_dot(w, r, xq, xd)       Q8_0 row r against Q8_0 activations (vec_dot_q8_0_q8_0)
  q5_0_dot(w, r, xq, xd)       Q5_0 row r against Q8_0 activations (vec_dot_q5_0_q8_0)
  q6_k_dot(w, r, xq, xd)       Q6_K row r against Q8_K activations (vec_dot_q6_K_q8_K)
  q4_0_dot(w, r, xq, xd)       Q4_0 row r against Q8_0 activations (vec_dot_q4_0_q8_0: matrices
                               llama.cpp leaves unpacked, rows not a multiple of 8)
  q4_0x8_gemv(w, r0, xq, xd, ysum8, t0, out)  Q4_0 rows r0..r0+7 of an interleaved copy
  q4_0x8_gemm(...)             (see below), 1 token / 4 tokens: ggml_gemv/gemm_q4_0_8x8_q8_0
  q4_1x8_gemv(w, r0, xq, xd, xs, t0, out)  Q4_1 rows r0..r0+7 of an interleaved copy, vec_dot's
  q4_1x8_gemm(...)                         lanes, 1 token / Q4_1X8_TOKENS tokens of a batch
  q4_1_rows4(w, r, xq, xd, xs, t0, out)    the batch forms of the one-row kernels: row r times
  q4_1_rows1(...), q8_0_rows4, ...         tokens t0..t0+3 (or t0) into out[t, r], each token
                                           the one-row kernel's floats
  q4_k_dot8(w, r0, xq, xd, t0, out)        Q4_K rows r0..r0+7, ggml_gemv_q4_K_8x8_q8_K's order
  q4_k_gemm8(...)                          the same, Q4_K_TOKENS tokens of a batch
  f16_dot(w, r, x)             F16 row r against half-rounded activations (ggml_vec_dot_f16);
  f16_rows4(w, r, x, t0, out)  its batch form (f16_rows1: one token of a batch)
  fmaf(a, b, c)                float32 fused multiply-add (llvm.fma.f32)
The one-token kernels also prefetch the weights 8 KiB ahead (decode streams them from DRAM).
LLAMACHAT_NO_AVX2=1 forces the portable IR (numba's cache does not key on it: use a fresh
NUMBA_CACHE_DIR, as the tests do).
"""

from __future__ import annotations

import os

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _host_has_avx2() -> bool:
    if os.environ.get("LLAMACHAT_NO_AVX2") == "1":  # to exercise the portable IR
        return False
    if os.environ.get("NUMBA_CPU_NAME", "host") != "host":  # code for another CPU than this one:
        return False  # x86 intrinsics might not exist there
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
        return bool(features.get("avx2")) and bool(features.get("fma")) and bool(features.get("f16c"))
    except Exception:  # noqa: BLE001 - no feature query: the portable IR is always correct
        return False


AVX2 = _host_has_avx2()


def _host_has_f16c() -> bool:
    if os.environ.get("NUMBA_CPU_NAME", "host") != "host":
        return False
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("f16c"))
    except Exception:  # noqa: BLE001
        return False


# half -> float by the CPU's conversion instruction (vcvtph2ps), else by integer arithmetic:
# LLVM lowers a half fpext without F16C to a runtime-library call the JIT cannot resolve
F16C = _host_has_f16c()

_i1, _i8, _i16, _i32, _i64, _f32 = (ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32),
                                    ir.IntType(64), ir.FloatType())


def _vec(t, n):
    return ir.VectorType(t, n)


def _mask(values):
    return ir.Constant(_vec(_i32, len(values)), list(values))


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _load(builder, ptr, ty, offset):
    """An unaligned load of `ty` at byte pointer ptr + offset (an i64 value or int)."""
    if isinstance(offset, int):
        offset = ir.Constant(_i64, offset)
    return builder.load(builder.bitcast(builder.gep(ptr, [offset]), ty.as_pointer()), align=1)


def _half(builder, ptr, offset):
    """The IEEE half at ptr + offset, as float32."""
    return _halves_to_float(builder, _load(builder, ptr, _i16, offset))


def _halves_to_float(builder, bits):
    """IEEE half bit patterns (i16 or <n x i16>) -> float32, exactly."""
    n = bits.type.count if isinstance(bits.type, ir.VectorType) else None
    f32 = _f32 if n is None else _vec(_f32, n)
    if F16C:
        return builder.fpext(builder.bitcast(bits, ir.HalfType() if n is None else _vec(ir.HalfType(), n)), f32)
    i32 = _i32 if n is None else _vec(_i32, n)

    def c(v):
        return ir.Constant(i32, v if n is None else [v] * n)

    x = builder.zext(bits, i32)
    sign = builder.shl(builder.and_(x, c(0x8000)), c(16))
    exp = builder.and_(builder.lshr(x, c(10)), c(0x1F))
    mant = builder.and_(x, c(0x3FF))
    normal = builder.or_(builder.shl(builder.add(exp, c(112)), c(23)), builder.shl(mant, c(13)))
    special = builder.or_(c(0x7F800000), builder.shl(mant, c(13)))  # inf, nan
    tiny = builder.bitcast(builder.fmul(builder.sitofp(mant, f32), ir.Constant(f32, 2.0 ** -24 if n is None else [2.0 ** -24] * n)), i32)
    mag = builder.select(builder.icmp_unsigned("==", exp, c(0)), tiny,
                         builder.select(builder.icmp_unsigned("==", exp, c(31)), special, normal))
    return builder.bitcast(builder.or_(sign, mag), f32)


# Decode reads every weight once per token, from DRAM (SmolLM2's layers are 60-140 MB, more
# than the L3 cache). With only the hardware prefetcher the IR kernels streamed 16 GB/s of the
# 25 GB/s two threads can read here; asking for the bytes 8 KiB ahead of the block being
# summed (the same matrix's next rows) brought the Q4_0 layers of a token from 3.7 to 2.55 ms
# (1, 2, 4, 16 and 32 KiB measured: 8 best).
PREFETCH_AHEAD = 8192


def _prefetch(builder, ptr, offset, nbytes):
    """Prefetch the nbytes at ptr + offset + PREFETCH_AHEAD, one hint per 64-byte line."""
    fn = _fn(builder, "llvm.prefetch.p0i8", ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32])
    for line in range(0, nbytes, 64):
        addr = builder.gep(ptr, [builder.add(offset, ir.Constant(offset.type, PREFETCH_AHEAD + line))])
        builder.call(fn, [addr, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])


def _splat(builder, x, n):
    v = builder.insert_element(ir.Constant(_vec(x.type, n), ir.Undefined), x, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(_vec(x.type, n), ir.Undefined), _mask([0] * n))


def _nibbles(builder, qs):
    """16 quant bytes -> 32 bytes: the low nibbles (values 0-15), then the high ones (16-31):
    ggml's bytes_from_nibbles_32."""
    lo = builder.and_(qs, ir.Constant(_vec(_i8, 16), [15] * 16))
    hi = builder.lshr(qs, ir.Constant(_vec(_i8, 16), [4] * 16))
    return builder.shuffle_vector(lo, hi, _mask(range(32)))


def _lanes_unsigned(builder, qx, qy):
    """8 int32 lanes, lane l = sum of qx[4l+k]*qy[4l+k] (k < 4), qx unsigned bytes, qy signed:
    ggml's mul_sum_us8_pairs (vpmaddubsw, then vpmaddwd against ones)."""
    if AVX2:
        v16 = _vec(_i16, 16)
        pairs = builder.call(_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [qx.type, qy.type]), [qx, qy])
        ones = ir.Constant(v16, [1] * 16)
        return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.wd", _vec(_i32, 8), [v16, v16]), [ones, pairs])
    return _lanes_portable(builder, builder.zext(qx, _vec(_i32, 32)), builder.sext(qy, _vec(_i32, 32)))


def _lanes_signed(builder, qx, qy):
    """The same lanes for signed qx: ggml's mul_sum_i8_pairs (|qx| times qy carrying qx's sign)."""
    if AVX2:
        v32 = qx.type
        sign = _fn(builder, "llvm.x86.avx2.psign.b", v32, [v32, v32])
        return _lanes_unsigned(builder, builder.call(sign, [qx, qx]), builder.call(sign, [qy, qx]))
    return _lanes_portable(builder, builder.sext(qx, _vec(_i32, 32)), builder.sext(qy, _vec(_i32, 32)))


def _lanes_portable(builder, x32, y32):
    prod = builder.mul(x32, y32)
    lanes = builder.shuffle_vector(prod, prod, _mask(range(0, 32, 4)))
    for k in range(1, 4):
        lanes = builder.add(lanes, builder.shuffle_vector(prod, prod, _mask(range(k, 32, 4))))
    return lanes


def _hsum8(builder, acc):
    """ggml's hsum_float_8: (a4+a0) + (a6+a2), + (a5+a1) + (a7+a3), in that order."""
    r = builder.fadd(builder.shuffle_vector(acc, acc, _mask([4, 5, 6, 7])),
                     builder.shuffle_vector(acc, acc, _mask([0, 1, 2, 3])))
    r = builder.fadd(r, builder.shuffle_vector(r, r, _mask([2, 3, 2, 3])))
    return builder.fadd(builder.extract_element(r, ir.Constant(_i32, 0)), builder.extract_element(r, ir.Constant(_i32, 1)))


def _fma(builder, a, b, c):
    name = f"llvm.fma.v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "llvm.fma.f32"
    return builder.call(_fn(builder, name, a.type, [a.type, a.type, a.type]), [a, b, c])


def _row_kernel(block_bytes, n_act, init, body, finish, block_values=32):
    """An intrinsic (w, r, xq, xd[, xs]) -> float32 looping over row r's blocks. The state (a
    list of accumulators) starts as `init`; body(builder, blk, y, scales, state) gets the
    block's byte pointer, a pointer to its block_values int8 activations and the n_act
    activation scales of the block's first 32 values, and returns the new state;
    finish(builder, state) gives the row's result."""

    def make_sig(w, r, xq, *act):
        arrays = (w, xq, *act)
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays):
            return None  # the IR reads rows and activations as contiguous memory
        return types.float32(w, r, xq, *act)

    def codegen(context, builder, signature, args):
        wt, _, xqt, *act_t = signature.args
        warr = context.make_array(wt)(context, builder, args[0])
        row_bytes = builder.extract_value(warr.shape, 1)
        row = builder.gep(warr.data, [builder.mul(args[1], builder.extract_value(warr.strides, 0))])
        yq = builder.bitcast(context.make_array(xqt)(context, builder, args[2]).data, _i8.as_pointer())
        scale_ptrs = [context.make_array(t)(context, builder, a).data for t, a in zip(act_t, args[3:])]
        n_blocks = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, block_bytes))
        slots = [cgutils.alloca_once_value(builder, v) for v in init]
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            o = builder.mul(b, ir.Constant(b.type, block_bytes))
            _prefetch(builder, row, o, block_bytes)
            blk = builder.gep(row, [o])
            y = builder.gep(yq, [builder.mul(b, ir.Constant(b.type, block_values))])
            scale_at = builder.mul(b, ir.Constant(b.type, block_values // 32))
            scales = [builder.load(builder.gep(p, [scale_at])) for p in scale_ptrs]
            state = body(builder, blk, y, scales, [builder.load(s) for s in slots])
            for s, v in zip(slots, state):
                builder.store(v, s)
        return finish(builder, [builder.load(s) for s in slots])

    if n_act == 1:  # (numba's intrinsics take no *args)
        def typer(typingctx, w, r, xq, xd):
            return make_sig(w, r, xq, xd), codegen
    else:
        def typer(typingctx, w, r, xq, xd, xs):
            return make_sig(w, r, xq, xd, xs), codegen
    return typer


_ZERO8 = ir.Constant(_vec(_f32, 8), [0.0] * 8)
_ZERO = ir.Constant(_f32, 0.0)


def _lane_accumulate(builder, d, lanes, acc):
    """acc = fma(d, float(lanes), acc) on all 8 lanes (ggml: _mm256_fmadd_ps(d, q, acc))."""
    return _fma(builder, _splat(builder, d, 8), builder.sitofp(lanes, _vec(_f32, 8)), acc)


def _q4_1_body(builder, blk, y, scales, state):
    qy = _load(builder, y, _vec(_i8, 32), 0)
    yd, ys = scales
    acc, mins = state
    lanes = _lanes_unsigned(builder, _nibbles(builder, _load(builder, blk, _vec(_i8, 16), 4)), qy)
    acc = _lane_accumulate(builder, builder.fmul(_half(builder, blk, 0), yd), lanes, acc)
    mins = _fma(builder, _half(builder, blk, 2), ys, mins)  # summs += m * s
    return [acc, mins]


def _q4_1_finish(builder, state):
    return builder.fadd(_hsum8(builder, state[0]), state[1])


def _q8_0_body(builder, blk, y, scales, state):
    qy = _load(builder, y, _vec(_i8, 32), 0)
    lanes = _lanes_signed(builder, _load(builder, blk, _vec(_i8, 32), 2), qy)
    return [_lane_accumulate(builder, builder.fmul(_half(builder, blk, 0), scales[0]), lanes, state[0])]


def _q5_0_body(builder, blk, y, scales, state):
    qy = _load(builder, y, _vec(_i8, 32), 0)
    # ggml: qx = nibbles | (~fifth bit & 0xF0): the value less 16 as a signed byte
    bits = builder.bitcast(_load(builder, blk, _i32, 2), _vec(_i1, 32))
    high = builder.select(bits, ir.Constant(_vec(_i8, 32), [0] * 32), ir.Constant(_vec(_i8, 32), [0xF0] * 32))
    qx = builder.or_(_nibbles(builder, _load(builder, blk, _vec(_i8, 16), 6)), high)
    lanes = _lanes_signed(builder, qx, qy)
    return [_lane_accumulate(builder, builder.fmul(_half(builder, blk, 0), scales[0]), lanes, state[0])]


def _lanes_finish(builder, state):
    return _hsum8(builder, state[0])


def _q4_0_body(builder, blk, y, scales, state):
    qy = _load(builder, y, _vec(_i8, 32), 0)
    qx = builder.sub(_nibbles(builder, _load(builder, blk, _vec(_i8, 16), 2)), ir.Constant(_vec(_i8, 32), [8] * 32))
    lanes = _lanes_signed(builder, qx, qy)
    return [_lane_accumulate(builder, builder.fmul(_half(builder, blk, 0), scales[0]), lanes, state[0])]


def _scaled_lanes(builder, q, qy, sc_lo, sc_hi, bias):
    """8 int32 lanes of sum(sc * (q - bias) * y) over 4-byte groups, q unsigned bytes (0-63),
    the first 16 bytes scaled by sc_lo, the last 16 by sc_hi (i32 values). AVX2: ggml's
    vpmaddubsw(q, y) - vpmaddubsw(bias, y), then vpmaddwd against the int16 scales."""
    v16 = _vec(_i16, 16)
    if AVX2:
        madd_us = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [q.type, qy.type])
        p16 = builder.call(madd_us, [q, qy])
        if bias:
            p16 = builder.sub(p16, builder.call(madd_us, [ir.Constant(q.type, [bias] * 32), qy]))
        lo = _splat(builder, builder.trunc(sc_lo, _i16), 8)
        hi = _splat(builder, builder.trunc(sc_hi, _i16), 8)
        scales = builder.shuffle_vector(lo, hi, _mask(range(16)))
        return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.wd", _vec(_i32, 8), [v16, v16]), [scales, p16])
    v32 = _vec(_i32, 32)
    vals = builder.zext(q, v32)
    if bias:
        vals = builder.sub(vals, ir.Constant(v32, [bias] * 32))
    scales = builder.shuffle_vector(_splat(builder, sc_lo, 16), _splat(builder, sc_hi, 16), _mask(range(32)))
    return _lanes_portable(builder, builder.mul(vals, scales), builder.sext(qy, v32))


def _q6_k_body(builder, blk, y, scales, state):
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


def _tokens_kernel(block_bytes, n_act, init, body, finish, n_t, block_values=32):
    """The batch form of a `_row_kernel`: an intrinsic (w, r, xq, xd[, xs], t0, out) writing
    row r times tokens t0..t0+n_t-1 into out[t0:t0+n_t, r] (xq int8 [T, K], xd/xs float32
    [T, K/32], out float32 [T, rows], all C-contiguous). Each token's state goes through the
    same body and finish as the one-token kernel (the same floats, bit for bit); the block's
    bytes are loaded and unpacked once for all n_t tokens (LLVM merges the repeated loads)."""

    def make_sig(w, r, xq, act, t0, out):
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in (w, xq, *act, out)):
            return None
        if xq.ndim != 2 or out.ndim != 2 or any(a.ndim != 2 for a in act):
            return None
        return types.none(w, r, xq, *act, t0, out)

    def codegen(context, builder, signature, args):
        wt, _, xqt, *act_t = signature.args[:3 + n_act]
        outt = signature.args[-1]
        warr = context.make_array(wt)(context, builder, args[0])
        r, t0 = args[1], args[3 + n_act]
        row_bytes = builder.extract_value(warr.shape, 1)
        row = builder.gep(warr.data, [builder.mul(r, builder.extract_value(warr.strides, 0))])
        xarr = context.make_array(xqt)(context, builder, args[2])
        k_vals = builder.extract_value(xarr.shape, 1)
        act_arrs = [context.make_array(t)(context, builder, a) for t, a in zip(act_t, args[3:3 + n_act])]
        oarr = context.make_array(outt)(context, builder, args[-1])
        n_out = builder.extract_value(oarr.shape, 1)
        toks = [builder.add(t0, ir.Constant(t0.type, t)) for t in range(n_t)]
        yq = [builder.gep(builder.bitcast(xarr.data, _i8.as_pointer()), [builder.mul(tk, k_vals)]) for tk in toks]
        scale_rows = [[builder.gep(a.data, [builder.mul(tk, builder.extract_value(a.shape, 1))]) for a in act_arrs]
                      for tk in toks]
        n_blocks = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, block_bytes))
        n_state = len(init)

        def block(b, state):
            o = builder.mul(b, ir.Constant(b.type, block_bytes))
            blk = builder.gep(row, [o])
            yo = builder.mul(b, ir.Constant(b.type, block_values))
            scale_at = builder.mul(b, ir.Constant(b.type, block_values // 32))
            new = []
            for t in range(n_t):
                scales = [builder.load(builder.gep(p, [scale_at])) for p in scale_rows[t]]
                new += body(builder, blk, builder.gep(yq[t], [yo]), scales, state[n_state * t:n_state * (t + 1)])
            return new

        state = _state_loop(builder, n_blocks, list(init) * n_t, block)
        for t in range(n_t):
            dst = builder.gep(oarr.data, [builder.add(builder.mul(toks[t], n_out), r)])
            builder.store(finish(builder, state[n_state * t:n_state * (t + 1)]), dst)
        return context.get_dummy_value()

    if n_act == 1:
        def typer(typingctx, w, r, xq, xd, t0, out):
            return make_sig(w, r, xq, (xd,), t0, out), codegen
    else:
        def typer(typingctx, w, r, xq, xd, xs, t0, out):
            return make_sig(w, r, xq, (xd, xs), t0, out), codegen
    return intrinsic(typer)


# tokens per step of the batch kernels (a row's blocks unpacked once for all of them)
ROW_TOKENS = 4

q4_1_dot = intrinsic(_row_kernel(20, 2, [_ZERO8, _ZERO], _q4_1_body, _q4_1_finish))
q8_0_dot = intrinsic(_row_kernel(34, 1, [_ZERO8], _q8_0_body, _lanes_finish))
q5_0_dot = intrinsic(_row_kernel(22, 1, [_ZERO8], _q5_0_body, _lanes_finish))
q4_0_dot = intrinsic(_row_kernel(18, 1, [_ZERO8], _q4_0_body, _lanes_finish))
q6_k_dot = intrinsic(_row_kernel(210, 1, [_ZERO8], _q6_k_body, _lanes_finish, block_values=256))

# row r times ROW_TOKENS tokens (..._rows4) or one (..._rows1) of a batch: (w, r, xq, xd[, xs], t0, out)
q4_1_rows4, q4_1_rows1 = (_tokens_kernel(20, 2, [_ZERO8, _ZERO], _q4_1_body, _q4_1_finish, n) for n in (ROW_TOKENS, 1))
q8_0_rows4, q8_0_rows1 = (_tokens_kernel(34, 1, [_ZERO8], _q8_0_body, _lanes_finish, n) for n in (ROW_TOKENS, 1))
q5_0_rows4, q5_0_rows1 = (_tokens_kernel(22, 1, [_ZERO8], _q5_0_body, _lanes_finish, n) for n in (ROW_TOKENS, 1))
q4_0_rows4, q4_0_rows1 = (_tokens_kernel(18, 1, [_ZERO8], _q4_0_body, _lanes_finish, n) for n in (ROW_TOKENS, 1))
q6_k_rows4, q6_k_rows1 = (_tokens_kernel(210, 1, [_ZERO8], _q6_k_body, _lanes_finish, n, 256) for n in (ROW_TOKENS, 1))


def _row_sums8(builder, lanes):
    """8 rows' lane vectors -> one vector of the 8 rows' lane totals (exact integers). AVX2:
    the vphaddd transpose of ggml's repacked GEMV; else 8 reductions."""
    if AVX2:
        v8 = lanes[0].type
        hadd = _fn(builder, "llvm.x86.avx2.phadd.d", v8, [v8, v8])
        pairs = [builder.call(hadd, [lanes[i], lanes[i + 1]]) for i in range(0, 8, 2)]
        quads = [builder.call(hadd, [pairs[0], pairs[1]]), builder.call(hadd, [pairs[2], pairs[3]])]
        # quads: rows 0-3 (then 4-7) as [lanes 0-3 sums | lanes 4-7 sums]
        lo = builder.shuffle_vector(quads[0], quads[1], _mask([0, 1, 2, 3, 8, 9, 10, 11]))
        hi = builder.shuffle_vector(quads[0], quads[1], _mask([4, 5, 6, 7, 12, 13, 14, 15]))
        return builder.add(lo, hi)
    reduce = _fn(builder, "llvm.vector.reduce.add.v8i32", _i32, [lanes[0].type])
    total = ir.Constant(lanes[0].type, ir.Undefined)
    for i, lv in enumerate(lanes):
        total = builder.insert_element(total, builder.call(reduce, [lv]), ir.Constant(_i32, i))
    return total


def _q4_k_scales(builder, blk):
    """The 8 (scale, min) pairs of a Q4_K block, 6 bits each in bytes 4..15 (ggml's
    get_scale_min_k4), as i32 values."""
    b = [builder.zext(_load(builder, blk, _i8, 4 + i), _i32) for i in range(12)]
    c = lambda v: ir.Constant(_i32, v)  # noqa: E731
    pairs = []
    for j in range(8):
        if j < 4:
            pairs.append((builder.and_(b[j], c(63)), builder.and_(b[j + 4], c(63))))
        else:
            sc = builder.or_(builder.and_(b[j + 4], c(15)), builder.shl(builder.lshr(b[j - 4], c(6)), c(4)))
            mn = builder.or_(builder.lshr(b[j + 4], c(4)), builder.shl(builder.lshr(b[j], c(6)), c(4)))
            pairs.append((sc, mn))
    return pairs


def _halves8(builder, rows, offset):
    """The half float at `offset` of 8 blocks (one per row pointer) as a float32 vector."""
    bits = ir.Constant(_vec(_i16, 8), ir.Undefined)
    for k, row in enumerate(rows):
        bits = builder.insert_element(bits, _load(builder, row, _i16, offset), ir.Constant(_i32, k))
    return _halves_to_float(builder, bits)


def _q4_k_rows8(n_t, prefetch):
    """The typer of an intrinsic (w, r0, xq, xd, t0, out) writing Q4_K rows r0..r0+7 times
    tokens t0..t0+n_t-1 (xq int8 [T, K], xd float32 [T, K/32]) into out[t0:t0+n_t, r0:r0+8]:
    per 256-value block the exact integer sums isum = sum_g scale_g * dot_g and
    imin = sum_g min_g * (sum of 32-group g's activations), acc = fma(isum, d*dx, acc),
    accm = fma(imin, dmin*dx, accm); result acc - accm (ggml_gemv_q4_K_8x8_q8_K, the order
    llama.cpp multiplies one token by; every token of a batch too here: its gemm's order for a
    batch's tokens in fours would make a token's floats depend on its place in the batch)."""

    def typer(typingctx, w, r0, xq, xd, t0, out):
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in (w, xq, xd, out)):
            return None
        if xq.ndim != 2 or xd.ndim != 2 or out.ndim != 2:
            return None
        return types.none(w, r0, xq, xd, t0, out), codegen

    def codegen(context, builder, signature, args):
        wt, _, xqt, xdt, _, outt = signature.args
        warr = context.make_array(wt)(context, builder, args[0])
        row_bytes = builder.extract_value(warr.shape, 1)
        stride = builder.extract_value(warr.strides, 0)
        r0, t0 = args[1], args[4]
        rows = [builder.gep(warr.data, [builder.mul(builder.add(r0, ir.Constant(r0.type, k)), stride)]) for k in range(8)]
        xarr = context.make_array(xqt)(context, builder, args[2])
        darr = context.make_array(xdt)(context, builder, args[3])
        oarr = context.make_array(outt)(context, builder, args[5])
        k_vals = builder.extract_value(xarr.shape, 1)
        n_scales = builder.extract_value(darr.shape, 1)
        n_out = builder.extract_value(oarr.shape, 1)
        toks = [builder.add(t0, ir.Constant(t0.type, t)) for t in range(n_t)]
        yq = [builder.gep(builder.bitcast(xarr.data, _i8.as_pointer()), [builder.mul(tk, k_vals)]) for tk in toks]
        yd = [builder.gep(darr.data, [builder.mul(tk, n_scales)]) for tk in toks]
        n_blocks = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, 144))
        ones8 = ir.Constant(_vec(_i8, 32), [1] * 32)
        v32 = _vec(_i8, 32)
        f32x8 = _vec(_f32, 8)

        def rows_vector(values):  # 8 i32 scalars (one per row) -> <8 x i32>
            vec = ir.Constant(_vec(_i32, 8), ir.Undefined)
            for k, v in enumerate(values):
                vec = builder.insert_element(vec, v, ir.Constant(_i32, k))
            return vec

        def add_all(vals):
            return vals[0] if len(vals) == 1 else builder.add(add_all(vals[:-1]), vals[-1])

        def block(b, state):
            o = builder.mul(b, ir.Constant(b.type, 144))
            if prefetch:
                for row in rows:
                    _prefetch(builder, row, o, 144)
            blks = [builder.gep(row, [o]) for row in rows]
            pairs = [_q4_k_scales(builder, blk) for blk in blks]
            nibbles = []  # [row][chunk]: (low, high) nibbles of the chunk's 32 bytes
            for blk in blks:
                nib = []
                for c in range(4):
                    qs = _load(builder, blk, v32, 16 + 32 * c)
                    nib.append((builder.and_(qs, ir.Constant(v32, [15] * 32)), builder.lshr(qs, ir.Constant(v32, [4] * 32))))
                nibbles.append(nib)
            dh = _halves8(builder, blks, 0)
            dminh = _halves8(builder, blks, 2)
            new = []
            for t in range(n_t):
                y = builder.gep(yq[t], [builder.mul(b, ir.Constant(b.type, 256))])
                qy = [_load(builder, y, v32, 32 * g) for g in range(8)]
                bsum_vec = _row_sums8(builder, [_lanes_unsigned(builder, ones8, q) for q in qy])  # per 32-group
                bsum = [builder.extract_element(bsum_vec, ir.Constant(_i32, g)) for g in range(8)]
                row_lanes, row_mins = [], []
                for k in range(8):
                    pk, nk = pairs[k], nibbles[k]
                    lanes = [builder.add(_scaled_lanes(builder, nk[c][0], qy[2 * c], pk[2 * c][0], pk[2 * c][0], 0),
                                         _scaled_lanes(builder, nk[c][1], qy[2 * c + 1], pk[2 * c + 1][0], pk[2 * c + 1][0], 0))
                             for c in range(4)]
                    mins = [builder.add(builder.mul(pk[2 * c][1], bsum[2 * c]), builder.mul(pk[2 * c + 1][1], bsum[2 * c + 1]))
                            for c in range(4)]
                    row_lanes.append(add_all(lanes))
                    row_mins.append(add_all(mins))
                dx = _splat(builder, builder.load(builder.gep(yd[t], [builder.mul(b, ir.Constant(b.type, 8))])), 8)
                isums = builder.sitofp(_row_sums8(builder, row_lanes), f32x8)
                imins = builder.sitofp(rows_vector(row_mins), f32x8)
                new.append(_fma(builder, isums, builder.fmul(dh, dx), state[2 * t]))
                new.append(_fma(builder, imins, builder.fmul(dminh, dx), state[2 * t + 1]))
            return new

        state = _state_loop(builder, n_blocks, [_ZERO8] * (2 * n_t), block)
        for t in range(n_t):
            dst = builder.gep(oarr.data, [builder.add(builder.mul(toks[t], n_out), r0)])
            builder.store(builder.fsub(state[2 * t], state[2 * t + 1]), builder.bitcast(dst, f32x8.as_pointer()), align=4)
        return context.get_dummy_value()

    return typer


Q4_K_TOKENS = 2  # tokens per step of the Q4_K batch kernel
q4_k_dot8 = intrinsic(_q4_k_rows8(1, True))  # one token, prefetching 8 KiB ahead
q4_k_gemm8 = intrinsic(_q4_k_rows8(Q4_K_TOKENS, False))  # Q4_K_TOKENS tokens of a batch


def _f16_dot_typer(typingctx, w, r, x):
    """(w uint8 [rows, 2*K] of IEEE halves, r, x float32 [K] already rounded to half) ->
    float32: ggml's AVX2 ggml_vec_dot_f16 over the first K - K % 32 values: 4 accumulators of 8
    lanes, fma per 32-value step; reduced (a0+a2) + (a1+a3), then its 128-bit halves added and
    two horizontal adds. (The K % 32 leftovers are the caller's, in double as ggml's.)"""
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in (w, x)):
        return None

    def codegen(context, builder, signature, args):
        wt, _, xt = signature.args
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

    return types.float32(w, r, x), codegen


f16_dot = intrinsic(_f16_dot_typer)


def _f16_tokens(n_t):
    """The batch form of f16_dot: (w, r, x [T, K] float32 already rounded to half, t0, out
    [T, rows]) writes f16_dot(w, r, x[t]) into out[t, r] for the n_t tokens t0.. (each token the
    one-token floats; the row's halves converted once for all of them)."""

    def typer(typingctx, w, r, x, t0, out):
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in (w, x, out)) or x.ndim != 2 or out.ndim != 2:
            return None
        return types.none(w, r, x, t0, out), codegen

    def codegen(context, builder, signature, args):
        wt, _, xt, _, outt = signature.args
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


f16_rows4 = intrinsic(_f16_tokens(ROW_TOKENS))
f16_rows1 = intrinsic(_f16_tokens(1))


def _fmaf_typer(typingctx, a, b, c):
    """float32 a*b + c with one rounding (llvm.fma.f32: vfmadd on FMA CPUs, a libm call
    elsewhere), which LLVM vectorizes inside loops."""
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        return _fma(builder, *args)

    return types.float32(a, b, c), codegen


fmaf = intrinsic(_fmaf_typer)


# --- Q4_0 in llama.cpp's repacked order, on an interleaved copy of 8 rows ---------------------
#
# On an AVX2 CPU llama.cpp repacks every Q4_0 matrix whose rows are a multiple of 8 at load
# (block_q4_0x8) and multiplies it by ggml_gemv_q4_0_8x8_q8_0 / ggml_gemm_q4_0_8x8_q8_0: per
# (row, token) and 32-value block the exact integer sum of the 32 products, then one fma chain
# acc = fma(sum, d*dx, acc). Any layout gives those floats (the sums are exact); the one below
# makes them cheap. Each group of 8 rows is stored block by block, 144 bytes per block:
#   bytes 0-15    the 8 rows' scales d (half floats), row order
#   bytes 16-47   rows 0, 1, 4, 5: quant bytes 0-7 of each (8 bytes per row)
#   bytes 48-79   rows 0, 1, 4, 5: quant bytes 8-15
#   bytes 80-111  rows 2, 3, 6, 7: quant bytes 0-7
#   bytes 112-143 rows 2, 3, 6, 7: quant bytes 8-15
# A quant byte j holds value j (low nibble) and value j + 16 (high nibble), so each 32-byte
# vector's low nibbles meet one 8-byte piece of the activations broadcast 4 times, its high
# nibbles another: 4 vpmaddubsw per 4 rows, summed as int16 (|sum| <= 4*2*15*128, no
# saturation), one vpmaddwd to 2 int32 lanes per row, and one vphaddd of the two 4-row halves
# gives the 8 rows' sums in row order (the row order above is what makes it so). Against the
# file's layout (8 separate rows: a vpmaddwd per row and three vphaddd transposes) the batch
# product is 1.8x faster. sum((q - 8) * y) = sum(q * y) - 8 * sum(y): the callers pass 8*sum(y)
# per block (ysum8).
Q4_0X8_ROWS_LO = (0, 1, 4, 5)
Q4_0X8_ROWS_HI = (2, 3, 6, 7)
Q4_0X8_BLOCK = 144


def _state_loop(builder, count, init, body):
    """for b in range(count): state = body(b, state), the state held in phi nodes (registers;
    an alloca'd accumulator inside a parallel loop's body stays a stack slot). Returns the
    final state."""
    start = builder.basic_block
    cond = builder.append_basic_block("state.cond")
    loop = builder.append_basic_block("state.body")
    end = builder.append_basic_block("state.end")
    builder.branch(cond)
    builder.position_at_end(cond)
    index = builder.phi(count.type)
    state = [builder.phi(v.type) for v in init]
    builder.cbranch(builder.icmp_signed("<", index, count), loop, end)
    builder.position_at_end(loop)
    new = body(index, list(state))
    following = builder.add(index, ir.Constant(index.type, 1))
    last = builder.basic_block
    builder.branch(cond)
    index.add_incoming(ir.Constant(index.type, 0), start)
    index.add_incoming(following, last)
    for phi, v0, v1 in zip(state, init, new):
        phi.add_incoming(v0, start)
        phi.add_incoming(v1, last)
    builder.position_at_end(end)
    return state


def _broadcast8(builder, y, offset):
    """The 8 int8 activations at y + offset, repeated 4 times (vpbroadcastq)."""
    v = builder.insert_element(ir.Constant(_vec(_i64, 4), ir.Undefined), _load(builder, y, _i64, offset), ir.Constant(_i32, 0))
    return builder.bitcast(builder.shuffle_vector(v, v, _mask([0, 0, 0, 0])), _vec(_i8, 32))


def _quad_lanes(builder, qs, ys):
    """4 rows x 8 unsigned quants per vector (qs) times the matching broadcast activations (ys),
    the 4 products summed -> <8 x i32>, two lanes per row (exact)."""
    if AVX2:
        v16 = _vec(_i16, 16)
        mad = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [qs[0].type, ys[0].type])
        pairs = builder.call(mad, [qs[0], ys[0]])
        for q, y in zip(qs[1:], ys[1:]):
            pairs = builder.add(pairs, builder.call(mad, [q, y]))
        return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.wd", _vec(_i32, 8), [v16, v16]), [pairs, ir.Constant(v16, [1] * 16)])
    v32 = _vec(_i32, 32)
    prod = None
    for q, y in zip(qs, ys):
        p = builder.mul(builder.zext(q, v32), builder.sext(y, v32))
        prod = p if prod is None else builder.add(prod, p)
    lanes = builder.shuffle_vector(prod, prod, _mask(range(0, 32, 4)))
    for k in range(1, 4):
        lanes = builder.add(lanes, builder.shuffle_vector(prod, prod, _mask(range(k, 32, 4))))
    return lanes


def _pair_add(builder, lo, hi):
    """vphaddd's order: [lo0+lo1, lo2+lo3, hi0+hi1, hi2+hi3 | lo4+lo5, lo6+lo7, hi4+hi5, hi6+hi7]
    (int32 lanes; float lanes by the same shuffles, each sum one IEEE addition)."""
    is_float = lo.type.element == _f32
    if AVX2 and not is_float:
        v8 = lo.type
        return builder.call(_fn(builder, "llvm.x86.avx2.phadd.d", v8, [v8, v8]), [lo, hi])
    even = builder.shuffle_vector(lo, hi, _mask([0, 2, 8, 10, 4, 6, 12, 14]))
    odd = builder.shuffle_vector(lo, hi, _mask([1, 3, 9, 11, 5, 7, 13, 15]))
    return builder.fadd(even, odd) if is_float else builder.add(even, odd)


def _q4_0x8(n_t, prefetch):
    """The typer of an interleaved-Q4_0 kernel (w, r0, xq, xd, ysum8, t0, out): rows r0..r0+7
    (r0 a multiple of 8; w uint8 [rows, row bytes], C-contiguous, each 8 rows' bytes in the
    layout above) times tokens t0..t0+n_t-1 (xq int8 [T, K], xd float32 [T, K/32], ysum8 int32
    [T, K/32]: 8 * each block's sum of activations) into out[t0:t0+n_t, r0:r0+8] (float32
    [T, rows])."""

    def typer(typingctx, w, r0, xq, xd, ysum8, t0, out):
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in (w, xq, xd, ysum8, out)):
            return None

        def codegen(context, builder, signature, args):
            wt, _, xqt, xdt, yst, _, outt = signature.args
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
                o = builder.mul(b, ir.Constant(b.type, Q4_0X8_BLOCK))
                if prefetch:  # one token: the weights stream from DRAM
                    _prefetch(builder, group, o, Q4_0X8_BLOCK)
                d = _halves_to_float(builder, _load(builder, group, _vec(_i16, 8), o))
                raw = [_load(builder, group, v32, builder.add(o, ir.Constant(o.type, 16 + 32 * i))) for i in range(4)]
                lo = [builder.and_(v, ir.Constant(v32, [15] * 32)) for v in raw]
                hi = [builder.lshr(v, ir.Constant(v32, [4] * 32)) for v in raw]
                y0 = builder.mul(b, ir.Constant(b.type, 32))
                new = []
                for t in range(n_t):
                    bc = [_broadcast8(builder, yq[t], builder.add(y0, ir.Constant(y0.type, 8 * j))) for j in range(4)]
                    sums = _pair_add(builder, _quad_lanes(builder, [lo[0], lo[1], hi[0], hi[1]], bc),
                                     _quad_lanes(builder, [lo[2], lo[3], hi[2], hi[3]], bc))
                    sums = builder.sub(sums, _splat(builder, builder.load(builder.gep(ys[t], [b])), 8))
                    dd = builder.fmul(d, _splat(builder, builder.load(builder.gep(yd[t], [b])), 8))
                    new.append(_fma(builder, builder.sitofp(sums, _vec(_f32, 8)), dd, accs[t]))
                return new

            accs = _state_loop(builder, nb, [_ZERO8] * n_t, block)
            for t in range(n_t):
                dst = builder.gep(oarr.data, [builder.add(builder.mul(toks[t], n_out), r0)])
                builder.store(accs[t], builder.bitcast(dst, _vec(_f32, 8).as_pointer()), align=4)
            return context.get_dummy_value()

        return types.none(w, r0, xq, xd, ysum8, t0, out), codegen

    return typer


q4_0x8_gemm = intrinsic(_q4_0x8(4, False))  # 4 tokens (a batch; the 8 rows' bytes stay in cache)
q4_0x8_gemv = intrinsic(_q4_0x8(1, True))  # 1 token, prefetching 8 KiB ahead


# --- Q4_1, interleaved 8 rows at a time, in vec_dot's lane order ------------------------------
#
# llama.cpp does not repack Q4_1; its vec_dot_q4_1_q8_1 keeps 8 float lanes per row (lane l: the
# integer sum of values 4l..4l+3 times the activations, acc_l = fma(d*dx, lane, acc_l) over
# blocks), a scalar chain summs = fma(m, s, summs), and ends with hsum_float_8(acc) + summs.
# Every step is per lane, so the lanes may be computed for 4 rows at a time: in the layout of
# the Q4_0 copy (4 rows x 8 quant bytes per vector) one vpmaddubsw + vpmaddwd against one
# broadcast 8-byte piece of the activations yields lanes 2c, 2c+1 of 4 rows; 4 such vectors per
# 4 rows are all 8 lanes, fma'd into 4 accumulators (8 for 8 rows), and the same additions as
# hsum_float_8 finish the 8 rows at once. Per 8 rows and block (160 bytes): the 8 scales d, the
# 8 minimums m (half floats), the 128 quant bytes. One token, 1536x576 in cache: 29 -> 14 us.
# (Q5_0 the same way, its fifth bits spread per vector, was only 1.5x faster and slowed the
# prompt path's dequantization 3x: not worth it.)
Q4_1X8_BLOCK = 160


def _q4_1x8(n_t, prefetch):
    """The typer of an interleaved-Q4_1 kernel (w, r0, xq, xd, xs, t0, out): rows r0..r0+7 (r0 a
    multiple of 8) times tokens t0..t0+n_t-1 (xq int8 [T, K], xd/xs float32 [T, K/32]: their
    Q8_1 activations) into out[t0:t0+n_t, r0:r0+8] (float32 [T, rows]). Each (row, token) is
    vec_dot_q4_1_q8_1's lanes and order, whatever n_t."""

    def typer(typingctx, w, r0, xq, xd, xs, t0, out):
        if not all(isinstance(a, types.Array) and a.layout == "C" and (a is w or a.ndim == 2) for a in (w, xq, xd, xs, out)):
            return None
        return types.none(w, r0, xq, xd, xs, t0, out), codegen

    def codegen(context, builder, signature, args):
        wt, _, xqt, xdt, xst, _, outt = signature.args
        warr = context.make_array(wt)(context, builder, args[0])
        r0, t0 = args[1], args[5]
        group = builder.gep(warr.data, [builder.mul(r0, builder.extract_value(warr.strides, 0))])
        row_bytes = builder.extract_value(warr.shape, 1)
        nb = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, 20))
        xarr = context.make_array(xqt)(context, builder, args[2])
        k_vals = builder.extract_value(xarr.shape, 1)
        oarr = context.make_array(outt)(context, builder, args[6])
        n_out = builder.extract_value(oarr.shape, 1)
        toks = [builder.add(t0, ir.Constant(t0.type, t)) for t in range(n_t)]
        yq = [builder.gep(builder.bitcast(xarr.data, _i8.as_pointer()), [builder.mul(tk, k_vals)]) for tk in toks]
        yd = [builder.gep(context.make_array(xdt)(context, builder, args[3]).data, [builder.mul(tk, nb)]) for tk in toks]
        ys = [builder.gep(context.make_array(xst)(context, builder, args[4]).data, [builder.mul(tk, nb)]) for tk in toks]
        v32, f32x8 = _vec(_i8, 32), _vec(_f32, 8)

        def block(b, state):
            o = builder.mul(b, ir.Constant(b.type, Q4_1X8_BLOCK))
            if prefetch:  # one token: the weights stream from DRAM
                _prefetch(builder, group, o, Q4_1X8_BLOCK)
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
            dst = builder.gep(oarr.data, [builder.add(builder.mul(toks[t], n_out), r0)])
            builder.store(total, builder.bitcast(dst, f32x8.as_pointer()), align=4)
        return context.get_dummy_value()

    return typer


Q4_1X8_TOKENS = 2  # tokens per step of the batch kernel (9 vector accumulators per token)
q4_1x8_gemm = intrinsic(_q4_1x8(Q4_1X8_TOKENS, False))  # a batch's tokens, Q4_1X8_TOKENS at a time
q4_1x8_gemv = intrinsic(_q4_1x8(1, True))  # one token, prefetching 8 KiB ahead
