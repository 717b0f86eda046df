"""Products of quantized weight matrices with float activations: `y = x @ W.T`.

W is a GGUF tensor's rows of ggml blocks (`TensorInfo.rows()`, the memory map, or a copy);
x is float32 [T, K] (T tokens). Numerics follow llama.cpp's CPU backend: before a product the
activations are converted to the weight format's "vec_dot_type" (Q8_0 for Q8_0/Q4_0/Q5_0, Q8_1
for Q4_1/Q5_1, Q8_K for the K-quants, F16 for F16, BF16 for BF16), so our sums use the same
rounded activations as llama.cpp's integer dot products.

One arithmetic for one token and for batches: each (row, token) of a product is summed the
same way whatever the batch, so a token's logits do not depend on how its prompt was split, and
they are llama.cpp's (its CPU batches sum as its vec_dot does for Q4_1/Q5_0/Q5_1/Q6_K/Q8_0 -
llamafile's sgemm has no kernel for the first four and sums Q8_0 in vec_dot's lane order - and
through its repacked gemm/gemv for Q4_0 and Q4_K, whose per-(row, token) chains we replay).

Which kernels multiply a format is its record's business (runtime.quants.TRAITS; each
format's module holds its layout and kernels): formats with a one-token kernel (`decode`) read
the blocks directly, as ggml's AVX2 loops in LLVM vector IR, llama.cpp's floats bit for bit;
their batches take the same sums several tokens per step (`batch`). Q4_0 and Q4_1 matrices with
rows a multiple of 8 are repacked at load (`repack`: the record's `pack` and `packed` layout).
The other formats: a tile of rows dequantized to float32 once, multiplied by the rounded
activations with numpy's BLAS. The tile is transient; weights stay quantized in the mmap.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from llamachat.runtime.gguf.constants import GGMLQuantizationType as T
from numba import njit, prange, types
from numba.core.imputils import impl_ret_borrowed
from numba.core.typing.typeof import _typeof_tuple
from numba.extending import intrinsic, overload, typeof_impl

from . import KERNELS, TRAITS, read_only_view
from .plain import round_rows_to_half
from .rounding import F16_TABLE, round_to_f16  # noqa: F401 - forward.py takes them from here
from .simd import HOST_ISA, Isa, host_isas, register_constant_type
from .traits import ACT_BF16, ACT_F16, ACT_F32, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K  # noqa: F401 - re-exported

SUPPORTED_TYPES = frozenset(TRAITS)
# formats with a one-token kernel (the others multiply through float32 tiles and BLAS)
FUSED_TYPES = frozenset(t for t, tr in TRAITS.items() if tr.decode is not None)
# rows dequantized at once on the tile path (bounds the transient float32 tile)
TILE_ROWS = 2048



class KernelSet:
    """The one-token kernels a model multiplies with (their numbers, runtime.quants.KERNELS):
    part of the numba type of a KernelContext, so `matvec_fused` is compiled with those
    kernels only and cached once per set (a Q4_1 model does not compile Q6_K's kernels)."""

    __slots__ = ("numbers", "_numba_type_")

    def __init__(self, numbers):
        self.numbers = tuple(sorted({int(n) for n in numbers if int(n) >= 0}))
        if not all(n < len(KERNELS) for n in self.numbers):
            raise ValueError(f"no one-token kernel numbered {max(self.numbers)}")
        # read by numba's dispatcher without Python code (see runtime.quants.simd.Isa)
        self._numba_type_ = KernelSetType(self.numbers)

    def __repr__(self) -> str:
        return f"KernelSet({self.numbers})"


class KernelSetType(types.Dummy):
    """numba's type of a KernelSet: one type per set of kernel numbers."""

    def __init__(self, numbers: tuple):
        self.numbers = numbers
        super().__init__(name=f"KernelSet{numbers}")


register_constant_type(KernelSet, KernelSetType)


class KernelContext(NamedTuple):
    """What every product kernel takes besides its data: the half-float table (for their scalar
    tails) and the instruction set their IR is emitted for (runtime.quants.simd.Isa: its numba type
    is part of every compiled signature, so each instruction set compiles and caches apart);
    for `matvec_fused` also the KernelSet it may dispatch to (None for the kernels themselves:
    their code does not depend on it)."""
    table: np.ndarray
    isa: Isa
    kernels: KernelSet | None = None


_CONTEXT_TYPES: dict = {}  # (id, purpose) -> (KernelContext, its numba type)


@typeof_impl.register(KernelContext)
def _typeof_kernel_context(val, c):
    """numba's type of a KernelContext, worked out once per context: numba's dispatcher types a
    tuple argument in Python, element by element, building and interning the tuple type anew
    (some 20 microseconds), and a prompt's forward pass hands one to every product it calls."""
    key = (id(val), c.purpose)
    hit = _CONTEXT_TYPES.get(key)
    if hit is not None and hit[0] is val:
        return hit[1]
    ty = _typeof_tuple(val, c)
    if ty is not None and len(_CONTEXT_TYPES) < 256:  # (contexts are made once each: kernel_context)
        _CONTEXT_TYPES[key] = (val, ty)
    return ty


# the context of this CPU's instruction set (runtime.quants.simd.HOST_ISA, detected once)
HOST_CONTEXT = KernelContext(F16_TABLE, HOST_ISA)
_CONTEXTS: dict = {}  # (isa name, kernel numbers) -> KernelContext, made once each


def kernel_context(isa: str | None = None, kernels=None) -> KernelContext:
    """The kernels' context for instruction set `isa` ("avx512vnni", "avx2", "portable"; None:
    this CPU's), with the set of one-token kernels `matvec_fused` may be asked for (numbers, e.g.
    the matrices' `kernel`; None: none, for the other kernels). ValueError for one this CPU
    cannot run (its code would stop on an illegal instruction)."""
    name = HOST_ISA.name if isa is None else isa
    numbers = None if kernels is None else KernelSet(kernels).numbers
    ctx = _CONTEXTS.get((name, numbers))
    if ctx is None:
        if name != HOST_ISA.name:
            chosen = Isa(name)  # (ValueError for an unknown name)
            if name not in host_isas():
                raise ValueError(f"this CPU cannot run the instruction set {name!r}: choose one of {', '.join(host_isas())}")
        base = HOST_CONTEXT if name == HOST_ISA.name else KernelContext(F16_TABLE, chosen)
        ctx = base if numbers is None else base._replace(kernels=KernelSet(numbers))
        _CONTEXTS[(name, numbers)] = ctx
    return ctx


def decode_context(codes, isa: str | None = None) -> KernelContext:
    """The context for decoding with matrices whose kernel numbers are `codes` (int64 arrays, or
    tuples of them, e.g. runtime.model.forward.Layer's `types`; -1 entries ignored), instruction
    set isa (None: this CPU's): one per set of kernels (kernel_context keeps them). Made once per
    model, at load."""
    arrays = []
    stack = list(codes)
    while stack:
        c = stack.pop()
        stack.extend(c) if isinstance(c, (tuple, list)) else arrays.append(np.ravel(c))
    return kernel_context(isa, np.concatenate(arrays).tolist())


@njit(cache=True, inline="always")
def _round_to_bf16(x):
    # ggml's FP32_TO_BF16: round to nearest even on the top 16 bits (NaN aside)
    if x == 0.0 or not math.isfinite(x):
        return np.float32(x)
    m, e = math.frexp(x)
    return np.float32(math.ldexp(np.rint(m * 256.0), e - 8))


@njit(cache=True, inline="always")
def _absmax(xb, n):
    """max |xb[j]| over j < n (n a multiple of 8), in 8 running maxima that LLVM keeps in one
    vector (a single running maximum is a chain of dependent compares it cannot vectorize;
    the maximum of the same values is the same whatever the order)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = np.float32(0.0)
    for j in range(0, n, 8):
        a0, a1, a2, a3 = abs(xb[j]), abs(xb[j + 1]), abs(xb[j + 2]), abs(xb[j + 3])
        a4, a5, a6, a7 = abs(xb[j + 4]), abs(xb[j + 5]), abs(xb[j + 6]), abs(xb[j + 7])
        m0, m1, m2, m3 = (a0 if a0 > m0 else m0), (a1 if a1 > m1 else m1), (a2 if a2 > m2 else m2), (a3 if a3 > m3 else m3)
        m4, m5, m6, m7 = (a4 if a4 > m4 else m4), (a5 if a5 > m5 else m5), (a6 if a6 > m6 else m6), (a7 if a7 > m7 else m7)
    m0, m1, m2, m3 = (m4 if m4 > m0 else m0), (m5 if m5 > m1 else m1), (m6 if m6 > m2 else m2), (m7 if m7 > m3 else m3)
    m0, m1 = (m2 if m2 > m0 else m0), (m3 if m3 > m1 else m1)
    return m1 if m1 > m0 else m0


# Not inline="always": numba's own inlining of this body (into quantize_activations and into the
# parallel loop of _quantize_activations_rows) made their compile four times longer than LLVM's does.
@njit(cache=True)
def _quantize_row(xr, mode, qr, dr, sr, hr):
    """quantize_activations of one token (1-D views of its rows)."""
    k = xr.shape[0]
    if mode == ACT_F32:
        for i in range(k):
            hr[i] = xr[i]
    elif mode == ACT_F16:
        for i in range(k):
            hr[i] = round_to_f16(xr[i])
    elif mode == ACT_BF16:
        for i in range(k):
            hr[i] = _round_to_bf16(xr[i])
    elif mode == ACT_Q8_0 or mode == ACT_Q8_1:
        for b in range(k // 32):
            xb = xr[b * 32:(b + 1) * 32]
            qb = qr[b * 32:(b + 1) * 32]
            hb = hr[b * 32:(b + 1) * 32]
            amax = _absmax(xb, 32)
            d = amax / np.float32(127.0)
            # ggml's x86 quantize_row_q8_0/q8_1 scale by 127/amax (not 1/d)
            inv = np.float32(127.0) / amax if amax != 0.0 else np.float32(0.0)
            dh = round_to_f16(d)
            total = np.int32(0)
            for j in range(32):
                q = np.int32(np.rint(xb[j] * inv))
                qb[j] = q
                hb[j] = dh * np.float32(q)
                total += q
            dr[b] = dh
            sr[b] = round_to_f16(d * np.float32(total)) if mode == ACT_Q8_1 else dh * np.float32(total)
    else:  # ACT_Q8_K
        for b in range(k // 256):
            xb = xr[b * 256:(b + 1) * 256]
            amax = _absmax(xb, 256)
            if amax == 0.0:
                for j in range(256):
                    qr[b * 256 + j] = 0
                    hr[b * 256 + j] = 0.0
                for g in range(8):
                    dr[b * 8 + g] = 0.0
                    sr[b * 8 + g] = 0.0
                continue
            vmax = amax
            for j in range(256):  # the first value of that magnitude, with its sign
                if abs(xb[j]) == amax:
                    vmax = xb[j]
                    break
            iscale = np.float32(-127.0) / vmax
            d = np.float32(1.0) / iscale
            for g in range(8):
                xg = xb[32 * g:32 * g + 32]
                qg = qr[b * 256 + 32 * g:b * 256 + 32 * g + 32]
                hg = hr[b * 256 + 32 * g:b * 256 + 32 * g + 32]
                total = np.int32(0)
                for j in range(32):
                    q = min(np.int32(127), np.int32(np.rint(iscale * xg[j])))
                    qg[j] = q
                    hg[j] = d * np.float32(q)
                    total += q
                dr[b * 8 + g] = d
                sr[b * 8 + g] = d * np.float32(total)


@njit(cache=True)
def quantize_activations(x, mode, xq, xd, xs, xhat):
    """x f32 [T, K] -> the activations llama.cpp's dot products see.

    Q8_0/Q8_1: per 32 values d = amax/127 (stored as half), q = round(x/d); Q8_1 adds the
    block sum s = half(d*sum(q)). Q8_K: per 256 values iscale = -127/max (max: the signed
    value of largest magnitude, the first if several), q = min(127, round(iscale*x)),
    d = 1/iscale as float32.
    Fills xq int8 [T, K], xd f32 [T, K/32] (each 32-group's scale), xs f32 [T, K/32] (each
    32-group's d*sum(q), used for the Q4_1/Q4_K offsets) and xhat f32 [T, K] = the rounded
    activations as floats (for the BLAS path).
    """
    for t in range(x.shape[0]):
        _quantize_row(x[t], mode, xq[t], xd[t], xs[t], xhat[t])


@njit(cache=True, parallel=True)
def _quantize_activations_rows(x, mode, xq, xd, xs, xhat):
    """quantize_activations with the tokens split over threads (a prompt's batch)."""
    for t in prange(x.shape[0]):
        _quantize_row(x[t], mode, xq[t], xd[t], xs[t], xhat[t])


# --- the tile path and the dispatcher ------------------------------------------------------

def dequantize_rows(raw: np.ndarray, ggml_type, n_per_row: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of a weight as float32 [n_rows, n_per_row], through its record's row function
    (into `out` when given: a reused tile buffer)."""
    ggml_type = T(ggml_type)
    if out is None:
        out = np.empty((raw.shape[0], n_per_row), np.float32)
    fmt = TRAITS.get(ggml_type)
    if fmt is None:  # formats the registry does not have yet: gguf-py's reference numpy code
        from gguf.quants import dequantize as gguf_dequantize

        out[...] = gguf_dequantize(np.ascontiguousarray(raw), ggml_type).reshape(raw.shape[0], n_per_row)
        return out
    fmt.dequantize_rows(np.ascontiguousarray(raw), out)
    return out


class QuantWeight:
    """A weight matrix [n_out, n_in] left quantized in the memory map: `rows` is uint8
    [n_out, row bytes] (ggml shape (n_in, n_out)), the file's blocks; or, once `repack`ed
    (`packed`), the same bytes in its format's interleaved layout (its record's `packed`)."""

    __slots__ = ("name", "ggml_type", "n_in", "n_out", "rows", "act_mode", "packed", "isa")

    def __init__(self, name: str, ggml_type, n_in: int, n_out: int, rows: np.ndarray):
        self.name = name
        self.ggml_type = T(ggml_type)
        self.n_in = int(n_in)
        self.n_out = int(n_out)
        self.rows = rows
        self.act_mode = TRAITS[self.ggml_type].vec_dot_type
        self.packed = False
        self.isa: str | None = None  # the instruction set its products run with (None: this CPU's); set before repacking

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)

    @property
    def traits(self):
        """The record of the layout `rows` is in: its format's, or its repacked layout's."""
        tr = TRAITS[self.ggml_type]
        return tr.packed if self.packed else tr

    @property
    def kernel(self) -> int:
        """The number matvec_fused dispatches on (-1: no one-token kernel)."""
        return self.traits.kernel


def pack_x8(rows: np.ndarray, t, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of format t [n, row bytes] (n a multiple of 8) -> its interleaved layout (the
    record's `pack`), into `out` (may be `rows` itself) or a new array."""
    return TRAITS[T(t)].pack(rows, out)


def repackable(w: QuantWeight) -> bool:
    """Whether `repack` applies: a format with an interleaved layout (Q4_0, as llama.cpp repacks
    it on an AVX2 CPU; Q4_1, the same floats as its vec_dot; Q4_K on an AVX-512 VNNI CPU, whose
    512-bit kernels it is made for), rows a multiple of 8."""
    if w.ggml_type == T.Q4_K and (w.isa or HOST_ISA.name) != "avx512vnni":
        return False
    return TRAITS[w.ggml_type].packed is not None and w.n_out % 8 == 0 and w.n_in % 32 == 0 and not w.packed


def repack(w: QuantWeight) -> None:
    """Interleave a repackable matrix's rows into a new array for the 8-row kernels; `rows` then
    holds that layout and `packed` is set. Only matrix products read it: never repack the token
    embeddings. (fused_layers packs its stacked copies in place with pack_x8.)"""
    w.rows = pack_x8(w.rows, w.ggml_type)
    w.packed = True


class Activations:
    """x rounded to a weight format's vec_dot_type, reusable by every weight of that format
    that multiplies the same x (q, k and v; gate and up)."""

    __slots__ = ("mode", "xq", "xd", "xs", "xhat")

    def __init__(self, x: np.ndarray, mode: int):
        n_tok = x.shape[0]
        self._allocate(n_tok, x.shape[1], mode)
        # (one token too: the kernels a prompt has compiled; quantize_activations' floats)
        if mode == ACT_F16:  # the same rounding on the bits, vectorized
            round_rows_to_half(x, self.xhat)
        else:
            _quantize_activations_rows(x, mode, self.xq, self.xd, self.xs, self.xhat)


    def _allocate(self, n_tok: int, k: int, mode: int) -> None:
        self.mode = mode
        self.xq = np.empty((n_tok, k), np.int8)
        self.xd = np.empty((n_tok, max(k // 32, 1)), np.float32)
        self.xs = np.empty((n_tok, max(k // 32, 1)), np.float32)
        self.xhat = np.empty((n_tok, k), np.float32)

    @classmethod
    def empty(cls, n_tok: int, k: int, mode: int) -> "Activations":
        """Arrays for n_tok tokens of k values in format mode, left for a kernel to fill (as
        quantize_activations would: runtime.model.forward's add_norm_rows)."""
        act = cls.__new__(cls)
        act._allocate(n_tok, k, mode)
        return act


def quantize_for(x: np.ndarray, w: QuantWeight) -> Activations:
    return Activations(np.ascontiguousarray(x, dtype=np.float32), w.act_mode)


def matmul(w: QuantWeight, x: np.ndarray | Activations, out: np.ndarray | None = None, isa: str | None = None,
           batch_one: bool = False) -> np.ndarray:
    """x [T, n_in] (or Activations for w's format) -> x @ W.T as float32 [T, n_out]. For the
    fused formats each token's row is the same bits whatever T (one arithmetic for prompts and
    decode); the others multiply float32 tiles with BLAS. isa: the instruction set the kernels
    are compiled for (kernel_context; None: w's, QuantWeight.isa). One token goes to the format's
    one-token kernel, or with batch_one to its batch kernel (the same floats), where it has one:
    the batch forward pass's choice, so that a prompt's kernels also serve its last row and
    single tokens (runtime.model.forward)."""
    isa = w.isa if isa is None else isa
    ctx = kernel_context(isa)
    act = x if isinstance(x, Activations) else quantize_for(x, w)
    if act.mode != w.act_mode:
        raise ValueError(f"{w.name}: activations are in the wrong format")
    n_tok = act.xhat.shape[0]
    if act.xhat.shape[1] != w.n_in:
        raise ValueError(f"{w.name}: expects {w.n_in} inputs, got {act.xhat.shape[1]}")
    if out is None:
        out = np.empty((n_tok, w.n_out), np.float32)
    t = w.ggml_type
    tr = w.traits
    if (n_tok > 1 or batch_one) and tr.batch is not None and w.n_out % tr.batch_rows == 0:
        tr.batch(read_only_view(np.ascontiguousarray(w.rows)), ctx, act.xq, act.xd, act.xs, act.xhat, out)
        return out
    if tr.decode is not None:
        # (Q4_K: every token in the order of llama.cpp's repacked gemv, which it uses for one
        # token; its batches take its gemm for tokens in fours - other fma steps, so a token's
        # floats there depend on its place in the batch - and we do not follow it there)
        rows = read_only_view(np.ascontiguousarray(w.rows))
        ctx = kernel_context(isa, (w.kernel,))
        for i in range(n_tok):
            matvec_fused(w.kernel, rows, ctx, act.xq[i], act.xd[i], act.xs[i], act.xhat[i], out[i])
        return out
    tile = np.empty((min(TILE_ROWS, w.n_out), w.n_in), np.float32)
    for start in range(0, w.n_out, TILE_ROWS):
        stop = min(start + TILE_ROWS, w.n_out)
        dequantize_rows(w.rows[start:stop], t, w.n_in, tile[:stop - start])
        np.matmul(act.xhat, tile[:stop - start].T, out=out[:, start:stop])
    return out


# --- one compiled call per layer for single-token decode ------------------------------------

# each one-token kernel's activation format, by its number (KERNELS)
_ACT_OF_KERNEL = np.array([tr.vec_dot_type for tr in KERNELS], np.int64)


@intrinsic
def _readonly(typingctx, a):
    """The same array typed read-only: weights come read-only from the memory map and writable
    from the copies made at load; the kernels are compiled for one of the two only."""
    if not isinstance(a, types.Array):
        return None
    ro = a.copy(readonly=True)

    def codegen(context, builder, signature, args):
        return impl_ret_borrowed(context, builder, ro, args[0])

    return ro(a), codegen


def _dispatch(k, w, ctx, xq, xd, xs, xhat, out):  # typed by _dispatch_to_set below
    raise NotImplementedError


@overload(_dispatch, inline="always")
def _dispatch_to_set(k, w, ctx, xq, xd, xs, xhat, out):
    """A switch over the kernels of ctx's KernelSet only (numba calls no function through a
    table; the set being part of ctx's type, the kernels outside it are never compiled)."""
    kset = ctx[2] if isinstance(ctx, types.BaseTuple) and len(ctx) == 3 else None
    if not isinstance(kset, KernelSetType):
        raise TypeError("matvec_fused needs a KernelContext with a KernelSet (matmul.kernel_context(kernels=...))")
    lines = ["def impl(k, w, ctx, xq, xd, xs, xhat, out):",
             "    base = KernelContext(ctx.table, ctx.isa, None)",
             "    w = _readonly(w)"]
    env = {"__name__": __name__, "KernelContext": KernelContext, "_readonly": _readonly}
    for i, n in enumerate(kset.numbers):
        env[f"kernel_{n}"] = KERNELS[n].decode
        lines += [f"    {'if' if i == 0 else 'elif'} k == {n}:",
                  f"        kernel_{n}(w, base, xq, xd, xs, xhat, out)"]
    lines += ["    " + ("else:" if kset.numbers else "if True:"),
              "        raise ValueError('matvec_fused: a kernel number outside the context\\'s KernelSet')"]
    exec("\n".join(lines), env)  # noqa: S102 - source made above from kernel numbers only
    return env["impl"]


@njit(cache=True, inline="always")  # (no compiled layer of its own between a caller and the kernels)
def matvec_fused(k, w, ctx, xq, xd, xs, xhat, out):
    """out = W x for one token with the one-token kernel numbered k (a record's `kernel`: the
    `decode` it names), which must be in ctx's KernelSet; x given as its rounded activations
    (xq/xd/xs for the integer kernels, xhat for floats; ctx: a KernelContext)."""
    _dispatch(k, w, ctx, xq, xd, xs, xhat, out)


@njit(cache=True)
def act_mode_of(k):
    """The activation format of the one-token kernel numbered k."""
    return _ACT_OF_KERNEL[k]
