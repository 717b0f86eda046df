"""Q2_K: super-blocks of 256 values in 16 sub-blocks of 16, each with a 4-bit scale and a 4-bit
min (x = d * sc * q - dmin * m, q 2-bit).

block_q2_K (84 bytes): scales  16 B   bytes 0..15   sub-block j: low nibble sc, high nibble m
                       qs      64 B   bytes 16..79  per 128 values: 32 bytes; value 128*h + 32*s + l
                                                    is bits 2s..2s+1 of qs[32*h + l]
                       d       f16    bytes 80..81
                       dmin    f16    bytes 82..83
quantize is quantize_row_q2_K_ref: make_qkx2_quants(16, 3, weights = |x|, rmin -0.5,
rdelta 0.1, 15 steps, mean absolute error), 4-bit scales/mins against the largest (15 levels),
then every value requantized with the rounded scales.
"""

import numpy as np
from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from .ksearch import f32, make_qkx2_quants
from .rounding import nearest_int, read_f16_pair, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K]


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        sc = row[o:o + 16]
        qs = row[o + 16:o + 80]
        d, dmin = read_f16_pair(row, o + 80)
        yb = y[b * QK:(b + 1) * QK]
        for h in range(2):
            for s in range(4):
                for half in range(2):
                    j = 8 * h + 2 * s + half
                    dl = d * f32(np.int32(sc[j]) & 0xF)
                    ml = dmin * f32(np.int32(sc[j]) >> 4)
                    for l in range(16):
                        q = (np.int32(qs[32 * h + 16 * half + l]) >> (2 * s)) & 3
                        yb[128 * h + 32 * s + 16 * half + l] = dl * f32(q) - ml


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row(xr, row):
    n = xr.shape[0]
    L = np.empty(QK, np.uint8)
    Laux = np.empty(16, np.uint8)
    weights = np.empty(16, np.float32)
    scales = np.empty(16, np.float32)
    mins = np.empty(16, np.float32)
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        blk = row[b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES]
        q4scale = f32(15)
        max_scale = f32(0.0)
        max_min = f32(0.0)
        for j in range(16):
            xs = xb[16 * j:16 * j + 16]
            for l in range(16):
                weights[l] = abs(xs[l])
            scales[j], mins[j] = make_qkx2_quants(16, 3, xs, weights, L[16 * j:16 * j + 16], Laux,
                                                  -0.5, 0.1, 15, True)
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        sc = blk[0:16]
        if max_scale > 0:
            iscale = q4scale / max_scale
            for j in range(16):
                sc[j] = nearest_int(iscale * scales[j]) & 0xFF
            d = write_f16(blk, 80, max_scale / q4scale)
        else:
            sc[:] = 0
            d = write_f16(blk, 80, f32(0.0))
        if max_min > 0:
            iscale = q4scale / max_min
            for j in range(16):
                sc[j] |= (nearest_int(iscale * mins[j]) << 4) & 0xFF
            dmin = write_f16(blk, 82, max_min / q4scale)
        else:
            dmin = write_f16(blk, 82, f32(0.0))
        for j in range(16):
            dj = d * f32(np.int32(sc[j]) & 0xF)
            if dj == 0:
                continue
            dm = dmin * f32(np.int32(sc[j]) >> 4)
            for ii in range(16):
                l = nearest_int((xb[16 * j + ii] + dm) / dj)
                L[16 * j + ii] = max(0, min(3, l))
        qs = blk[16:80]
        for h in range(2):
            for l in range(32):
                o = 128 * h + l
                qs[32 * h + l] = L[o] | (L[o + 32] << 2) | (L[o + 64] << 4) | (L[o + 96] << 6)
