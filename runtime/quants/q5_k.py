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
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from .ksearch import f32, quantize_scales_mins_k4, scales_mins_k4
from .rounding import read_f16_pair

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_K]


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d, dmin = read_f16_pair(row, o)
        sc = row[o + 4:o + 16]
        qh = row[o + 16:o + 48]
        qs = row[o + 48:o + BLOCK_BYTES]
        yb = y[b * QK:(b + 1) * QK]
        for g in range(4):
            d1, mm1, d2, mm2 = scales_mins_k4(g, sc, d, dmin)
            for l in range(32):
                q = (np.int32(qs[32 * g + l]) & 0xF) + (((np.int32(qh[l]) >> (2 * g)) & 1) << 4)
                yb[64 * g + l] = d1 * f32(q) - mm1
            for l in range(32):
                q = (np.int32(qs[32 * g + l]) >> 4) + (((np.int32(qh[l]) >> (2 * g + 1)) & 1) << 4)
                yb[64 * g + 32 + l] = d2 * f32(q) - mm2


@njit(cache=True, nogil=True)
def quantize_row(xr, row):
    n = xr.shape[0]
    L = np.empty(QK, np.uint8)
    Laux = np.empty(32, np.uint8)
    weights = np.empty(32, np.float32)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        blk = row[b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES]
        quantize_scales_mins_k4(xb, blk, L, Laux, weights, scales, mins, 31, -0.5, 15)
        qh = blk[16:48]
        qs = blk[48:]
        qh[:] = 0
        for g in range(4):
            for l in range(32):
                l1 = np.int32(L[64 * g + l])
                if l1 > 15:
                    l1 -= 16
                    qh[l] |= 1 << (2 * g)
                l2 = np.int32(L[64 * g + 32 + l])
                if l2 > 15:
                    l2 -= 16
                    qh[l] |= 2 << (2 * g)
                qs[32 * g + l] = l1 | (l2 << 4)
