"""What the 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1) share:
their row converters (`row_converters`: the walk over a row's blocks, their fields, the nibbles
and 5th bits of the quants, ggml's scale search and rounding), made for a format from its field
offsets (`Layout32`: each format module draws its block and passes its numbers here); the 5th
bits of Q5_0/Q5_1 are kept as one little-endian uint32 `qh` where bit j belongs to value j
(j < 32);
and the IR that reads a Q5 block's quants (`fifth_bit_values`) and the products against Q8_1 of
the formats with a minimum (`min_kernels`, `min_products`);
and the interleaved copy of Q4_0 and Q4_1 matrices (`pack_x8`) both formats' 8-row kernels read;
and the batch loop of the formats whose VNNI tiles share Q8_0's arithmetic (Q8_0, Q4_0, Q5_0:
`vnni_kernels`, `matmat`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.extending import intrinsic

from .ksearch import format_function, signed_absmax
from .rounding import read_f16, write_f16
from .simd import (_ZERO, _ZERO8, FormatKernels, _delegate, _fma, _half, _hsum8, _i1, _i8, _i32, _lane_accumulate, _lanes_unsigned, _load,
                   _nibbles, _vec, format_rows, format_tile, format_tile1, pair_layout, pair_tile_kernel, row_kernels,
                   tile_kernel)

QK = 32  # values per block
HALF = QK // 2  # quant byte j holds value j (low nibble) and value j + HALF (high nibble)
FLT_MAX = np.float32(3.4028234663852886e38)


class Layout32(NamedTuple):
    """Where a 32-value format of 4- or 5-bit quants keeps its fields (byte offsets in a block;
    the scale d, a half, is always at 0; 0 for a field the format lacks) and how a quant q maps
    to its value."""
    block_bytes: int
    m: int  # the minimum (a half; the _1 formats): x = d * q + m
    qh: int  # the 32 5th bits (uint32 LE; the Q5 formats)
    qs: int  # the 16 bytes of low nibbles
    offset: int  # the _0 formats: x = d * (q - offset)
    nmax: int  # the largest quant: 15 or 31


@njit(cache=True, inline='always')
def min_max(n, x):
    """(min, max) of x[:n], as quantize_row_q4_1_ref/q5_1_ref find them (from +-FLT_MAX)."""
    vmin = FLT_MAX
    vmax = -FLT_MAX
    for j in range(n):
        if x[j] < vmin:
            vmin = x[j]
        if x[j] > vmax:
            vmax = x[j]
    return vmin, vmax


@njit(cache=True, inline='always')
def read_qh(row, o):
    """The uint32 of 5th bits at row[o:o+4] (little-endian), as int64."""
    return (np.int64(row[o]) | (np.int64(row[o + 1]) << 8) | (np.int64(row[o + 2]) << 16)
            | (np.int64(row[o + 3]) << 24))


@njit(cache=True, inline='always')
def write_qh(row, o, qh):
    for k in range(4):
        row[o + k] = np.uint8((qh >> (8 * k)) & 0xFF)


def row_converters(layout: Layout32, module: str):
    """The (dequantize_row(row, y), quantize_row(xr, row)) of the format whose block is `layout`,
    as functions of its module (`module`: its __name__; ksearch.format_function): ggml's
    dequantize_row_q4_0/q4_1/q5_0/q5_1, and quantize_row_q4_0_ref/q5_0_ref (d = the block's
    value of largest magnitude / -offset, q = min(nmax, (int)(x / d + offset + 0.5))) or
    quantize_row_q4_1_ref/q5_1_ref (d = (max - min) / nmax, m = min, q = min(nmax,
    (int)((x - min) / d + 0.5))); row uint8, whole blocks; x, y float32. numba takes the
    layout's numbers (closure variables) as constants: each format compiles its own two
    converters, as if written out, and no more. (quantize_row_q5_1_ref does not clamp: its q
    never exceeds 31, as d * 31 rounds to the block's range; non-finite values give the same
    bits either way.)"""
    block_bytes, m_at, qh_at, qs_at, offset, nmax = layout
    bias = np.float32(offset + 0.5)

    def dequantize_row(row, y):
        for b in range(y.shape[0] // QK):
            o = b * block_bytes
            d = read_f16(row, o)
            m = read_f16(row, o + m_at) if m_at else np.float32(0.0)
            qh = read_qh(row, o + qh_at) if qh_at else np.int64(0)
            for j in range(HALF):
                q = np.int32(row[o + qs_at + j])
                q0 = (q & 0xF) | (np.int32((qh >> j) << 4) & 0x10)
                q1 = (q >> 4) | (np.int32(qh >> (j + 12)) & 0x10)
                if m_at:
                    y[b * QK + j] = np.float32(q0) * d + m
                    y[b * QK + HALF + j] = np.float32(q1) * d + m
                else:
                    y[b * QK + j] = np.float32(q0 - offset) * d
                    y[b * QK + HALF + j] = np.float32(q1 - offset) * d

    def quantize_row(xr, row):
        for b in range(xr.shape[0] // QK):
            xb = xr[b * QK:(b + 1) * QK]
            o = b * block_bytes
            if m_at:
                vmin, vmax = min_max(QK, xb)
                d = (vmax - vmin) / np.float32(nmax)
            else:
                vmax, _ = signed_absmax(QK, xb)
                vmin = np.float32(0.0)  # (x - 0 is x, bit for bit: one formula for both kinds)
                d = vmax / np.float32(-offset)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            write_f16(row, o, d)
            if m_at:
                write_f16(row, o + m_at, vmin)
            qh = np.int64(0)
            for j in range(HALF):
                q0 = min(nmax, int((xb[j] - vmin) * inv + bias))
                q1 = min(nmax, int((xb[HALF + j] - vmin) * inv + bias))
                if qh_at:
                    row[o + qs_at + j] = np.uint8((q0 & 0xF) | ((q1 & 0xF) << 4))
                    qh |= ((q0 & 0x10) >> 4) << j
                    qh |= ((q1 & 0x10) >> 4) << (j + HALF)
                else:
                    row[o + qs_at + j] = np.uint8(q0 | (q1 << 4))
            if qh_at:
                write_qh(row, o + qh_at, qh)

    return format_function(dequantize_row, module), format_function(quantize_row, module)


def fifth_bit_values(builder, blk, layout, if_set, if_clear):
    """A Q5 block's 32 quants as <32 x i8> (the IR of ggml's AVX2 bytes_from_nibbles_32 |
    bytes_from_bits_32): the nibbles, each or'ed with if_set where its 5th bit is set, else with
    if_clear."""
    bits = builder.bitcast(_load(builder, blk, _i32, layout.qh), _vec(_i1, 32))
    high = builder.select(bits, ir.Constant(_vec(_i8, 32), [if_set] * 32), ir.Constant(_vec(_i8, 32), [if_clear] * 32))
    return builder.or_(_nibbles(builder, _load(builder, blk, _vec(_i8, 16), layout.qs)), high)


def min_kernels(block_bytes: int, values):
    """`row_kernels` (dot, rows) of a format with a minimum (Q4_1, Q5_1: d half at bytes 0..1,
    m at 2..3) against Q8_1 activations, as ggml's AVX2 vec_dot_q4_1_q8_1 / q5_1_q8_1: per block
    8 integer lanes of unsigned values times the activations, acc_l = fma(d*dx, lane, acc_l);
    the min terms fma'd into one scalar (summs += m * s, s the Q8_1 block sum); result
    hsum_float_8(acc) + summs. values(builder, blk) -> the block's 32 quants as <32 x i8>."""

    def body(builder, blk, y, scales, state):
        qy = _load(builder, y, _vec(_i8, 32), 0)
        yd, ys = scales
        acc, mins = state
        acc = _lane_accumulate(builder, yd, _lanes_unsigned(builder, values(builder, blk), qy), acc)  # (yd: d * d_y, d_at=0)
        return [acc, _fma(builder, _half(builder, blk, 2), ys, mins)]

    def finish(builder, state):
        return builder.fadd(_hsum8(builder, state[0]), state[1])

    return row_kernels(block_bytes, 2, [_ZERO8, _ZERO], body, finish, d_at=0)


@intrinsic
def _min_dot(typingctx, fk, w, r, xq, xd, xs, isa):
    """fk's min_kernels dot (w, r, xq, xd, xs, isa)."""
    return _delegate("dot", typingctx, fk, (w, r, xq, xd, xs, isa))


@intrinsic
def _min_rows(typingctx, fk, w, r, xq, xd, xs, out, isa):
    """fk's min_kernels rows (w, r, xq, xd, xs, out, isa)."""
    return _delegate("rows", typingctx, fk, (w, r, xq, xd, xs, out, isa))


def min_products(name: str, block_bytes: int, values, module: str):
    """The (dot, rows, matvec, matmat) of a format with a minimum (see min_kernels), matvec and
    matmat as functions of `module` (ksearch.format_function): one token (out [rows]) and a
    batch (out [T, rows]), each row's products by dot / rows, rows over threads; a batch's
    (row, token) is matvec's float."""
    dot, rows = min_kernels(block_bytes, values)
    fk = FormatKernels(name, dot=dot, rows=rows)

    def matvec(w, ctx, xq, xd, xs, xhat, out):
        for r in prange(w.shape[0]):
            out[r] = _min_dot(fk, w, r, xq, xd, xs, ctx.isa)

    def matmat(w, ctx, xq, xd, xs, xhat, out):
        for r in prange(w.shape[0]):
            _min_rows(fk, w, r, xq, xd, xs, out, ctx.isa)

    return dot, rows, format_function(matvec, module, parallel=True), format_function(matmat, module, parallel=True)


# --- 8 rows interleaved block by block (Q4_0, Q4_1) -----------------------------------------
#
# Each group of 8 rows is stored block by block: the 8 rows' scales d (half floats, row
# order; Q4_1: then their 8 minimums m), then the 128 quant bytes as 4 vectors of 32:
#   rows 0, 1, 4, 5: quant bytes 0-7 of each (8 bytes per row)
#   rows 0, 1, 4, 5: quant bytes 8-15
#   rows 2, 3, 6, 7: quant bytes 0-7
#   rows 2, 3, 6, 7: quant bytes 8-15
# A quant byte j holds value j (low nibble) and value j + 16 (high nibble), so each vector's low
# nibbles meet one 8-byte piece of a token's activations broadcast 4 times, its high nibbles
# another (runtime.quants.simd._quad_lanes); the row order makes one vphaddd of the two 4-row halves
# give the 8 rows' sums in row order.
X8_ROWS_LO = (0, 1, 4, 5)
X8_ROWS_HI = (2, 3, 6, 7)


def pack_x8(rows: np.ndarray, block_bytes: int, n_scales: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows [n, row bytes] (n a multiple of 8) of a 32-value format whose blocks are n_scales
    half floats then 16 quant bytes -> the same weights interleaved 8 rows at a time (above),
    into `out` (may be `rows` itself) or a new array. (The bytes move as uint16 scales and
    uint64 halves of the quants, read in place through strided views and written straight into
    `out`: a model load's one copy per matrix, 8 times fewer elements than byte by byte.)"""
    n, rb = rows.shape
    nb = rb // block_bytes
    g = n // 8
    if out is None:
        out = np.empty((n, rb), np.uint8)
    elif np.shares_memory(out, rows):
        rows = rows.copy()  # (in place: the source first, as the interleaving reads every row of a group)
    src = np.ascontiguousarray(rows)
    packed = out.reshape(g, nb, 8 * block_bytes)
    for i in range(n_scales):  # [g, nb, 8 rows] of scale i
        scales = np.ndarray((g, 8, nb), np.uint16, src, 2 * i, (8 * rb, rb, block_bytes))
        packed[:, :, 16 * i:16 * i + 16].view(np.uint16)[...] = scales.transpose(0, 2, 1)
    # a group's row r = 4a + 2b + c as [a, b, c]: b = 0 are X8_ROWS_LO (0, 1, 4, 5), b = 1 X8_ROWS_HI
    qs = np.ndarray((g, 2, 2, 2, nb, 2), np.uint64, src, block_bytes - 16, (8 * rb, 4 * rb, 2 * rb, rb, block_bytes, 8))
    dst = packed[:, :, 16 * n_scales:].view(np.uint64).reshape(g, nb, 2, 2, 2, 2)  # [g, nb, b, v (bytes 8v..8v+7), a, c]
    dst[...] = qs.transpose(0, 4, 2, 5, 1, 3)
    return out


# --- the batch loop of the formats tiled as Q8_0 (Q8_0, Q4_0, Q5_0) --------------------------

TILE_ROWS, TILE_PAIRS = 4, 4  # the VNNI batch kernel's step: rows x pairs of tokens
CHUNK_GROUPS = 32  # row groups per work item


def vnni_kernels(name: str, block_bytes: int, unpack_shifted, rows) -> "functools.partial":
    """A format's batch product (traits' `batch`): `matmat` with the format's tiles.
    unpack_shifted(builder, blk) -> (d, values + 128 as unsigned bytes), see
    runtime.quants.simd.tile_kernel; rows: its row_kernels batch form (the path without VNNI)."""
    kernels = FormatKernels(name, tile=pair_tile_kernel(block_bytes, unpack_shifted, TILE_ROWS, TILE_PAIRS),
                            tile1=tile_kernel(block_bytes, unpack_shifted, TILE_ROWS, 1), rows=rows)
    return functools.partial(matmat, kernels)


def matmat(fk, w, ctx, xq, xd, xs, xhat, out):
    """A batch: each (row, token) the format's matvec float. With VNNI TILE_ROWS rows x
    TILE_PAIRS pairs of tokens at a time (`matmat_vnni`), elsewhere one row and four tokens at a
    time (`matmat_rows`). fk: the format's FormatKernels (numba compiles each once per format).
    Chosen here, in Python, not by a branch on has_vnni in one kernel: numba would type and
    lower the parallel loop of the branch never taken too (about a third of a second of a cold
    start per format)."""
    if ctx.isa.name == "avx512vnni":
        matmat_vnni(fk, w, ctx, xq, xd, out)
    else:
        matmat_rows(fk, w, ctx, xq, xd, out)


@njit(cache=True, parallel=True)
def matmat_vnni(fk, w, ctx, xq, xd, out):
    """`matmat` on AVX-512 VNNI: TILE_ROWS rows x TILE_PAIRS pairs of tokens at a time
    (runtime.quants.simd.pair_tile_kernel: a pair per 512-bit vector, one vpdpbusd per two block
    products, the pairs' activations laid out once by pair_layout), each tile's tokens meeting
    CHUNK_GROUPS groups of rows while their activations stay in L1; the leftover tokens one at a
    time (tile_kernel)."""
    n_rows, n_tok = w.shape[0], xq.shape[0]
    yp, sp, dp = pair_layout(xq, xd)
    n_tiles = n_tok // (2 * TILE_PAIRS)
    n_groups = n_rows // TILE_ROWS
    n_chunks = (n_groups + CHUNK_GROUPS - 1) // CHUNK_GROUPS
    n_steps = max(n_tiles, 1)  # (no whole tile: one step, of leftover tokens alone)
    # one parallel loop, not one for the tiles and one for the leftover tokens: numba compiles
    # each parallel loop on its own (a second one cost each format's first prompt 0.3-0.5 s)
    for job in prange(n_steps * n_chunks):
        k = job // n_chunks
        c = job % n_chunks
        for g in range(c * CHUNK_GROUPS, min(n_groups, (c + 1) * CHUNK_GROUPS)):
            if k < n_tiles:
                format_tile(fk, w, TILE_ROWS * g, yp, sp, dp, k * TILE_PAIRS, out, ctx.isa)
            if k == c % n_steps:  # the leftover tokens: each chunk's with one step's jobs, spread over the steps
                for t in range(2 * TILE_PAIRS * n_tiles, n_tok):
                    format_tile1(fk, w, TILE_ROWS * g, xq, xd, t, out, ctx.isa)
    for r in range(n_rows - n_rows % TILE_ROWS, n_rows):
        format_rows(fk, w, r, xq, xd, out, ctx.isa)


@njit(cache=True, parallel=True)
def matmat_rows(fk, w, ctx, xq, xd, out):
    """`matmat` without VNNI: one row and four tokens at a time (the format's row kernels)."""
    for r in prange(w.shape[0]):
        format_rows(fk, w, r, xq, xd, out, ctx.isa)
