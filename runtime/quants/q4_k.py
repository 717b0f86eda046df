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
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from .ksearch import f32, quantize_scales_mins_k4, scales_mins_k4
from .rounding import read_f16_pair

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d, dmin = read_f16_pair(row, o)
        sc = row[o + 4:o + 16]
        qs = row[o + 16:o + BLOCK_BYTES]
        yb = y[b * QK:(b + 1) * QK]
        for g in range(4):  # 64 values per group: two sub-blocks sharing 32 bytes
            d1, mm1, d2, mm2 = scales_mins_k4(g, sc, d, dmin)
            for l in range(32):
                yb[64 * g + l] = d1 * f32(np.int32(qs[32 * g + l]) & 0xF) - mm1
            for l in range(32):
                yb[64 * g + 32 + l] = d2 * f32(np.int32(qs[32 * g + l]) >> 4) - mm2


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
        quantize_scales_mins_k4(xb, blk, L, Laux, weights, scales, mins, 15, -1.0, 20)
        qs = blk[16:]
        for g in range(4):
            for l in range(32):
                qs[32 * g + l] = L[64 * g + l] | (L[64 * g + 32 + l] << 4)
