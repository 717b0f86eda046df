"""The shared building blocks of the block formats' dot products, as LLVM vector IR (numba
`@intrinsic`): ggml's AVX2 idioms, which each format module (runtime.quants.<format>) puts
together into its kernels.

What LLVM's auto-vectorizer makes of numba loops is not what llama.cpp's hand-written kernels
do: per 32-value block the quants are unpacked into one 32-byte vector, multiplied with the
int8 activations by `vpmaddubsw` (unsigned x signed bytes, adjacent pairs summed to int16),
the pairs summed to 8 int32 lanes by `vpmaddwd`, the lanes converted to float and
fused-multiply-added into an 8-lane accumulator. Emitting that IR ourselves gives the same
instructions, and - because the same lanes are summed in the same order - the same floats as
llama.cpp, bit for bit.

The instruction set is a parameter: every kernel takes an `Isa` (inside the kernels' context
argument, runtime.quants.matmul.kernel_context), "avx512vnni" (the AVX2 set plus AVX-512 F/BW/VL/VNNI:
vpdpbusd sums the byte products straight to int32 lanes, as ggml does on such CPUs), "avx2"
(AVX2, FMA and F16C: ggml's instructions) or "portable" (generic vector IR: int32 products summed 4 by 4, halves converted by integer
arithmetic; the same integer lane sums, the same floats, only slower). Its numba type names it,
so each instruction set compiles - and is cached - as its own specialization: nothing compiled
for one is ever run as the other. HOST_ISA is what this CPU gets, detected once; tests force
each.

Pieces:
  _load, _half, _halves_to_float, _splat, _nibbles   reading bytes, half floats, nibbles
  _lanes_unsigned / _lanes_signed / _scaled_lanes    8 int32 lanes of byte products
  _hsum8, _fma, _lane_accumulate, _pair_add          ggml's float reductions and fma steps
  _prefetch                                          asking for the bytes 16 KiB ahead, into L2
  _state_loop                                        a loop whose state lives in registers
  row_kernels(block_bytes, ...)                      a format's one-row kernel and its batch
                                                     forms from one per-block body
  _broadcast8, _quad_lanes                           the 8-row interleaved kernels' steps
  fmaf(a, b, c)                                      float32 fused multiply-add (llvm.fma.f32)
  Isa, HOST_ISA, host_isas, isa_typer                the instruction set parameter
"""

from __future__ import annotations

import functools
import os

from llvmlite import ir
import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.core.imputils import lower_constant
from numba.extending import NativeValue, intrinsic, models, register_model, typeof_impl, unbox


class Isa:
    """An instruction set the kernels emit their IR for: "avx512vnni", "avx2" or "portable"."""

    __slots__ = ("name", "_numba_type_")
    NAMES = ("avx512vnni", "avx2", "portable")

    def __init__(self, name: str):
        if name not in self.NAMES:
            raise ValueError(f"unknown instruction set {name!r}; choose one of: {', '.join(self.NAMES)}")
        self.name = name
        # numba's dispatcher takes the type of an argument it cannot fingerprint from here;
        # without it, every call that passes an Isa has it typed by Python code
        self._numba_type_ = IsaType(name)

    def __repr__(self) -> str:
        return f"Isa({self.name!r})"


class IsaType(types.Dummy):
    """numba's type of an Isa: one type per instruction set, so a kernel's signature (and its
    cache entry) says which one it was compiled for."""

    def __init__(self, name: str):
        self.isa = name
        super().__init__(name=f"Isa({name})")


def register_constant_type(cls, numba_type) -> None:
    """Make instances of cls (each carrying its numba type, a types.Dummy subclass numba_type,
    in `_numba_type_`) values numba passes as arguments or reads from globals: their type
    is all a kernel needs of them (an Isa, a KernelSet, a FormatKernels), so they hold no data."""
    typeof_impl.register(cls)(lambda val, c: val._numba_type_)
    register_model(numba_type)(models.OpaqueModel)
    unbox(numba_type)(lambda typ, obj, c: NativeValue(c.context.get_dummy_value()))
    lower_constant(numba_type)(lambda context, builder, ty, pyval: context.get_dummy_value())


register_constant_type(Isa, IsaType)


def host_isas() -> tuple[str, ...]:
    """The instruction sets this CPU can run, best first ("portable" always)."""
    if os.environ.get("NUMBA_CPU_NAME", "host") != "host":  # code for another CPU than this one:
        return ("portable",)  # x86 intrinsics might not exist there
    try:
        from llvmlite import binding

        features = binding.get_host_cpu_features()
    except Exception:  # noqa: BLE001 - no feature query: the portable IR is always correct
        return ("portable",)
    if not all(features.get(f) for f in ("avx2", "fma", "f16c")):
        return ("portable",)
    if all(features.get(f) for f in ("avx512f", "avx512bw", "avx512vl", "avx512vnni")):
        return ("avx512vnni", "avx2", "portable")
    return ("avx2", "portable")


HOST_ISA = Isa(host_isas()[0])

# the instruction set the IR being emitted is for (set by isa_typer's codegen from the signature)
_EMITTING = ["portable"]


def _avx2() -> bool:
    """AVX2, FMA and F16C instructions may be emitted (avx512vnni includes them)."""
    return _EMITTING[0] in ("avx2", "avx512vnni")


def c_arrays(*arrays, ndim=None) -> bool:
    """An intrinsic typer's check: every argument a C-contiguous numba array (of ndim
    dimensions, if given)."""
    return all(isinstance(a, types.Array) and a.layout == "C" and (ndim is None or a.ndim == ndim) for a in arrays)


def array_args(context, builder, signature, args) -> list:
    """An intrinsic codegen's arguments, each array as its llvm struct (context.make_array:
    .data, .shape, .strides), the others as they are."""
    return [context.make_array(t)(context, builder, a) if isinstance(t, types.Array) else a
            for t, a in zip(signature.args, args)]


def row_at(builder, arr, r):
    """The address of row r of a C-contiguous 2-D array (an array_args struct): its data plus r
    rows (r * shape[1] elements; an int8 or uint8 array's data is an i8*)."""
    return builder.gep(arr.data, [builder.mul(r, builder.extract_value(arr.shape, 1))])


def offsets(builder, first, n):
    """The IR integers first, first + 1, ..., first + n - 1 (a kernel's rows or tokens)."""
    return [builder.add(first, ir.Constant(first.type, i)) for i in range(n)]


def _vnni() -> bool:
    """AVX-512 VNNI (vpdpbusd, on 256-bit vectors with AVX-512VL) may be emitted too."""
    return _EMITTING[0] == "avx512vnni"


def isa_typer(typer):
    """An intrinsic's typer whose last argument is an Isa: refuses other types there, and its
    codegen emits the IR for the instruction set the signature names."""

    @functools.wraps(typer)  # (numba reads the typer's named arguments through __wrapped__)
    def checked(typingctx, *args):
        if not isinstance(args[-1], IsaType):
            return None
        got = typer(typingctx, *args)
        if got is None:
            return None
        sig, codegen = got

        def emit(context, builder, signature, cargs):
            before = _EMITTING[0]
            _EMITTING[0] = signature.args[-1].isa
            try:
                return codegen(context, builder, signature, cargs)
            finally:
                _EMITTING[0] = before

        return sig, emit

    return checked


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
    if _avx2():  # vcvtph2ps (without F16C LLVM lowers the fpext to a library call the JIT cannot resolve)
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


# Decode reads every weight once per token, from DRAM (a layer is larger than the L3 cache):
# the one-token kernels ask for the bytes PREFETCH_AHEAD ahead of the block being summed (the
# same matrix's next rows), which the hardware prefetcher alone does not keep up with, into L2
# only (prefetcht1, PREFETCH_LOCALITY 2). Hints into L1 (prefetcht0) hold the core's few L1
# fill buffers until DRAM answers, which then caps a thread's stream below what the memory
# gives it (Q4_0's 8-row kernel streamed about 20% slower with them, 8 KiB ahead, on one thread
# and on two); Q4_K's and Q6_K's kernels take the same hints.
PREFETCH_AHEAD, PREFETCH_LOCALITY = 16384, 2


def _prefetch(builder, ptr, offset, nbytes, ahead=PREFETCH_AHEAD, locality=PREFETCH_LOCALITY):
    """Prefetch the nbytes at ptr + offset + ahead, one hint per 64-byte line (locality: LLVM's,
    3 = prefetcht0 into L1, 2 = prefetcht1, 1 = prefetcht2 into L2 only)."""
    fn = _fn(builder, "llvm.prefetch.p0i8", ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32])
    for line in range(0, nbytes, 64):
        addr = builder.gep(ptr, [builder.add(offset, ir.Constant(offset.type, ahead + line))])
        builder.call(fn, [addr, ir.Constant(_i32, 0), ir.Constant(_i32, locality), ir.Constant(_i32, 1)])


def _splat(builder, x, n):
    v = builder.insert_element(ir.Constant(_vec(x.type, n), ir.Undefined), x, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(_vec(x.type, n), ir.Undefined), _mask([0] * n))


def _nibbles(builder, qs):
    """16 quant bytes -> 32 bytes: the low nibbles (values 0-15), then the high ones (16-31):
    ggml's bytes_from_nibbles_32."""
    lo = builder.and_(qs, ir.Constant(_vec(_i8, 16), [15] * 16))
    hi = builder.lshr(qs, ir.Constant(_vec(_i8, 16), [4] * 16))
    return builder.shuffle_vector(lo, hi, _mask(range(32)))


def _dpbusd(builder, acc, qx, qy):
    """acc + the int32 lanes of qx (unsigned bytes) times qy (signed bytes), 4 products per
    lane (vpdpbusd; 256-bit: <8 x i32> acc, <32 x i8> qx and qy; 512-bit: twice that). Exact:
    no int16 step to saturate, so the lanes equal vpmaddubsw + vpmaddwd's wherever those do not
    saturate (ggml's own VNNI paths make the same substitution)."""
    n = acc.type.count
    vi = _vec(_i32, n)
    fn = _fn(builder, f"llvm.x86.avx512.vpdpbusd.{32 * n}", vi, [vi, vi, vi])
    return builder.call(fn, [acc, builder.bitcast(qx, vi), builder.bitcast(qy, vi)])


def _pairs_us(builder, q, y):
    """<32 x i8> q (unsigned, each < 128) times y (signed) -> <16 x i16>, word i = q[2i]*y[2i] +
    q[2i+1]*y[2i+1] (vpmaddubsw; exact, as |sum| <= 2*127*128 does not saturate)."""
    v16 = _vec(_i16, 16)
    if _avx2():
        return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [q.type, y.type]), [q, y])
    prod = builder.mul(builder.zext(q, _vec(_i16, 32)), builder.sext(y, _vec(_i16, 32)))
    return builder.add(builder.shuffle_vector(prod, prod, _mask(range(0, 32, 2))),
                       builder.shuffle_vector(prod, prod, _mask(range(1, 32, 2))))


def _scaled_pairs_acc(builder, acc, pairs, scales):
    """acc (<8 x i32>, or None: zero) + lane l = pairs[2l]*scales[2l] + pairs[2l+1]*scales[2l+1]
    (<16 x i16> each; exact): vpdpwssd with VNNI (one instruction for vpmaddwd and the add),
    vpmaddwd and vpaddd with AVX2."""
    v16, v8 = _vec(_i16, 16), _vec(_i32, 8)
    if _vnni() and acc is not None:
        fn = _fn(builder, "llvm.x86.avx512.vpdpwssd.256", v8, [v8, v8, v8])
        return builder.call(fn, [acc, builder.bitcast(pairs, v8), builder.bitcast(scales, v8)])
    if _avx2():
        part = builder.call(_fn(builder, "llvm.x86.avx2.pmadd.wd", v8, [v16, v16]), [pairs, scales])
    else:
        v32 = _vec(_i32, 16)
        prod = builder.mul(builder.sext(pairs, v32), builder.sext(scales, v32))
        part = builder.add(builder.shuffle_vector(prod, prod, _mask(range(0, 16, 2))),
                           builder.shuffle_vector(prod, prod, _mask(range(1, 16, 2))))
    return part if acc is None else builder.add(acc, part)


def _lanes_unsigned(builder, qx, qy):
    """8 int32 lanes, lane l = sum of qx[4l+k]*qy[4l+k] (k < 4), qx unsigned bytes, qy signed:
    ggml's mul_sum_us8_pairs (vpmaddubsw, then vpmaddwd against ones; one vpdpbusd with VNNI)."""
    if _vnni():
        return _dpbusd(builder, ir.Constant(_vec(_i32, 8), [0] * 8), qx, qy)
    if _avx2():
        v16 = _vec(_i16, 16)
        pairs = builder.call(_fn(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [qx.type, qy.type]), [qx, qy])
        ones = ir.Constant(v16, [1] * 16)
        return builder.call(_fn(builder, "llvm.x86.avx2.pmadd.wd", _vec(_i32, 8), [v16, v16]), [ones, pairs])
    return _lanes_portable(builder, builder.zext(qx, _vec(_i32, 32)), builder.sext(qy, _vec(_i32, 32)))


def _lanes_signed(builder, qx, qy):
    """The same lanes for signed qx: ggml's mul_sum_i8_pairs (|qx| times qy carrying qx's sign)."""
    if _avx2():
        v32 = qx.type
        sign = _fn(builder, "llvm.x86.avx2.psign.b", v32, [v32, v32])
        return _lanes_unsigned(builder, builder.call(sign, [qx, qx]), builder.call(sign, [qy, qx]))
    return _lanes_portable(builder, builder.sext(qx, _vec(_i32, 32)), builder.sext(qy, _vec(_i32, 32)))


def _lanes_portable(builder, x32, y32):
    prod = builder.mul(x32, y32)
    n = x32.type.count
    lanes = builder.shuffle_vector(prod, prod, _mask(range(0, n, 4)))
    for k in range(1, 4):
        lanes = builder.add(lanes, builder.shuffle_vector(prod, prod, _mask(range(k, n, 4))))
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


def _row_kernel(block_bytes, n_act, init, body, finish, block_values=32, prefetch=(PREFETCH_AHEAD, PREFETCH_LOCALITY),
                d_at=None, per_value=()):
    """An intrinsic (w, r, xq, xd[, xs], isa) -> float32 looping over row r's blocks. The state (a
    list of accumulators) starts as `init`; body(builder, blk, y, scales, state) gets the
    block's byte pointer, a pointer to its block_values int8 activations and the n_act
    activation scales of the block's first 32 values, and returns the new state;
    finish(builder, state) gives the row's result. prefetch: _prefetch's (ahead, locality).
    d_at: the byte offset of the block's half-float scale d, if scales[0] is to be d times the
    activations' first scale (`_block_scales`). per_value: for each further array argument
    (after the scales, before isa; C-contiguous, laid out along the activations, e.g. Q6_K's
    offsets32), its bytes per activation value; body then gets, after state, a byte pointer to
    each one's part for the block. (n_act + len(per_value) arrays after xq: 1 or 2.)"""

    def make_sig(w, r, xq, *act_isa):
        arrays = (w, xq, *act_isa[:-1])
        if not c_arrays(*arrays):
            return None  # the IR reads rows and activations as contiguous memory
        return types.float32(w, r, xq, *act_isa)

    def codegen(context, builder, signature, args):
        warr, r, xarr, *act_arrs, _ = array_args(context, builder, signature, args)
        row_bytes = builder.extract_value(warr.shape, 1)
        row = row_at(builder, warr, r)
        yq = builder.bitcast(xarr.data, _i8.as_pointer())
        scale_ptrs = [a.data for a in act_arrs[:n_act]]
        value_ptrs = [builder.bitcast(a.data, _i8.as_pointer()) for a in act_arrs[n_act:]]
        n_blocks = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, block_bytes))
        slots = [cgutils.alloca_once_value(builder, v) for v in init]
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            o = builder.mul(b, ir.Constant(b.type, block_bytes))
            _prefetch(builder, row, o, block_bytes, *prefetch)
            blk = builder.gep(row, [o])
            y = builder.gep(yq, [builder.mul(b, ir.Constant(b.type, block_values))])
            scale_at = builder.mul(b, ir.Constant(b.type, block_values // 32))
            scales = [builder.load(builder.gep(p, [scale_at])) for p in scale_ptrs]
            scales[0] = _block_scales(builder, blk, d_at, scales[0])
            parts = [builder.gep(p, [builder.mul(b, ir.Constant(b.type, block_values * n))]) for p, n in zip(value_ptrs, per_value)]
            state = body(builder, blk, y, scales, [builder.load(s) for s in slots], *parts)
            for s, v in zip(slots, state):
                builder.store(v, s)
        return finish(builder, [builder.load(s) for s in slots])

    if n_act + len(per_value) == 1:  # (numba's intrinsics take no *args)
        def typer(typingctx, w, r, xq, xd, isa):
            return make_sig(w, r, xq, xd, isa), codegen
    else:
        def typer(typingctx, w, r, xq, xd, xs, isa):
            return make_sig(w, r, xq, xd, xs, isa), codegen
    return isa_typer(typer)


def _block_scales(builder, blk, d_at, yd):
    """d * yd, d the block's half-float scale at byte d_at, yd a token's activation scale or
    several tokens' (<n x float>; one vmulps where each token would take a vmulss); yd itself if
    d_at is None. (Each product is the same IEEE multiplication either way.)"""
    if d_at is None:
        return yd
    d = _half(builder, blk, d_at)
    return builder.fmul(_splat(builder, d, yd.type.count) if isinstance(yd.type, ir.VectorType) else d, yd)


_ZERO8 = ir.Constant(_vec(_f32, 8), [0.0] * 8)
_ZERO = ir.Constant(_f32, 0.0)


def _lane_accumulate(builder, d, lanes, acc):
    """acc = fma(d, float(lanes), acc) on all 8 lanes (ggml: _mm256_fmadd_ps(d, q, acc))."""
    return _fma(builder, _splat(builder, d, 8), builder.sitofp(lanes, _vec(_f32, 8)), acc)


def _lanes_finish(builder, state):
    return _hsum8(builder, state[0])



def _scaled_lanes(builder, q, qy, sc_lo, sc_hi, bias):
    """8 int32 lanes of sum(sc * (q - bias) * y) over 4-byte groups, q unsigned bytes (0-63),
    the first 16 bytes scaled by sc_lo, the last 16 by sc_hi (i32 values). AVX2: ggml's
    vpmaddubsw(q, y) - vpmaddubsw(bias, y), then vpmaddwd against the int16 scales."""
    v16 = _vec(_i16, 16)
    if _avx2():
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


def _quad_lanes(builder, qs, ys, dpbusd: bool = True):
    """4 rows x 8 unsigned quants per vector (qs) times the matching broadcast activations (ys),
    the 4 products summed -> <8 x i32>, two lanes per row (exact). dpbusd=False keeps the AVX2
    instructions under VNNI too (one token: the vpdpbusd chains made Q4_0 decode slower)."""
    if _vnni() and dpbusd:  # two chains of two (four dependent vpdpbusd measured slower than vpmaddubsw)
        zero = ir.Constant(_vec(_i32, 8), [0] * 8)
        a = _dpbusd(builder, _dpbusd(builder, zero, qs[0], ys[0]), qs[1], ys[1])
        b = _dpbusd(builder, _dpbusd(builder, zero, qs[2], ys[2]), qs[3], ys[3])
        return builder.add(a, b)
    if _avx2():
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
    if _avx2() and not is_float:
        v8 = lo.type
        return builder.call(_fn(builder, "llvm.x86.avx2.phadd.d", v8, [v8, v8]), [lo, hi])
    even = builder.shuffle_vector(lo, hi, _mask([0, 2, 8, 10, 4, 6, 12, 14]))
    odd = builder.shuffle_vector(lo, hi, _mask([1, 3, 9, 11, 5, 7, 13, 15]))
    return builder.fadd(even, odd) if is_float else builder.add(even, odd)



def _tokens_kernel(block_bytes, n_act, init, body, finish, block_values=32, d_at=None):
    """The batch form of a `_row_kernel`: an intrinsic (w, r, xq, xd[, xs], out, isa) writing row r
    times every token t of the batch into out[t, r] (xq int8 [T, K], xd/xs float32 [T, K/32],
    out float32 [T, rows], all C-contiguous), ROW_TOKENS tokens per pass over the row, the
    leftover tokens one per pass. Each token's state goes through the same body and finish as
    the one-token kernel (the same floats, bit for bit); a block's bytes are loaded and
    unpacked once for all the tokens of a pass (LLVM merges the repeated loads); with d_at, the
    pass's products d * d_y in one vector multiply (`_block_scales`)."""

    def make_sig(w, r, xq, act, out, isa):
        if not c_arrays(w, xq, *act, out):
            return None
        if xq.ndim != 2 or out.ndim != 2 or any(a.ndim != 2 for a in act):
            return None
        return types.none(w, r, xq, *act, out, isa)

    def codegen(context, builder, signature, args):
        warr, r, xarr, *act_arrs, oarr, _ = array_args(context, builder, signature, args)
        row_bytes = builder.extract_value(warr.shape, 1)
        row = row_at(builder, warr, r)
        n_tok = builder.extract_value(xarr.shape, 0)
        n_blocks = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, block_bytes))
        n_state = len(init)

        def tokens(t0, n_t):  # row r times tokens t0..t0+n_t-1
            toks = offsets(builder, t0, n_t)
            yq = [row_at(builder, xarr, tk) for tk in toks]
            scale_rows = [[row_at(builder, a, tk) for a in act_arrs] for tk in toks]

            def block(b, state):
                o = builder.mul(b, ir.Constant(b.type, block_bytes))
                blk = builder.gep(row, [o])
                yo = builder.mul(b, ir.Constant(b.type, block_values))
                scale_at = builder.mul(b, ir.Constant(b.type, block_values // 32))
                loaded = [[builder.load(builder.gep(p, [scale_at])) for p in scale_rows[t]] for t in range(n_t)]
                if d_at is not None and n_t > 1:  # the tokens' first scales in one vector
                    yd = ir.Constant(_vec(_f32, n_t), ir.Undefined)
                    for t in range(n_t):
                        yd = builder.insert_element(yd, loaded[t][0], ir.Constant(_i32, t))
                    yd = _block_scales(builder, blk, d_at, yd)
                    for t in range(n_t):
                        loaded[t][0] = builder.extract_element(yd, ir.Constant(_i32, t))
                else:
                    for t in range(n_t):
                        loaded[t][0] = _block_scales(builder, blk, d_at, loaded[t][0])
                new = []
                for t in range(n_t):
                    scales = loaded[t]
                    new += body(builder, blk, builder.gep(yq[t], [yo]), scales, state[n_state * t:n_state * (t + 1)])
                return new

            state = _state_loop(builder, n_blocks, list(init) * n_t, block)
            for t in range(n_t):
                builder.store(finish(builder, state[n_state * t:n_state * (t + 1)]), builder.gep(row_at(builder, oarr, toks[t]), [r]))

        in_steps = builder.sub(n_tok, builder.srem(n_tok, ir.Constant(n_tok.type, ROW_TOKENS)))
        with cgutils.for_range_slice(builder, ir.Constant(n_tok.type, 0), in_steps, ir.Constant(n_tok.type, ROW_TOKENS)) as (t0, _):
            tokens(t0, ROW_TOKENS)
        with cgutils.for_range_slice(builder, in_steps, n_tok, ir.Constant(n_tok.type, 1)) as (t0, _):
            tokens(t0, 1)
        return context.get_dummy_value()

    if n_act == 1:
        def typer(typingctx, w, r, xq, xd, out, isa):
            return make_sig(w, r, xq, (xd,), out, isa), codegen
    else:
        def typer(typingctx, w, r, xq, xd, xs, out, isa):
            return make_sig(w, r, xq, (xd, xs), out, isa), codegen
    return intrinsic(isa_typer(typer))


# tokens per step of the batch kernels (a row's blocks unpacked once for all of them)
ROW_TOKENS = 4


def row_kernels(block_bytes, n_act, init, body, finish, block_values=32, prefetch=(PREFETCH_AHEAD, PREFETCH_LOCALITY),
                d_at=None):
    """A format's kernels from its per-block body (see _row_kernel): `dot` (w, r, xq, xd[, xs],
    isa) -> float32, one row against one token's activations, and its batch form `rows` (w, r,
    xq, xd[, xs], out, isa): row r times every token of a batch, each token the one-token kernel's
    floats (see _tokens_kernel); prefetch: the one-token kernel's (_prefetch's ahead, locality);
    d_at: see _row_kernel."""
    return (intrinsic(_row_kernel(block_bytes, n_act, init, body, finish, block_values, prefetch, d_at)),
            _tokens_kernel(block_bytes, n_act, init, body, finish, block_values, d_at))


def _fmaf_typer(typingctx, a, b, c):
    """float32 a*b + c with one rounding (llvm.fma.f32: vfmadd on FMA CPUs, a libm call
    elsewhere), which LLVM vectorizes inside loops."""
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        return _fma(builder, *args)

    return types.float32(a, b, c), codegen


fmaf = intrinsic(_fmaf_typer)


def _f32_from_bits_typer(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits` (a bitcast, which LLVM vectorizes inside
    loops, as it does not an array view)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _f32)

    return types.float32(bits), codegen


f32_from_bits = intrinsic(_f32_from_bits_typer)



# --- tiles of rows x tokens for the 32-value int8 formats (AVX-512 VNNI) ---------------------
#
# vpdpbusd multiplies unsigned bytes by signed ones. A signed weight x is stored shifted,
# xu = x + 128 (0-255), and the shift comes back out through the accumulator's start value:
# sum(x*y) = sum(xu*y) - 128*sum(y), each 4-byte group exactly (|sum| <= 4*255*128). So a
# block's 8 int32 lanes are vpdpbusd(-128*sum4(y), xu, y): the lanes ggml's AVX2 kernels get
# with vpsignb/vpmaddubsw/vpmaddwd, from one instruction per (row, token) and one shared
# vpdpbusd per token for -128*sum4(y). The float steps are the one-token kernel's:
# acc = fma(d_x*d_y, float(lanes), acc) per block, hsum_float_8(acc) at the end, so each
# (row, token) is that kernel's float, bit for bit.


def _bytes_dot(builder, acc, xu, ys):
    """acc + the 4-byte-group sums of xu (unsigned) times ys (signed), <8 x i32> (or <16 x i32>
    from 64 bytes): vpdpbusd with VNNI; elsewhere generic IR (the same exact integers)."""
    if _vnni():
        return _dpbusd(builder, acc, xu, ys)
    vi = _vec(_i32, xu.type.count)
    return builder.add(acc, _lanes_portable(builder, builder.zext(xu, vi), builder.sext(ys, vi)))


def tile_kernel(block_bytes, unpack, n_rows, n_tok):
    """An intrinsic (w, r0, xq, xd, t0, out, isa): rows r0..r0+n_rows-1 of w (uint8 [rows, row
    bytes], C-contiguous; 32-value blocks of block_bytes bytes) times tokens t0..t0+n_tok-1 of
    xq (int8 [T, K]) with scales xd (float32 [T, K/32]) into out[t, r] (float32 [T, rows]).
    unpack(builder, blk) -> (d float32, xu <32 x i8>): a block's scale and its 32 values + 128
    as unsigned bytes (see above). (A batch's leftover tokens; pair_tile_kernel does the rest.)"""

    def typer(typingctx, w, r0, xq, xd, t0, out, isa):
        if not c_arrays(w, xq, xd, out):
            return None

        def codegen(context, builder, signature, args):
            warr, r0, xarr, darr, t0, oarr, _ = array_args(context, builder, signature, args)
            rows = [row_at(builder, warr, r) for r in offsets(builder, r0, n_rows)]
            k_vals = builder.extract_value(xarr.shape, 1)
            nb = builder.sdiv(k_vals, ir.Constant(k_vals.type, 32))
            toks = offsets(builder, t0, n_tok)
            yq = [row_at(builder, xarr, tk) for tk in toks]
            yd = [row_at(builder, darr, tk) for tk in toks]
            v32 = _vec(_i8, 32)
            shift = ir.Constant(v32, [128 - 256] * 32)  # (0x80; vpdpbusd reads it unsigned)
            zero = ir.Constant(_vec(_i32, 8), [0] * 8)

            def block(b, accs):
                o = builder.mul(b, ir.Constant(b.type, block_bytes))
                unpacked = [unpack(builder, builder.gep(row, [o])) for row in rows]
                y0 = builder.mul(b, ir.Constant(b.type, 32))
                new = list(accs)
                for t in range(n_tok):
                    y = _load(builder, yq[t], v32, y0)
                    dy = _splat(builder, builder.load(builder.gep(yd[t], [b])), 8)
                    start = builder.sub(zero, _bytes_dot(builder, zero, shift, y))  # -128*sum4(y)
                    for i, (d, xu) in enumerate(unpacked):
                        lanes = _bytes_dot(builder, start, xu, y)
                        k = i * n_tok + t  # (d_x*d_y on all lanes: the one-token kernel's product)
                        new[k] = _fma(builder, builder.fmul(_splat(builder, d, 8), dy), builder.sitofp(lanes, _vec(_f32, 8)), accs[k])
                return new

            accs = _state_loop(builder, nb, [_ZERO8] * (n_rows * n_tok), block)
            for i, r in enumerate(offsets(builder, r0, n_rows)):
                for t in range(n_tok):
                    builder.store(_hsum8(builder, accs[i * n_tok + t]), builder.gep(row_at(builder, oarr, toks[t]), [r]))
            return context.get_dummy_value()

        return types.none(w, r0, xq, xd, t0, out, isa), codegen

    return intrinsic(isa_typer(typer))


# A batch's tokens two by two: each pair's activations laid out once per product (`pair_layout`)
# as the 512-bit vectors the tile's steps use - a block's 32 bytes of both tokens side by side,
# their -128*sum4(y) start lanes, their scales repeated over each token's 8 lanes - so that a
# step loads them instead of assembling them.

@njit(cache=True, nogil=True)  # (serial: a parallel function costs seconds more to compile, and this is cheap)
def pair_layout(xq, xd):
    """Tokens 2p and 2p+1 of xq int8 [T, K] / xd float32 [T, K/32] (p < T // 2) as
    yp int8 [T//2, K*2]: per 32-value block b, token 2p's 32 bytes then 2p+1's (at 64b);
    sp int32 [T//2, K/2]: per block, each token's 8 lanes of -128 * (sum of its 4 bytes);
    dp float32 [T//2, K/2]: per block, each token's scale 8 times."""
    n_pairs, k = xq.shape[0] // 2, xq.shape[1]
    nb = k // 32
    yp = np.empty((n_pairs, 2 * k), np.int8)
    sp = np.empty((n_pairs, nb * 16), np.int32)
    dp = np.empty((n_pairs, nb * 16), np.float32)
    for p in range(n_pairs):
        for b in range(nb):
            for h in range(2):
                t = 2 * p + h
                for j in range(32):
                    yp[p, 64 * b + 32 * h + j] = xq[t, 32 * b + j]
                for lane in range(8):
                    s = (np.int32(xq[t, 32 * b + 4 * lane]) + np.int32(xq[t, 32 * b + 4 * lane + 1])
                         + np.int32(xq[t, 32 * b + 4 * lane + 2]) + np.int32(xq[t, 32 * b + 4 * lane + 3]))
                    sp[p, 16 * b + 8 * h + lane] = -128 * s
                    dp[p, 16 * b + 8 * h + lane] = xd[t, b]
    return yp, sp, dp


def pair_tile_kernel(block_bytes, unpack, n_rows, n_pairs):
    """An intrinsic (w, r0, yp, sp, dp, p0, out, isa): rows r0..r0+n_rows-1 of w (as tile_kernel's)
    times the tokens of pairs p0..p0+n_pairs-1 (pair_layout's arrays; pair p holds tokens 2p and
    2p+1) into out[t, r]. Each 512-bit vector holds one pair: its lower half one token's 8 lanes
    and accumulator, its upper half the other's, so a row's block meets two tokens per vpdpbusd,
    started from their -128*sum4(y) lanes. The same lanes and floats as tile_kernel (and the
    one-token kernels): acc = fma(d_x*d_y, float(lanes), acc) per block, hsum_float_8 at the end."""

    def typer(typingctx, w, r0, yp, sp, dp, p0, out, isa):
        if not c_arrays(w, yp, sp, dp, out):
            return None

        def codegen(context, builder, signature, args):
            warr, r0, yarr, sarr, darr, p0, oarr, _ = array_args(context, builder, signature, args)
            rows = [row_at(builder, warr, r) for r in offsets(builder, r0, n_rows)]
            y_cols = builder.extract_value(yarr.shape, 1)
            nb = builder.sdiv(y_cols, ir.Constant(y_cols.type, 64))
            pairs = offsets(builder, p0, n_pairs)
            ybase = [row_at(builder, yarr, p) for p in pairs]
            sbase = [row_at(builder, sarr, p) for p in pairs]
            dbase = [row_at(builder, darr, p) for p in pairs]
            v16i, v16f = _vec(_i32, 16), _vec(_f32, 16)
            zero16 = ir.Constant(v16f, [0.0] * 16)

            def vload(ptr, ty):
                return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=4)

            def block(b, accs):
                o = builder.mul(b, ir.Constant(b.type, block_bytes))
                unpacked = [unpack(builder, builder.gep(row, [o])) for row in rows]
                dx = [_splat(builder, d, 16) for d, _ in unpacked]
                xs = [builder.shuffle_vector(xu, xu, _mask(list(range(32)) * 2)) for _, xu in unpacked]
                at16 = builder.mul(b, ir.Constant(b.type, 16))
                new = list(accs)
                for v in range(n_pairs):
                    y = _load(builder, ybase[v], _vec(_i8, 64), builder.mul(b, ir.Constant(b.type, 64)))
                    dy = vload(builder.gep(dbase[v], [at16]), v16f)
                    for i in range(n_rows):
                        start = vload(builder.gep(sbase[v], [at16]), v16i)  # -128*sum4(y) of both tokens
                        lanes = _bytes_dot(builder, start, xs[i], y)
                        k = i * n_pairs + v
                        new[k] = _fma(builder, builder.fmul(dx[i], dy), builder.sitofp(lanes, v16f), accs[k])
                return new

            accs = _state_loop(builder, nb, [zero16] * (n_rows * n_pairs), block)
            for i, r in enumerate(offsets(builder, r0, n_rows)):
                for v in range(n_pairs):
                    for h, t in enumerate(offsets(builder, builder.mul(pairs[v], ir.Constant(p0.type, 2)), 2)):
                        half = builder.shuffle_vector(accs[i * n_pairs + v], accs[i * n_pairs + v], _mask(range(8 * h, 8 * h + 8)))
                        builder.store(_hsum8(builder, half), builder.gep(row_at(builder, oarr, t), [r]))
            return context.get_dummy_value()

        return types.none(w, r0, yp, sp, dp, p0, out, isa), codegen

    return intrinsic(isa_typer(typer))


@intrinsic
def has_vnni(typingctx, isa):
    """True (a compile-time constant) when the Isa is avx512vnni: kernels that take another
    path there branch on it, and LLVM drops the branch not taken."""
    if not isinstance(isa, IsaType):
        return None
    flag = isa.isa == "avx512vnni"

    def codegen(context, builder, signature, args):
        return ir.Constant(ir.IntType(1), int(flag))

    return types.boolean(isa), codegen


# --- a format's kernels as an argument -------------------------------------------------------
#
# numba cannot pass an intrinsic to a compiled function, and a driver made by a factory closure
# is not found again in the on-disk cache (its cache key pickles the closure's dispatchers,
# whose ids change per process). So a loop that several formats share takes a FormatKernels:
# a constant whose numba type names the format, through which `format_tile`, `format_tile1` and `format_rows` reach
# that format's intrinsics at compile time. numba compiles and caches the driver once per
# format, as it does once per Isa.

class FormatKernels:
    """The intrinsics of one format that a shared driver calls (see `format_tile`, `format_tile1`, `format_rows`)."""

    __slots__ = ("name", "kernels", "_numba_type_")
    _BY_NAME: dict = {}

    def __init__(self, name: str, **kernels):
        self.name = name
        self.kernels = kernels
        self._numba_type_ = FormatKernelsType(name)
        FormatKernels._BY_NAME[name] = self

    def __repr__(self) -> str:
        return f"FormatKernels({self.name!r})"

    def __reduce__(self):
        # by name: numba's cache keys a closure over a FormatKernels on its pickled bytes, which
        # must be the same in every process (an intrinsic pickles with a random id)
        return _format_kernels_named, (self.name,)


def _format_kernels_named(name: str) -> "FormatKernels":
    return FormatKernels._BY_NAME[name]


class FormatKernelsType(types.Dummy):
    def __init__(self, name: str):
        self.format = name
        super().__init__(name=f"FormatKernels({name})")


register_constant_type(FormatKernels, FormatKernelsType)


def _delegate(which, typingctx, fk, args):
    """Type the FormatKernels fk's intrinsic `which` on args; its IR, called without fk."""
    if not isinstance(fk, FormatKernelsType):
        return None
    got = FormatKernels._BY_NAME[fk.format].kernels[which]._defn(typingctx, *args)
    if got is None:
        return None
    sig, codegen = got

    def emit(context, builder, signature, cargs):
        return codegen(context, builder, signature.replace(args=signature.args[1:]), cargs[1:])

    return sig.return_type(fk, *sig.args), emit


@intrinsic
def format_tile(typingctx, fk, w, r0, yp, sp, dp, p0, out, isa):
    """fk's pair_tile_kernel (w, r0, yp, sp, dp, p0, out, isa)."""
    return _delegate("tile", typingctx, fk, (w, r0, yp, sp, dp, p0, out, isa))


@intrinsic
def format_tile1(typingctx, fk, w, r0, xq, xd, t0, out, isa):
    """fk's one-token tile_kernel (w, r0, xq, xd, t0, out, isa)."""
    return _delegate("tile1", typingctx, fk, (w, r0, xq, xd, t0, out, isa))


@intrinsic
def format_rows(typingctx, fk, w, r, xq, xd, out, isa):
    """fk's row_kernels batch form (w, r, xq, xd, out, isa)."""
    return _delegate("rows", typingctx, fk, (w, r, xq, xd, out, isa))
