"""Q3_K: super-blocks of 256 values in 16 sub-blocks of 16, each with a signed 6-bit scale
(x = d * (sc - 32) * (q - 4), q 3-bit: 2 low bits in qs, the high bit in hmask).

block_q3_K (110 bytes): hmask   32 B   bytes 0..31    value j's high bit is bit j/32 of hmask[j%32]
                                                      (set = q >= 4)
                        qs      64 B   bytes 32..95   low 2 bits, laid out like Q2_K's qs
                        scales  12 B   bytes 96..107  16 x 6-bit: low nibbles in bytes 0..7
                                                      (sub-block j and j+8), high 2 bits in
                                                      bytes 8..11 (bits 2*(j/4) of byte 8 + j%4)
                        d       f16    bytes 108..109
quantize is quantize_row_q3_K_ref: make_q3_quants(16, 4, rmse) per sub-block, scales to 6 bits
against the one of largest magnitude (iscale = -32 / that scale), values requantized.
"""

import numpy as np
from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from .ksearch import f32, make_q3_quants, quantize_row16
from .rounding import nearest_int, read_f16, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q3_K]


@njit(cache=True)
def _scale(sc, j):
    """Sub-block j's 6-bit scale minus 32, as ggml's reference code unpacks it."""
    low = (np.int32(sc[j]) & 0xF) if j < 8 else (np.int32(sc[j - 8]) >> 4)
    return (low | (((np.int32(sc[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        hm = row[o:o + 32]
        qs = row[o + 32:o + 96]
        sc = row[o + 96:o + 108]
        d_all = read_f16(row, o + 108)
        yb = y[b * QK:(b + 1) * QK]
        for h in range(2):
            for s in range(4):
                bit = 4 * h + s
                for half in range(2):
                    j = 8 * h + 2 * s + half
                    dl = d_all * f32(_scale(sc, j))
                    for l in range(16):
                        k = 16 * half + l
                        q = ((np.int32(qs[32 * h + k]) >> (2 * s)) & 3) - (0 if (np.int32(hm[k]) >> bit) & 1 else 4)
                        yb[128 * h + 32 * s + k] = dl * f32(q)


@njit(cache=True, inline='always')
def _write_scales(blk, scales, max_scale, max_abs_scale, L):
    """The 16 scales to 6 bits against max_scale (iscale = -32 / max_scale), packed; d."""
    sc = blk[96:108]
    sc[:] = 0
    if max_scale == 0:
        return write_f16(blk, 108, f32(0.0))
    iscale = f32(-32) / max_scale
    for j in range(16):
        l = nearest_int(iscale * scales[j])
        l = ((l + 128) & 0xFF) - 128  # C stores it in an int8_t
        l = max(-32, min(31, l)) + 32
        if j < 8:
            sc[j] = l & 0xF
        else:
            sc[j - 8] |= (l & 0xF) << 4
        l >>= 4
        sc[j % 4 + 8] |= l << (2 * (j // 4))
    return write_f16(blk, 108, f32(1.0) / iscale)


@njit(cache=True, inline='always')
def _write_quants(L, blk):
    """The high bits of L (0..7) into hmask, the low 2 bits into qs."""
    hmask = blk[0:32]
    hmask[:] = 0
    m = 0
    hbit = 1
    for j in range(QK):
        if L[j] > 3:
            hmask[m] |= hbit
            L[j] -= 4
        m += 1
        if m == 32:
            m = 0
            hbit <<= 1
    qs = blk[32:96]
    for h in range(2):
        for l in range(32):
            o = 128 * h + l
            qs[32 * h + l] = L[o] | (L[o + 32] << 2) | (L[o + 64] << 4) | (L[o + 96] << 6)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row(xr, row):
    quantize_row16(make_q3_quants, 4, _write_scales, _scale, 96, _write_quants, BLOCK_BYTES, xr, row)
