"""The K-quants' batch (prompt) products: one weight row times 16 tokens per pass.

A K-quant block is costly to unpack (its scales packed in bits, its quants in nibbles and bit
planes) and cheap to multiply, so a batch unpacks each of a row's blocks once and multiplies it
with the activations of TOKENS tokens (ik_llama.cpp's mul_mat_qX_K_q8_K_T does the same): the
integer products of every (row, token) are the one-token kernel's, only computed side by side,
and the float steps a token's result goes through - which decide its bits - are the one-token
kernel's too, so a token's floats do not depend on its batch. What is per token and the same
for every row (each block's Q8_K scale, each 32 values' activation sum) is laid out beforehand,
GROUP = 8 tokens side by side (`prepare`), so that the float steps that are scalar in the
one-token kernel (Q4_K's, and Q5_K's mins) run on 8 tokens in one vector.

A batch of T tokens is cut into ceil(T / TOKENS) chunks; the last chunk repeats its last token
in the unused places (computed, not stored), so there is no separate tail kernel.

`batch_products(name, block_bytes, init, body, finish, module)` makes a format's batch product
`matmat` (traits' `batch`): the driver below over its `batch_kernel`. `batch_kernel(block_bytes,
init, body, finish)` makes a format's intrinsic
(w, r, xq, dx8, bs8, c, out, isa): row r of w times chunk c's tokens into
out[TOKENS c:TOKENS (c+1), r]. The format gives the per-block arithmetic of one group of 8
tokens (called once per group; LLVM merges the repeated unpacking of the block):
  init                                   its state (a list of IR constants)
  body(builder, blk, ys, dx, bsp, state) the state after block `blk` (an i8* to its bytes): ys
                                         the 8 tokens' i8* to the block's 256 activations, dx
                                         the 8 tokens' Q8_K scales (<8 x float>), bsp an i8* to
                                         the block's 32-value activation sums (int16, see
                                         `prepare`)
  finish(builder, state)                 the 8 tokens' results (<8 x float>)
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .ksearch import format_function
from .simd import (FormatKernels, _delegate, array_args, c_arrays, offsets, row_at, _f32, _fn, _i8, _i16, _i32, _load, _mask,
                   _scaled_pairs_acc, _splat, _state_loop, _vec, isa_typer)

GROUP = 8  # tokens side by side in one vector (a format's body multiplies a block with them)
GROUPS = 2  # groups per pass over a row: the block unpacked once for all
TOKENS = GROUP * GROUPS  # tokens per pass over a row
ROW_BLOCK = 16  # rows per parallel work item: their blocks stay in L2 while every chunk passes


@njit(cache=True, nogil=True)
def prepare(xq, xd):
    """The per-token values every row needs, group by group (GROUP tokens side by side), for
    ceil(T / TOKENS) chunks, places past the last token repeating it:
    dx8 float32 [groups, blocks * 8]: block b's Q8_K scale of token i at [g, 8b + i];
    bs8 int16 [groups, blocks * 64]: the activation sums of block b's 32-value groups 2p and
    2p+1 (|sum| <= 32 * 128, an int16) of token i at [g, 64b + 16p + 2i] and [.. + 1] (the
    pairs vpmaddwd multiplies with a pair of mins)."""
    n_tok, k = xq.shape
    nb = k // 256
    groups = (n_tok + TOKENS - 1) // TOKENS * GROUPS
    dx8 = np.empty((groups, nb * 8), np.float32)
    bs8 = np.empty((groups, nb * 64), np.int16)
    for c in range(groups):
        for i in range(GROUP):
            t = min(GROUP * c + i, n_tok - 1)
            for b in range(nb):
                dx8[c, 8 * b + i] = xd[t, 8 * b]
                for g in range(8):
                    s = np.int32(0)
                    for j in range(32):
                        s += np.int32(xq[t, 256 * b + 32 * g + j])
                    bs8[c, 64 * b + 16 * (g // 2) + 2 * i + g % 2] = s
    return dx8, bs8


def pair_scales(builder, sa, sb):
    """<16 x i16> [sa x4, sb x4, sa x4, sb x4]: the scales of vpackssdw(a, b)'s int16 places
    (a's lanes 0-3, b's 0-3, a's 4-7, b's 4-7), sa and sb i32 values within int16."""
    lo = _splat(builder, builder.trunc(sa, _i16), 4)
    hi = _splat(builder, builder.trunc(sb, _i16), 4)
    four = builder.shuffle_vector(lo, hi, _mask(range(8)))
    return builder.shuffle_vector(four, four, _mask(list(range(8)) * 2))


def scaled_pack_add(builder, acc, scales, a, b):
    """acc + the int32 lanes sum(scale * x) over the pairs of vpackssdw(a, b) (<8 x i32> a, b
    within int16, so the pack is exact; `scales` from pair_scales): vpdpwssd (AVX-512 VNNI)."""
    v8, v16 = _vec(_i32, 8), _vec(_i16, 16)
    packed = builder.call(_fn(builder, "llvm.x86.avx2.packssdw", v16, [v8, v8]), [a, b])
    return _scaled_pairs_acc(builder, acc, packed, scales)


def mins_dot(builder, mins, bsp):
    """The 8 tokens' sum over the block's 8 groups of min_g * (group g's activation sum)
    (<8 x i32>, exact), mins: the 8 i32 mins, bsp: the block's pairs in bs8."""
    v16 = _vec(_i16, 16)
    total = None
    for p in range(4):
        pair = builder.or_(mins[2 * p], builder.shl(mins[2 * p + 1], ir.Constant(_i32, 16)))
        mp = builder.bitcast(_splat(builder, pair, 8), v16)
        total = _scaled_pairs_acc(builder, total, mp, _load(builder, bsp, v16, 32 * p))
    return total


def gather8(builder, values, ty):
    """8 scalars -> <8 x ty>."""
    vec = ir.Constant(_vec(ty, 8), ir.Undefined)
    for i, v in enumerate(values):
        vec = builder.insert_element(vec, v, ir.Constant(_i32, i))
    return vec


def batch_kernel(block_bytes, init, body, finish):
    """The intrinsic (w, r, xq, dx8, bs8, c, out, isa) of a format's per-block arithmetic (see the
    module's docstring)."""

    def typer(typingctx, w, r, xq, dx8, bs8, c, out, isa):
        if not c_arrays(w, xq, dx8, bs8, out, ndim=2):
            return None
        return types.none(w, r, xq, dx8, bs8, c, out, isa), codegen

    def codegen(context, builder, signature, args):
        warr, r, xarr, dxarr, bsarr, c, oarr, _ = array_args(context, builder, signature, args)
        row_bytes = builder.extract_value(warr.shape, 1)
        row = row_at(builder, warr, r)
        n_tok = builder.extract_value(xarr.shape, 0)
        last = builder.sub(n_tok, ir.Constant(n_tok.type, 1))
        n_blocks = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, block_bytes))
        f32x8 = _vec(_f32, 8)
        groups = []  # per group: its tokens, their activation rows, its dx8 and bs8 rows
        for gi in offsets(builder, builder.mul(c, ir.Constant(c.type, GROUPS)), GROUPS):
            toks = offsets(builder, builder.mul(gi, ir.Constant(c.type, GROUP)), GROUP)
            clamped = [builder.select(builder.icmp_signed("<", t, n_tok), t, last) for t in toks]
            yq = [row_at(builder, xarr, t) for t in clamped]
            groups.append((toks, yq, row_at(builder, dxarr, gi), builder.bitcast(row_at(builder, bsarr, gi), _i8.as_pointer())))
        n_state = len(init)

        def step(b, state):
            blk = builder.gep(row, [builder.mul(b, ir.Constant(b.type, block_bytes))])
            yo = builder.mul(b, ir.Constant(b.type, 256))
            new = []
            for s, (_, yq, dxrow, bsrow) in enumerate(groups):  # (LLVM merges the block's repeated unpacking)
                ys = [builder.gep(y, [yo]) for y in yq]
                dx = builder.load(builder.bitcast(builder.gep(dxrow, [builder.mul(b, ir.Constant(b.type, 8))]), f32x8.as_pointer()), align=4)
                bsp = builder.gep(bsrow, [builder.mul(b, ir.Constant(b.type, 128))])
                new += body(builder, blk, ys, dx, bsp, state[n_state * s:n_state * (s + 1)])
            return new

        state = _state_loop(builder, n_blocks, list(init) * GROUPS, step)
        for s, (toks, _, _, _) in enumerate(groups):
            result = finish(builder, state[n_state * s:n_state * (s + 1)])
            for i, t in enumerate(toks):
                with cgutils.if_likely(builder, builder.icmp_signed("<", t, n_tok)):
                    builder.store(builder.extract_element(result, ir.Constant(_i32, i)), builder.gep(row_at(builder, oarr, t), [r]))
        return context.get_dummy_value()

    return intrinsic(isa_typer(typer))


@intrinsic
def _format_batch(typingctx, fk, w, r, xq, dx8, bs8, c, out, isa):
    """fk's batch_kernel (w, r, xq, dx8, bs8, c, out, isa)."""
    return _delegate("batch", typingctx, fk, (w, r, xq, dx8, bs8, c, out, isa))


def batch_products(name: str, block_bytes: int, init, body, finish, module: str, shifted: bool = False):
    """A K-quant's batch product `matmat` (traits' `batch`) over its batch_kernel (init, body,
    finish: see the module's docstring), as the function matmat of `module`
    (ksearch.format_function; numba compiles and caches it once per format, its closure
    pickling as the format's name and `shifted`). shifted: the body reads the activations as
    y + 128, unsigned bytes (Q6_K), from a copy made once per batch. (A format whose batch
    takes another path on some instruction set, as Q4_K's VNNI tiles, can choose this driver
    for the others in Python, as block32.matmat chooses.)"""
    fk = FormatKernels(name, batch=batch_kernel(block_bytes, init, body, finish))

    def matmat(w, ctx, xq, xd, xs, xhat, out):
        """out [T, rows] = the T tokens' Q8_K activations (xq int8 [T, K], xd float32 [T, K/32])
        times the rows w (uint8 [rows, row bytes], C-contiguous): each (row, token) the
        format's matvec float, so a token's floats do not depend on its batch. One row times
        TOKENS tokens per pass (runtime.quants.kbatch), ROW_BLOCK rows per thread's work item."""
        n_tok, k = xq.shape
        chunks = (n_tok + TOKENS - 1) // TOKENS
        dx8, bs8 = prepare(xq, xd)
        y = xq
        if shifted:
            y = np.empty((n_tok, k), np.int8)
            for t in range(n_tok):
                for i in range(k):
                    y[t, i] = np.int8(np.int32(xq[t, i]) ^ 0x80)  # the bits of y + 128 (0..255) as a uint8
        n_rows = w.shape[0]
        for rb in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK):
            stop = min(n_rows, (rb + 1) * ROW_BLOCK)
            for c in range(chunks):
                for r in range(rb * ROW_BLOCK, stop):
                    _format_batch(fk, w, r, y, dx8, bs8, c, out, ctx.isa)

    return format_function(matmat, module, parallel=True)
