"""Q4_K: super-blocks of 256 values in 8 sub-blocks of 32, each with a 6-bit scale and min
(x = d * sc * q - dmin * m, q 4-bit).

block_q4_K (144 bytes): d       f16    bytes 0..1     super-block scale of the scales
                        dmin    f16    bytes 2..3     super-block scale of the mins
                        scales  12 B   bytes 4..15    8 x (6-bit sc, 6-bit m), packed as
                                                      get_scale_min_k4 reads them
                        qs      128 B  bytes 16..143  per 64 values: 32 bytes, low nibbles =
                                                      values 0..31, high nibbles = 32..63
quantize is quantize_row_q4_K_ref (what quantize_q4_K runs without an imatrix):
make_qkx2_quants(32, 15, weights = rms + |x|, rmin -1, rdelta 0.1, 20 steps) per sub-block,
6-bit scales/mins against the largest, then every value requantized with the rounded scales.

Products: 8 rows at a time in the order of llama.cpp's ggml_gemv_q4_K_8x8_q8_K (it repacks Q4_K
matrices at load on an AVX2 CPU; the sums are exact integers, so the file's layout gives the
same floats). On an AVX-512 VNNI CPU the matrices are repacked at load (8 rows interleaved,
`pack`, at the end of this module) for kernels with no per-row shuffles or horizontal sums.
"""

from __future__ import annotations

import numpy as np
from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .simd import (_ZERO8, _avx2, _dpbusd, _vnni, isa_typer, _f32, _fma, _fn, _half, _halves_to_float, _i8, _i16, _i32,
                    _load, _mask, _pairs_us, _prefetch, _scaled_lanes, _scaled_pairs_acc, _splat, _state_loop, _vec)
from . import kbatch
from numba.core import cgutils
from .simd import PREFETCH_AHEAD, PREFETCH_LOCALITY, _i64, array_args, c_arrays, offsets, row_at
from .ksearch import get_scale_min_k4, k4_row_converters, scale_min_k4

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]


# ggml's dequantize_row_q4_K and quantize_row_q4_K_ref (above): the fields at the offsets drawn there
dequantize_row, quantize_row = k4_row_converters(BLOCK_BYTES, qh_at=0, qs_at=16, nmax=15, rmin=-1.0, nstep=20, module=__name__)


# --- the product with Q8_K activations, 8 rows at a time ------------------------------------

class _Bits:
    """An i32 IR value with the integer operators of ksearch.scale_min_k4, which emit IR."""

    def __init__(self, builder, value):
        self.builder, self.value = builder, value

    def _op(self, op, other):
        return _Bits(self.builder, op(self.value, ir.Constant(_i32, other)))

    def __and__(self, other):
        return self._op(self.builder.and_, other)

    def __rshift__(self, other):
        return self._op(self.builder.lshr, other)

    def __lshift__(self, other):
        return self._op(self.builder.shl, other)

    def __or__(self, other):
        return _Bits(self.builder, self.builder.or_(self.value, other.value))


def scales_mins_ir(builder, blk):
    """The 8 (scale, min) pairs of the block at blk (bytes 4..15), as i32 values (Q5_K packs
    them the same way)."""
    q = [_Bits(builder, builder.zext(_load(builder, blk, _i8, 4 + i), _i32)) for i in range(12)]
    return [tuple(v.value for v in scale_min_k4(j, q)) for j in range(8)]


def _row_sums8(builder, lanes):
    """8 rows' lane vectors -> one vector of the 8 rows' lane totals (exact integers). AVX2:
    the vphaddd transpose of ggml's repacked GEMV; else 8 reductions."""
    if _avx2():
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



# ggml's unpacking of the 12-byte scales field (the utmp words of ggml_vec_dot_q4_K_q8_K)
_KMASK1, _KMASK2, _KMASK3 = 0x3F3F3F3F, 0x0F0F0F0F, 0x03030303


def scales_mins_vec(builder, blk):
    """The block's 8 scales (bytes 0-7) and 8 mins (bytes 8-15) as one <4 x i32>, from the
    scales field at blk + 4 with a few vector steps (ggml's kmask unpacking, the same values as
    scale_min_k4): words [sc0-3, sc4-7, m0-3, m4-7]."""
    # words u0, u1, u2 of the field (and 4 bytes of qs, unused)
    return unpack_scales_mins(builder, _load(builder, blk, _vec(_i32, 4), 4))


def unpack_scales_mins(builder, u, first=0):
    """scales_mins_vec of the blocks whose scales fields lie side by side in u (<4n x i32>, 16
    bytes of each block loaded from blk + 4 - 4 * first: the field from word `first` on): n
    blocks' [sc0-3, sc4-7, m0-3, m4-7]."""
    n = u.type.count // 4
    vn = u.type

    def c(values):
        return ir.Constant(vn, values * n)

    def per_block(words):
        return _mask([4 * i + first + w for i in range(n) for w in words])

    # low 6 bits of sc0-3 / m0-3; low 4 bits of sc4-7 / m4-7 from u2's nibbles
    low = builder.and_(builder.lshr(builder.shuffle_vector(u, u, per_block([0, 2, 1, 2])), c([0, 0, 0, 4])),
                       c([_KMASK1, _KMASK2, _KMASK1, _KMASK2]))
    # the top 2 bits of sc4-7 / m4-7: bits 6-7 of u0's / u1's bytes
    top = builder.shl(builder.and_(builder.lshr(builder.shuffle_vector(u, u, per_block([0, 0, 1, 1])), c([6] * 4)),
                                   c([0, _KMASK3, 0, _KMASK3])), c([4] * 4))
    return builder.or_(low, top)


def scale_words(builder, sm):
    """scales_mins_vec's 8 scales as int16 words, in both 128-bit halves (<32 x i8>) for
    broadcast_word."""
    return builder.shuffle_vector(builder.bitcast(sm, _vec(_i8, 16)), ir.Constant(_vec(_i8, 16), [0] * 16), _mask(
        [i // 2 if i % 2 == 0 else 16 for i in range(16)] * 2))


def broadcast_word(builder, words, index):
    """<16 x i16> whose every word is word `index` of each 128-bit half of `words` (<32 x i8>,
    the same 8 words in both halves): one in-lane vpshufb (ggml's get_scale_shuffle_k4)."""
    return builder.bitcast(builder.shuffle_vector(words, words, _mask([2 * index, 2 * index + 1] * 8 + [16 + 2 * index, 17 + 2 * index] * 8)),
                           _vec(_i16, 16))


def _wide_activations(builder, y):
    """The block's 256 activations at y as 4 <64 x i8>, sub-blocks [0 | 2], [1 | 3], [4 | 6],
    [5 | 7]: the places of the low and high nibbles of qs's 64-byte halves (_wide_row_lanes)."""
    v64 = _vec(_i8, 64)
    halves = [_load(builder, y, v64, 64 * h) for h in range(4)]
    out = []
    for a, b in ((halves[0], halves[1]), (halves[2], halves[3])):
        out.append(builder.shuffle_vector(a, b, _mask(list(range(32)) + list(range(64, 96)))))
        out.append(builder.shuffle_vector(a, b, _mask(list(range(32, 64)) + list(range(96, 128)))))
    return out


def _wide_row_lanes(builder, blk, sm, first, qy):
    """One row's block (at blk, its 8 scales at bytes first..first+7 of sm) times the
    activations qy (_wide_activations) on 512-bit vectors: the
    exact integer sum_g scale_g * dot_g spread over 8 int32 lanes. Per 128 values one 64-byte
    load of qs, its low and high nibbles times the activations by two vpdpbusd (4-product
    sums, |.| <= 4 * 15 * 128: exact in int16), vpackssdw packs them (per 128-bit lane: 4 sums
    of an even sub-block, then 4 of the odd one) and one vpdpwssd multiplies them with their
    sub-blocks' scales (ik_llama.cpp's AVX-512 Q4_K sums)."""
    v64, v16x32, i32x16 = _vec(_i8, 64), _vec(_i16, 32), _vec(_i32, 16)
    zero = ir.Constant(i32x16, [0] * 16)
    sm_bytes = builder.bitcast(sm, _vec(_i8, 4 * sm.type.count))
    no_scale = 4 * sm.type.count  # a byte of the zero vector
    pack = _fn(builder, "llvm.x86.avx512.packssdw.512", v16x32, [i32x16, i32x16])
    dpwssd = _fn(builder, "llvm.x86.avx512.vpdpwssd.512", i32x16, [i32x16] * 3)
    acc = zero
    for h in range(2):  # sub-blocks 4h..4h+3
        qs = _load(builder, blk, v64, 16 + 64 * h)
        lo = builder.and_(qs, ir.Constant(v64, [15] * 64))
        hi = builder.lshr(qs, ir.Constant(v64, [4] * 64))
        even = _dpbusd(builder, zero, lo, qy[2 * h])  # lanes 0-7: sub-block 4h, 8-15: 4h + 2
        odd = _dpbusd(builder, zero, hi, qy[2 * h + 1])  # 4h + 1, 4h + 3
        # 128-bit lane L of the pack: 4 words of sub-block 4h + (L // 2) * 2, 4 of the next one;
        # the scales as words (high bytes from the zero vector: the scales are below 64)
        mask = []
        for lane in range(4):
            g = 4 * h + (lane // 2) * 2
            mask += [first + g, no_scale] * 4 + [first + g + 1, no_scale] * 4
        scales = builder.shuffle_vector(sm_bytes, ir.Constant(sm_bytes.type, [0] * sm_bytes.type.count), _mask(mask))
        acc = builder.call(dpwssd, [acc, builder.bitcast(builder.call(pack, [even, odd]), i32x16), builder.bitcast(scales, i32x16)])
    return builder.add(builder.shuffle_vector(acc, acc, _mask(range(8))), builder.shuffle_vector(acc, acc, _mask(range(8, 16))))


def _d_dmin(builder, dd):
    """8 rows' d and dmin as float <8 x float> each, from dd (<8 x i32>: each row's d | dmin << 16,
    the half floats of its block's first 4 bytes)."""
    halves = builder.bitcast(dd, _vec(_i16, 16))
    return (_halves_to_float(builder, builder.shuffle_vector(halves, halves, _mask(range(0, 16, 2)))),
            _halves_to_float(builder, builder.shuffle_vector(halves, halves, _mask(range(1, 16, 2)))))


def _scale_words(builder, sm, c):
    """The scale words vpdpwssd multiplies the packed sums of 64 values c of 8 rows with (sm:
    row i's 8 scales at byte 16 i; per 128-bit lane q: rows 2q, 2q+1 of sub-block 2c, then of
    2c+1, each twice), <32 x i16>."""
    idx = []
    for q in range(4):
        for g in (2 * c, 2 * c + 1):
            idx += [16 * (2 * q) + g] * 2 + [16 * (2 * q + 1) + g] * 2
    return builder.zext(builder.shuffle_vector(sm, sm, _mask(idx)), _vec(_i16, 32))


def _rows_order(builder, isum):
    """8 rows' isum (<8 x i32>, row order) from the <16 x i32> those scale words accumulate: per
    128-bit lane q, [row 2q, row 2q+1] of the even sub-blocks, then of the odd ones."""
    return builder.add(builder.shuffle_vector(isum, isum, _mask([0, 1, 4, 5, 8, 9, 12, 13])),
                       builder.shuffle_vector(isum, isum, _mask([2, 3, 6, 7, 10, 11, 14, 15])))


def _dot8_typer(emit):
    """The typer of an intrinsic (w, r0, xq, xd, bsp, out, isa): rows r0..r0+7 (one 8-row group)
    of w times one token into out[r0:r0+8]. What both layouts' kernels share is here: the
    argument checks, the arguments as pointers, the store of acc - accm; emit(builder, w's
    struct, r0, xq's i8*, xd's float*, bsp's i32*, blocks a row) emits the loop over a row's
    blocks and returns its two sums [8] (acc, accm)."""

    def typer(typingctx, w, r0, xq, xd, bsp, out, isa):
        if not c_arrays(w, xq, xd, bsp, out):
            return None
        if w.ndim != 2 or xq.ndim != 1 or xd.ndim != 1 or bsp.ndim != 1 or out.ndim != 1:
            return None
        return types.none(w, r0, xq, xd, bsp, out, isa), codegen

    def codegen(context, builder, signature, args):
        warr, r0, xarr, darr, barr, oarr, _ = array_args(context, builder, signature, args)
        row_bytes = builder.extract_value(warr.shape, 1)
        n_blocks = builder.sdiv(row_bytes, ir.Constant(row_bytes.type, BLOCK_BYTES))
        acc, accm = emit(builder, warr, r0, builder.bitcast(xarr.data, _i8.as_pointer()), darr.data,
                         builder.bitcast(barr.data, _i32.as_pointer()), n_blocks)
        dst = builder.gep(oarr.data, [r0])
        builder.store(builder.fsub(acc, accm), builder.bitcast(dst, _vec(_f32, 8).as_pointer()), align=4)
        return context.get_dummy_value()

    return isa_typer(typer)


def _q4_k_rows8():
    """The typer of an intrinsic (w, r0, xq, xd, bsp, out, isa) writing Q4_K rows r0..r0+7 times
    one token (xq int8 [K], xd float32 [K/32], bsp = bsum_pairs(xq)) into out[r0:r0+8]: per
    256-value block the exact integer sums isum = sum_g scale_g * dot_g and
    imin = sum_g min_g * (sum of 32-group g's activations), acc = fma(isum, d*dx, acc),
    accm = fma(imin, dmin*dx, accm); result acc - accm (ggml_gemv_q4_K_8x8_q8_K, the order
    llama.cpp multiplies one token by).
    Per row and group: vpmaddubsw (quants x activations, int16 pairs), then the pairs times the
    group's scale summed into the row's 8 int32 lanes (vpdpwssd with VNNI, else vpmaddwd and an
    add); the scales and mins unpacked by vector steps (scales_mins_vec), the mins of the 8
    rows multiplied with the activation sums by 4 vpmaddwd. The integers are exact, so any
    grouping of them gives the same isum and imin."""

    def emit(builder, warr, r0, yq, yd, bp, n_blocks):
        rows = [row_at(builder, warr, r) for r in offsets(builder, r0, 8)]
        v32 = _vec(_i8, 32)
        v16 = _vec(_i16, 16)
        i32x8 = _vec(_i32, 8)
        f32x8 = _vec(_f32, 8)
        low_mask, high_shift = ir.Constant(v32, [15] * 32), ir.Constant(v32, [4] * 32)
        bytes_mask = ir.Constant(i32x8, [0x00FF00FF] * 8)
        wide = _vnni()

        def block(b, state):
            o = builder.mul(b, ir.Constant(b.type, BLOCK_BYTES))
            for row in rows:
                _prefetch(builder, row, o, BLOCK_BYTES, PREFETCH_AHEAD, PREFETCH_LOCALITY)
            blks = [builder.gep(row, [o]) for row in rows]
            y = builder.gep(yq, [builder.mul(b, ir.Constant(b.type, 256))])
            if wide:
                qy = _wide_activations(builder, y)
            else:
                qy = [_load(builder, y, v32, 32 * g) for g in range(8)]
            row_lanes = []
            if wide:  # the scales of 4 rows per 512-bit vector
                v4 = _vec(_i32, 4)
                heads = [_load(builder, blk, v4, 0) for blk in blks]  # d | dmin << 16, then the scales field
                pairs = [builder.shuffle_vector(heads[i], heads[i + 1], _mask(range(8))) for i in range(0, 8, 2)]
                quads = [builder.shuffle_vector(pairs[i], pairs[i + 1], _mask(range(16))) for i in (0, 2)]
                sm4 = [unpack_scales_mins(builder, quad, first=1) for quad in quads]
                dd8 = builder.shuffle_vector(quads[0], quads[1], _mask(range(0, 32, 4)))
                for k, blk in enumerate(blks):
                    row_lanes.append(_wide_row_lanes(builder, blk, sm4[k // 4], 16 * (k % 4), qy))
                # word 2 (mins 0-3) and 3 (mins 4-7) of each row
                mins8 = [builder.shuffle_vector(sm4[0], sm4[1], _mask([4 * k + w for k in range(8)])) for w in (2, 3)]
            else:
                dd8 = kbatch.gather8(builder, [_load(builder, blk, _i32, 0) for blk in blks], _i32)  # d | dmin << 16
                mins_lo, mins_hi = [], []
                for blk in blks:
                    sm = scales_mins_vec(builder, blk)
                    mins_lo.append(builder.extract_element(sm, ir.Constant(_i32, 2)))
                    mins_hi.append(builder.extract_element(sm, ir.Constant(_i32, 3)))
                    sc_words = scale_words(builder, sm)
                    lanes = None
                    for c in range(4):
                        qs = _load(builder, blk, v32, 16 + 32 * c)
                        for g, q in ((2 * c, builder.and_(qs, low_mask)), (2 * c + 1, builder.lshr(qs, high_shift))):
                            lanes = _scaled_pairs_acc(builder, lanes, _pairs_us(builder, q, qy[g]), broadcast_word(builder, sc_words, g))
                    row_lanes.append(lanes)
                mins8 = [kbatch.gather8(builder, mins, _i32) for mins in (mins_lo, mins_hi)]
            isums = builder.sitofp(_row_sums8(builder, row_lanes), f32x8)
            imin = None  # the 8 rows' mins (2 per int32 lane as words) times the sums' pairs
            for p, (m, shift) in enumerate(((mins8[0], 0), (mins8[0], 8), (mins8[1], 0), (mins8[1], 8))):
                words = builder.and_(builder.lshr(m, ir.Constant(i32x8, [shift] * 8)) if shift else m, bytes_mask)
                pair = _splat(builder, builder.load(builder.gep(bp, [builder.add(builder.mul(b, ir.Constant(b.type, 4)), ir.Constant(b.type, p))])), 8)
                imin = _scaled_pairs_acc(builder, imin, builder.bitcast(words, v16), builder.bitcast(pair, v16))
            dh, dminh = _d_dmin(builder, dd8)
            dx = _splat(builder, builder.load(builder.gep(yd, [builder.mul(b, ir.Constant(b.type, 8))])), 8)
            return [_fma(builder, isums, builder.fmul(dh, dx), state[0]),
                    _fma(builder, builder.sitofp(imin, f32x8), builder.fmul(dminh, dx), state[1])]

        return _state_loop(builder, n_blocks, [_ZERO8] * 2, block)

    return _dot8_typer(emit)


dot8 = intrinsic(_q4_k_rows8())


# (inlined: a call from the parallel matvec to a function of its own made numba's cached matvec
# crash when loaded before that function)
@njit(cache=True, inline="always")
def bsum_pairs(xq):
    """dot8's activation sums: per 256-value block, the int16 sums s0..s7 of its 32-groups as 4
    words pairs [s0 | s2, s1 | s3, s4 | s6, s5 | s7] (|s| <= 32 * 128), the pairs vpmaddwd
    multiplies with the words of mins 0-3 and 4-7."""
    bsp = np.empty(xq.shape[0] // 64, np.uint32)
    bsum_pairs_into(xq, bsp)
    return bsp


@njit(cache=True, inline="always")
def bsum_pairs_into(xq, bsp):
    """bsum_pairs into bsp (uint32 [K/64]; a batch's row: no array assigned to a slice, which
    makes numba compile its shape-mismatch message, str() and f-strings, 1.2-1.9 s of a first
    compile)."""
    nb = xq.shape[0] // 256
    s = np.empty(8, np.int64)
    for b in range(nb):
        for g in range(8):
            t = 0
            for j in range(32):
                t += np.int64(xq[256 * b + 32 * g + j])
            s[g] = t & 0xFFFF
        for p in range(4):
            lo = 4 * (p // 2) + p % 2
            bsp[4 * b + p] = np.uint32(s[lo] | (s[lo + 2] << 16))


def _batch_body(builder, blk, ys, dx, bsp, state):
    """One block of a row times 8 tokens (runtime.quants.kbatch): each token's isum and imin as
    the one-token kernel's (exact integers), then its two fma steps on the 8 tokens at once."""
    v32 = _vec(_i8, 32)
    pairs = scales_mins_ir(builder, blk)
    quants = []  # sub-block g: the low (g even) or high nibbles of qs[32 (g // 2) ..]
    for c in range(4):
        qs = _load(builder, blk, v32, 16 + 32 * c)
        quants += [builder.and_(qs, ir.Constant(v32, [15] * 32)), builder.lshr(qs, ir.Constant(v32, [4] * 32))]
    lanes = []
    if _vnni():
        # Only each token's block total isum enters the float steps, and integer sums are exact
        # in any order: per 64 values (sub-blocks 2c, 2c+1) two vpdpbusd give 4-product sums
        # (|.| <= 4 * 15 * 128, exact in int16), vpackssdw packs them, and one vpdpwssd scales
        # and adds them ([a0-3, b0-3 | a4-7, b4-7] against the two sub-blocks' scales).
        zero = ir.Constant(_vec(_i32, 8), [0] * 8)
        scales = [kbatch.pair_scales(builder, pairs[2 * c][0], pairs[2 * c + 1][0]) for c in range(4)]
        for y in ys:
            total = zero
            for c in range(4):
                a = _dpbusd(builder, zero, quants[2 * c], _load(builder, y, v32, 64 * c))
                b = _dpbusd(builder, zero, quants[2 * c + 1], _load(builder, y, v32, 64 * c + 32))
                total = kbatch.scaled_pack_add(builder, total, scales[c], a, b)
            lanes.append(total)
    else:
        for y in ys:
            total = None
            for g in range(8):
                part = _scaled_lanes(builder, quants[g], _load(builder, y, v32, 32 * g), pairs[g][0], pairs[g][0], 0)
                total = part if total is None else builder.add(total, part)
            lanes.append(total)
    f32x8 = _vec(_f32, 8)
    isums = builder.sitofp(_row_sums8(builder, lanes), f32x8)  # token i's isum in place i
    imins = builder.sitofp(kbatch.mins_dot(builder, [p[1] for p in pairs], bsp), f32x8)
    dh = _splat(builder, _half(builder, blk, 0), 8)
    dminh = _splat(builder, _half(builder, blk, 2), 8)
    return [_fma(builder, isums, builder.fmul(dh, dx), state[0]), _fma(builder, imins, builder.fmul(dminh, dx), state[1])]


_batch = kbatch.batch_kernel(BLOCK_BYTES, [_ZERO8, _ZERO8], _batch_body, lambda builder, state: builder.fsub(state[0], state[1]))


# --- batches: a tile of 8 rows times TILE_TOKENS tokens --------------------------------------
#
# A row's blocks are multiplied with many tokens, so the tile keeps the rows in the lanes and
# the token in the instruction. The 8 rows' 32-byte chunks of qs are transposed by qwords
# (`_transpose_qwords`): a 512-bit vector holds 8 bytes of each row (two int32 lanes per row),
# and one vpdpbusd multiplies them, for 8 rows at once, with the token's 8 activations at those
# places broadcast to every row (vpbroadcastq). Four of them cover a 32-value sub-block, each
# lane then holding 16 products' sum (|.| <= 16 * 15 * 128, exact in int16): vpackssdw packs the
# low and high nibbles' sub-blocks (2c, 2c+1) and one vpdpwssd multiplies them with the rows'
# scales into the token's int32 isum lanes - no horizontal sums but one add per row and block.
# The activations are read once per 8 rows instead of once per row, and the unpacked quants
# serve TILE_TOKENS tokens. (512-bit: vpdpbusd runs on two ports there; with 256-bit vectors
# among 512-bit ones it got one.) The integers are exact, so isum and imin are the one-token
# kernel's, and the float steps per block are its (acc = fma(isum, d*dx, acc),
# accm = fma(imin, dmin*dx, accm), result acc - accm): each (row, token) is its float, bit for bit.

TILE_TOKENS = 12  # tokens per tile (their isums stay in registers through a block: 12 + 8 quants of the 32)
TILE_ROW_GROUPS = 4  # 8-row groups per parallel work item


def _transpose_qwords(builder, rows):
    """8 vectors <4 x i64> (a row's 32 bytes each) -> 4 vectors <8 x i64>, vector m = qword m of
    rows 0..7 (12 shuffles)."""
    pairs = [builder.shuffle_vector(rows[2 * a], rows[2 * a + 1], _mask(range(8))) for a in range(4)]
    quads = []
    for a in (0, 2):  # rows 2a.., 2a+3: [q0 of 4 rows, q1 of 4 rows], [q2.., q3..]
        quads += [builder.shuffle_vector(pairs[a], pairs[a + 1], _mask([0, 4, 8, 12, 1, 5, 9, 13])),
                  builder.shuffle_vector(pairs[a], pairs[a + 1], _mask([2, 6, 10, 14, 3, 7, 11, 15]))]
    return [builder.shuffle_vector(quads[m // 2], quads[2 + m // 2], _mask([4 * (m % 2) + i for i in range(4)] + [8 + 4 * (m % 2) + i for i in range(4)]))
            for m in range(4)]


def _concat(builder, parts):
    """Vectors of one type -> their concatenation (a tree of shuffles)."""
    while len(parts) > 1:
        n = parts[0].type.count
        parts = [builder.shuffle_vector(parts[i], parts[i + 1], _mask(range(2 * n))) for i in range(0, len(parts), 2)]
    return parts[0]


def _q4_k_tile(x8=False):
    """The typer of an intrinsic (w, r0, ty, ts, td, tt, out, isa) for AVX-512 VNNI (for another
    Isa it does nothing: matmat and matmat_x8 call it only on AVX-512 VNNI): rows
    r0..r0+7 of w (past the last row: the last row again, not stored) times token tile tt of
    `layout_tile` (ty, ts, td) into out[t, r0:r0+8] for the tile's tokens t < T (out float32
    [T, rows]). x8: w in the repacked layout (`pack`; r0 a multiple of 8), whose quant
    bytes are already the transposed qwords."""

    def typer(typingctx, w, r0, ty, ts, td, tt, out, isa):
        if not c_arrays(w, ty, ts, td, out):
            return None
        if w.ndim != 2 or ty.ndim != 3 or ts.ndim != 3 or td.ndim != 3 or out.ndim != 2:
            return None
        return types.none(w, r0, ty, ts, td, tt, out, isa), codegen

    def codegen(context, builder, signature, args):
        if not _vnni():  # (another target has no 512-bit vpdpbusd to emit)
            return context.get_dummy_value()
        wt, _, tyt, tst, tdt, _, outt = signature.args[:-1]
        warr = context.make_array(wt)(context, builder, args[0])
        r0, tt = args[1], args[5]
        ity = r0.type
        n_rows = builder.extract_value(warr.shape, 0)
        row_bytes = builder.extract_value(warr.shape, 1)
        stride = builder.extract_value(warr.strides, 0)
        last_row = builder.sub(n_rows, ir.Constant(ity, 1))
        row_ids = [builder.add(r0, ir.Constant(ity, i)) for i in range(8)]
        rows = [builder.gep(warr.data, [builder.mul(builder.select(builder.icmp_signed("<", r, n_rows), r, last_row), stride)])
                for r in row_ids]
        n_blocks = builder.sdiv(row_bytes, ir.Constant(ity, BLOCK_BYTES))
        arrs = [context.make_array(t)(context, builder, a) for t, a in zip((tyt, tst, tdt), args[2:5])]
        # the tile's records: per block TILE_TOKENS * 256 activations, * 8 int16 sums, * 1 scale
        yt, st, dt = [builder.gep(builder.bitcast(arr.data, _i8.as_pointer()),
                                  [builder.mul(builder.mul(tt, n_blocks), ir.Constant(ity, TILE_TOKENS * size))])
                      for arr, size in zip(arrs, (256, 16, 4))]
        oarr = context.make_array(outt)(context, builder, args[6])
        n_tok = builder.extract_value(oarr.shape, 0)
        n_out = builder.extract_value(oarr.shape, 1)
        v16 = _vec(_i16, 16)
        i32x16 = _vec(_i32, 16)
        i64x4 = _vec(_i64, 4)
        f32x8 = _vec(_f32, 8)
        zero = ir.Constant(i32x16, [0] * 16)
        low_mask = ir.Constant(i32x16, [0x0F0F0F0F] * 16)
        four = ir.Constant(i32x16, [4] * 16)
        s_slots = cgutils.alloca_once(builder, ir.ArrayType(_vec(_i16, 32), 4))
        pack = _fn(builder, "llvm.x86.avx512.packssdw.512", _vec(_i16, 32), [i32x16, i32x16])
        dpwssd = _fn(builder, "llvm.x86.avx512.vpdpwssd.512", i32x16, [i32x16] * 3)

        def bcast8(ptr, offset):  # the 8 bytes at ptr + offset in every 64-bit lane
            return builder.bitcast(_splat(builder, _load(builder, ptr, _i64, offset), 8), _vec(_i8, 64))

        group = builder.gep(warr.data, [builder.mul(r0, stride)])

        def block(b, state):
            if x8:
                o = builder.mul(b, ir.Constant(ity, X8_BLOCK))
                blks = [builder.gep(group, [builder.add(o, ir.Constant(ity, 16 * i))]) for i in range(8)]
            else:
                o = builder.mul(b, ir.Constant(ity, BLOCK_BYTES))
                blks = [builder.gep(row, [o]) for row in rows]
            yb = builder.gep(yt, [builder.mul(b, ir.Constant(ity, TILE_TOKENS * 256))])
            sb = builder.gep(st, [builder.mul(b, ir.Constant(ity, TILE_TOKENS * 16))])
            db = builder.bitcast(builder.gep(dt, [builder.mul(b, ir.Constant(ity, TILE_TOKENS * 4))]), _f32.as_pointer())
            # the 8 rows' scales and mins: bytes 16 i + j = row i's scale j (j < 8), min j - 8
            sm = _concat(builder, [builder.bitcast(scales_mins_vec(builder, blk), _vec(_i8, 16)) for blk in blks])
            for c in range(4):  # the scales of packssdw's words in the loop below
                builder.store(_scale_words(builder, sm, c), builder.gep(s_slots, [ir.Constant(ity, 0), ir.Constant(ity, c)]))

            def chunk(c, isum):  # values 64c..64c+63 of the block (a loop: LLVM interleaves less)
                if x8:
                    quads = [_load(builder, blks[0], _vec(_i64, 8), builder.add(builder.mul(c, ir.Constant(ity, 256)), ir.Constant(ity, 128 + 64 * m)))
                             for m in range(4)]
                else:
                    loaded = [_load(builder, blk, i64x4, builder.add(builder.mul(c, ir.Constant(ity, 32)), ir.Constant(ity, 16)))
                              for blk in blks]
                    quads = _transpose_qwords(builder, loaded)  # quads[m]: qword m of rows 0..7
                lo = [builder.bitcast(builder.and_(builder.bitcast(v, i32x16), low_mask), _vec(_i8, 64)) for v in quads]
                hi = [builder.bitcast(builder.and_(builder.lshr(builder.bitcast(v, i32x16), four), low_mask), _vec(_i8, 64)) for v in quads]
                scales = builder.bitcast(builder.load(builder.gep(s_slots, [ir.Constant(ity, 0), c])), i32x16)
                yc = builder.gep(yb, [builder.mul(c, ir.Constant(ity, 64))])
                new = []
                for j in range(TILE_TOKENS):
                    sums = []
                    for h, quants in enumerate((lo, hi)):
                        a = zero
                        for m in range(4):
                            a = _dpbusd(builder, a, quants[m], bcast8(yc, 256 * j + 32 * h + 8 * m))
                        sums.append(a)
                    packed = builder.bitcast(builder.call(pack, sums), i32x16)
                    new.append(builder.call(dpwssd, [isum[j], packed, scales]))
                return new

            isum = _state_loop(builder, ir.Constant(ity, 4), [zero] * TILE_TOKENS, chunk)
            mins = [builder.zext(builder.shuffle_vector(sm, sm, _mask([16 * i + 8 + 2 * p + e for i in range(8) for e in range(2)])), v16)
                    for p in range(4)]
            dd = kbatch.gather8(builder, [_load(builder, blk, _i32, 0) for blk in blks], _i32)  # d | dmin << 16
            dh, dminh = _d_dmin(builder, dd)
            new = []
            for j in range(TILE_TOKENS):
                rows_sum = _rows_order(builder, isum[j])
                imin = None
                for p in range(4):
                    pair = builder.bitcast(_splat(builder, _load(builder, sb, _i32, 16 * j + 4 * p), 8), v16)
                    imin = _scaled_pairs_acc(builder, imin, mins[p], pair)
                dx = _splat(builder, builder.load(builder.gep(db, [ir.Constant(ity, j)])), 8)
                new += [_fma(builder, builder.sitofp(rows_sum, f32x8), builder.fmul(dh, dx), state[2 * j]),
                        _fma(builder, builder.sitofp(imin, f32x8), builder.fmul(dminh, dx), state[2 * j + 1])]
            return new

        state = _state_loop(builder, n_blocks, [_ZERO8] * (2 * TILE_TOKENS), block)
        all_rows = builder.icmp_signed("<=", row_ids[7], last_row)
        for j in range(TILE_TOKENS):
            t = builder.add(builder.mul(tt, ir.Constant(ity, TILE_TOKENS)), ir.Constant(ity, j))
            result = builder.fsub(state[2 * j], state[2 * j + 1])
            with cgutils.if_likely(builder, builder.icmp_signed("<", t, n_tok)):
                dst = builder.gep(oarr.data, [builder.add(builder.mul(t, n_out), r0)])
                with builder.if_else(all_rows, likely=True) as (whole, part):
                    with whole:
                        builder.store(result, builder.bitcast(dst, f32x8.as_pointer()), align=4)
                    with part:
                        for i in range(8):
                            with builder.if_then(builder.icmp_signed("<=", row_ids[i], last_row)):
                                builder.store(builder.extract_element(result, ir.Constant(_i32, i)),
                                              builder.gep(dst, [ir.Constant(ity, i)]))
        return context.get_dummy_value()

    return isa_typer(typer)


tile = intrinsic(_q4_k_tile())


@njit(cache=True, nogil=True)
def layout_tile(xq, xd, tt, ty, ts, td):
    """Token tile tt of the activations as `tile` reads them (places past the last token repeat
    it): ty int8 [tiles, blocks, TILE_TOKENS * 256] (per block the tile's tokens' 256 values one
    after the other), ts int16 [tiles, blocks, TILE_TOKENS * 8] (each 32 values' sum,
    |sum| <= 32 * 128), td float32 [tiles, blocks, TILE_TOKENS] (the Q8_K scales)."""
    n_tok = xq.shape[0]
    for j in range(TILE_TOKENS):
        t = min(tt * TILE_TOKENS + j, n_tok - 1)
        for b in range(ty.shape[1]):
            td[tt, b, j] = xd[t, 8 * b]
            for g in range(8):
                s = np.int32(0)
                for i in range(32):
                    q = xq[t, 256 * b + 32 * g + i]
                    ty[tt, b, 256 * j + 32 * g + i] = q
                    s += np.int32(q)
                ts[tt, b, 8 * j + g] = s


@njit(cache=True, nogil=True)
def tile_arrays(n_tok, k):
    n_tiles = (n_tok + TILE_TOKENS - 1) // TILE_TOKENS
    nb = k // 256
    return (np.empty((n_tiles, nb, TILE_TOKENS * 256), np.int8), np.empty((n_tiles, nb, TILE_TOKENS * 8), np.int16),
            np.empty((n_tiles, nb, TILE_TOKENS), np.float32))


@njit(cache=True, inline="always")
def _f16(table, row, o):
    return table[np.int64(row[o]) | (np.int64(row[o + 1]) << 8)]


# fastmath 'contract' only: the two fma chains below, nothing reassociated
@njit(cache=True, parallel=True, fastmath={"contract"})
def matvec(w, ctx, xq, xd, xs, xhat, out):
    """Q4_K summed as llama.cpp does on an AVX2 CPU, where Q4_K matrices (rows a multiple of 8)
    are repacked at load and multiplied by ggml_gemv_q4_K_8x8_q8_K: per 256-value block the
    exact integer sums isum = sum_j scale_j * dot_j and imin = sum_j min_j * bsum_j (bsum: the
    sum of a 32-group's int8 activations), acc = fma(isum, d*dx, acc) and
    accm = fma(imin, dmin*dx, accm) over blocks, result acc - accm."""
    n_rows, nb = w.shape[0], xd.shape[0] // 8
    n8 = n_rows // 8
    bsp = bsum_pairs(xq)
    for g in prange(n8):  # 8 rows at a time in vector IR, as ggml's kernels
        dot8(w, 8 * g, xq, xd, bsp, out, ctx.isa)
    if 8 * n8 == n_rows:  # (the usual case: each 32-group's sum below only for the other rows)
        return
    bsum = np.zeros(nb * 8, np.int32)
    for g in range(nb * 8):
        for j in range(32):
            bsum[g] += np.int32(xq[g * 32 + j])
    for r in range(8 * n8, n_rows):  # the other rows: the same sums, one row at a time
        row = w[r]
        acc = np.float32(0.0)
        accm = np.float32(0.0)
        for b in range(nb):
            o = b * BLOCK_BYTES
            sc = row[o + 4:o + 16]
            isum = 0
            imin = 0
            for c in range(4):
                qs = row[o + 16 + 32 * c:o + 48 + 32 * c]
                xlo = xq[b * 256 + 64 * c:b * 256 + 64 * c + 32]
                xhi = xq[b * 256 + 64 * c + 32:b * 256 + 64 * c + 64]
                slo = np.int32(0)
                shi = np.int32(0)
                for j in range(32):
                    q = np.int32(qs[j])
                    slo += (q & 15) * np.int32(xlo[j])
                    shi += (q >> 4) * np.int32(xhi[j])
                s1, m1 = get_scale_min_k4(2 * c, sc)
                s2, m2 = get_scale_min_k4(2 * c + 1, sc)
                isum += s1 * slo + s2 * shi
                imin += m1 * bsum[b * 8 + 2 * c] + m2 * bsum[b * 8 + 2 * c + 1]
            dx = xd[b * 8]
            acc = np.float32(isum) * (_f16(ctx.table, row, o) * dx) + acc
            accm = np.float32(imin) * (_f16(ctx.table, row, o + 2) * dx) + accm
        out[r] = acc - accm


def matmat(w, ctx, xq, xd, xs, xhat, out):
    """out [T, rows] = the T tokens' products, each (row, token) matvec's float. With AVX-512
    VNNI: tiles of 8 rows times TILE_TOKENS tokens (`tile`), TILE_ROW_GROUPS groups of 8 rows
    per thread's work item, every token tile passing over a group's rows while they sit in
    cache. Else one row times 16 tokens per pass (runtime.quants.kbatch), ROW_BLOCK rows per
    work item. Chosen here, in Python (as matmat_x8): a kernel holding both would be typed and
    lowered for both."""
    if ctx.isa.name == "avx512vnni":
        _matmat_tiles(w, ctx, xq, xd, out)
    else:
        _matmat_kbatch(w, ctx, xq, xd, out)


@njit(cache=True, parallel=True)
def _matmat_tiles(w, ctx, xq, xd, out):
    """matmat on AVX-512 VNNI (see matmat)."""
    n_tok, k = xq.shape
    n_rows = w.shape[0]
    ty, ts, td = tile_arrays(n_tok, k)
    for tt in range(ty.shape[0]):  # (serial: 0.1-0.3 ms)
        layout_tile(xq, xd, tt, ty, ts, td)
    n_tiles = ty.shape[0]
    rows_per_item = 8 * TILE_ROW_GROUPS
    for item in prange((n_rows + rows_per_item - 1) // rows_per_item):
        start = item * rows_per_item
        stop = min(n_rows, start + rows_per_item)
        for r0 in range(start, stop, 8):
            for tt in range(n_tiles):
                tile(w, r0, ty, ts, td, tt, out, ctx.isa)


@njit(cache=True, parallel=True)
def _matmat_kbatch(w, ctx, xq, xd, out):
    """matmat without VNNI (see matmat)."""
    n_tok = xq.shape[0]
    n_rows = w.shape[0]
    dx8, bs8 = kbatch.prepare(xq, xd)
    rows_per_item = kbatch.ROW_BLOCK
    chunks = (n_tok + kbatch.TOKENS - 1) // kbatch.TOKENS
    for item in prange((n_rows + rows_per_item - 1) // rows_per_item):
        start = item * rows_per_item
        stop = min(n_rows, start + rows_per_item)
        for c in range(chunks):
            for r in range(start, stop):
                _batch(w, r, xq, dx8, bs8, c, out, ctx.isa)


# --- the repacked layout: 8 rows interleaved ------------------------------------------------
#
# On an AVX-512 VNNI CPU Q4_K matrices whose rows are a multiple of 8 are repacked at load
# (`pack`), X8_BLOCK bytes per block of 8 rows, the same bytes as the file's in another order:
#   bytes 0-127      row i's first 16 bytes (d, dmin, the scales field) at 16 i
#   bytes 128-1151   per 64 values c (0..3), 256 bytes: per qword m (0..3) of the 32 quant bytes
#                    of c, 64 bytes: that qword of rows 0..7, row order
# which is the tile kernel's transposed view (`_transpose_qwords`) stored: a 512-bit vector
# holds 8 quant bytes of each of the 8 rows (two int32 lanes a row), so one vpdpbusd multiplies
# 8 rows at once with 8 activations broadcast to every row, and after a block the 8 rows' sums
# lie in row order with no horizontal sums (the file's layout needs a vpackssdw, a scale shuffle
# and a vpdpwssd per row and 128 values, and 8-lane reductions per row and block). The integers
# are exact, so the floats are the file layout's kernels', bit for bit.
X8_BLOCK = 8 * BLOCK_BYTES


def pack(rows, out=None):
    """Rows [n, row bytes] (n a multiple of 8) -> the repacked layout above, into out (may be
    rows itself) or a new array of the same shape. (numpy on 8-byte words, a block's 18: the 2
    of the head and 16 of qs, qword m of the 32 bytes of c at 4 c + m; nothing to compile.)"""
    n, row_bytes = rows.shape
    nb = row_bytes // BLOCK_BYTES
    if out is None:
        out = np.empty_like(rows)
    elif np.shares_memory(out, rows):
        rows = rows.copy()
    words = rows.view(np.uint64).reshape(n // 8, 8, nb, 18)
    dst = out.view(np.uint64).reshape(n // 8, nb, 144)
    np.copyto(dst[..., :16].reshape(n // 8, nb, 8, 2), words[..., :2].transpose(0, 2, 1, 3))
    np.copyto(dst[..., 16:].reshape(n // 8, nb, 16, 8), words[..., 2:].transpose(0, 2, 3, 1))
    return out


def _dpbusd_any(builder, acc, q, y):
    """_dpbusd on <16 x i32> lanes on any instruction set (the portable IR's sums elsewhere)."""
    if _vnni():
        return _dpbusd(builder, acc, q, y)
    n = acc.type.count
    q, y = (builder.bitcast(v, _vec(_i8, 4 * n)) for v in (q, y))
    prod = builder.mul(builder.zext(q, _vec(_i32, 4 * n)), builder.sext(y, _vec(_i32, 4 * n)))
    for k in range(4):
        acc = builder.add(acc, builder.shuffle_vector(prod, prod, _mask(range(k, 4 * n, 4))))
    return acc


def _pack_words(builder, a, b):
    """vpackssdw of two <16 x i32> whose lanes fit in int16 (per 128-bit lane: 4 words of a,
    then 4 of b)."""
    i32x16, v16x32 = _vec(_i32, 16), _vec(_i16, 32)
    if _vnni():
        return builder.call(_fn(builder, "llvm.x86.avx512.packssdw.512", v16x32, [i32x16, i32x16]), [a, b])
    ta, tb = (builder.trunc(v, _vec(_i16, 16)) for v in (a, b))
    return builder.shuffle_vector(ta, tb, _mask([16 * s + 4 * q + j for q in range(4) for s in range(2) for j in range(4)]))


def _dpwssd_any(builder, acc, words, scales):
    """acc (<16 x i32>) + lane l = words[2l]*scales[2l] + words[2l+1]*scales[2l+1] (<32 x i16>)."""
    i32x16 = _vec(_i32, 16)
    if _vnni():
        fn = _fn(builder, "llvm.x86.avx512.vpdpwssd.512", i32x16, [i32x16] * 3)
        return builder.call(fn, [acc, builder.bitcast(words, i32x16), builder.bitcast(scales, i32x16)])
    prod = builder.mul(builder.sext(words, _vec(_i32, 32)), builder.sext(scales, _vec(_i32, 32)))
    return builder.add(acc, builder.add(builder.shuffle_vector(prod, prod, _mask(range(0, 32, 2))),
                                        builder.shuffle_vector(prod, prod, _mask(range(1, 32, 2)))))


def _x8_scales(builder, heads):
    """The 8 rows' heads (2 <16 x i32>: rows 0-3, 4-7, each row's first 16 bytes) -> sm
    (<128 x i8>: row i's 8 scales at 16 i, its 8 mins at 16 i + 8) and dd (<8 x i32>: each
    row's d | dmin << 16)."""
    sm4 = [unpack_scales_mins(builder, h, first=1) for h in heads]
    sm = builder.bitcast(builder.shuffle_vector(sm4[0], sm4[1], _mask(range(32))), _vec(_i8, 128))
    dd = builder.shuffle_vector(heads[0], heads[1], _mask(range(0, 32, 4)))
    return sm, dd


def _x8_isums(builder, blk, sm, bcast):
    """The 8 rows' exact isum (<8 x i32>, row order) of the repacked block at blk: bcast(offset)
    gives the token's 8 activations at value `offset` of the block broadcast to <64 x i8>."""
    v64, i32x16 = _vec(_i8, 64), _vec(_i32, 16)
    zero = ir.Constant(i32x16, [0] * 16)
    isum = zero
    for c in range(4):
        sums = []
        for h in range(2):  # the low nibbles: sub-block 2c; the high ones: 2c + 1
            a = zero
            for m in range(4):
                qs = _load(builder, blk, v64, 128 + 256 * c + 64 * m)
                q = builder.and_(qs, ir.Constant(v64, [15] * 64)) if h == 0 else builder.lshr(qs, ir.Constant(v64, [4] * 64))
                a = _dpbusd_any(builder, a, builder.bitcast(q, i32x16), bcast(64 * c + 32 * h + 8 * m))
            sums.append(a)  # per row 2 lanes of 16 products each (|.| <= 16 * 15 * 128: exact in int16)
        isum = _dpwssd_any(builder, isum, _pack_words(builder, *sums), _scale_words(builder, sm, c))
    return _rows_order(builder, isum)


def _x8_mins(builder, sm, pair):
    """The 8 rows' exact imin (<8 x i32>): pair(p) gives bsum_pairs' word pair p of the block
    (<16 x i16>, both words broadcast)."""
    imin = None
    for p in range(4):
        lo = 4 * (p // 2) + p % 2  # bsum_pairs' pair p: 32-groups lo and lo + 2
        words = builder.zext(builder.shuffle_vector(sm, sm, _mask([16 * i + 8 + g for i in range(8) for g in (lo, lo + 2)])), _vec(_i16, 16))
        imin = _scaled_pairs_acc(builder, imin, words, pair(p))
    return imin


def _q4_k_x8_rows8():
    """The typer of an intrinsic (w, r0, xq, xd, bsp, out, isa): dot8 for the repacked layout,
    rows r0..r0+7 (one 8-row group) times one token into out[r0:r0+8], the same floats."""

    def emit(builder, warr, r0, yq, yd, bp, n_blocks):
        ity = r0.type
        group = row_at(builder, warr, r0)
        v16, f32x8 = _vec(_i16, 16), _vec(_f32, 8)

        def block(b, state):
            o = builder.mul(b, ir.Constant(ity, X8_BLOCK))
            _prefetch(builder, group, o, X8_BLOCK, PREFETCH_AHEAD, PREFETCH_LOCALITY)
            blk = builder.gep(group, [o])
            y = builder.gep(yq, [builder.mul(b, ir.Constant(ity, 256))])
            heads = [_load(builder, blk, _vec(_i32, 16), 64 * k) for k in range(2)]
            sm, dd8 = _x8_scales(builder, heads)
            isums = _x8_isums(builder, blk, sm, lambda off: builder.bitcast(_splat(builder, _load(builder, y, _i64, off), 8), _vec(_i8, 64)))
            imin = _x8_mins(builder, sm, lambda p: builder.bitcast(
                _splat(builder, builder.load(builder.gep(bp, [builder.add(builder.mul(b, ir.Constant(ity, 4)), ir.Constant(ity, p))])), 8), v16))
            dh, dminh = _d_dmin(builder, dd8)
            dx = _splat(builder, builder.load(builder.gep(yd, [builder.mul(b, ir.Constant(ity, 8))])), 8)
            return [_fma(builder, builder.sitofp(isums, f32x8), builder.fmul(dh, dx), state[0]),
                    _fma(builder, builder.sitofp(imin, f32x8), builder.fmul(dminh, dx), state[1])]

        return _state_loop(builder, n_blocks, [_ZERO8] * 2, block)

    return _dot8_typer(emit)


dot8_x8 = intrinsic(_q4_k_x8_rows8())


@njit(cache=True, parallel=True, fastmath={"contract"})
def matvec_x8(w, ctx, xq, xd, xs, xhat, out):
    """matvec for a repacked matrix (`pack`): the same floats, 8 rows per step."""
    bsp = bsum_pairs(xq)
    for g in prange(w.shape[0] // 8):
        dot8_x8(w, 8 * g, xq, xd, bsp, out, ctx.isa)


tile_x8 = intrinsic(_q4_k_tile(x8=True))


def matmat_x8(w, ctx, xq, xd, xs, xhat, out):
    """matmat for a repacked matrix: the same floats. With AVX-512 VNNI the tiles of `matmat`
    (tile_x8, no transposing); else each token as matvec_x8 (the repacked layout is made on
    AVX-512 VNNI CPUs only: runtime.quants.matmul.repackable; tests force the others). Chosen
    here, in Python, not by a branch in one kernel: numba types and lowers the branch never
    taken too (0.3 s of a Q4_K file's first prompt)."""
    if ctx.isa.name == "avx512vnni":
        _matmat_x8_tiles(w, ctx, xq, xd, out)
    else:
        _matmat_x8_rows(w, ctx, xq, xd, out)


@njit(cache=True, parallel=True)
def _matmat_x8_tiles(w, ctx, xq, xd, out):
    """matmat_x8 on AVX-512 VNNI: the tokens laid out in tiles once, then TILE_ROW_GROUPS groups
    of 8 rows per work item, each meeting every tile."""
    n_tok, k = xq.shape
    n_rows = w.shape[0]
    ty, ts, td = tile_arrays(n_tok, k)
    for tt in range(ty.shape[0]):
        layout_tile(xq, xd, tt, ty, ts, td)
    n_tiles = ty.shape[0]
    rows_per_item = 8 * TILE_ROW_GROUPS
    for item in prange((n_rows + rows_per_item - 1) // rows_per_item):
        start = item * rows_per_item
        stop = min(n_rows, start + rows_per_item)
        for r0 in range(start, stop, 8):
            for tt in range(n_tiles):
                tile_x8(w, r0, ty, ts, td, tt, out, ctx.isa)


@njit(cache=True, parallel=True)
def _matmat_x8_rows(w, ctx, xq, xd, out):
    """matmat_x8 elsewhere: each token as matvec_x8, 8 rows per step."""
    n_tok, k = xq.shape
    n_rows = w.shape[0]
    bsp = np.empty((n_tok, k // 64), np.uint32)
    for t in range(n_tok):
        bsum_pairs_into(xq[t], bsp[t])
    rows_per_item = 8 * TILE_ROW_GROUPS
    for item in prange((n_rows + rows_per_item - 1) // rows_per_item):
        start = item * rows_per_item
        stop = min(n_rows, start + rows_per_item)
        for r0 in range(start, stop, 8):
            for t in range(n_tok):
                dot8_x8(w, r0, xq[t], xd[t], bsp[t], out[t], ctx.isa)
