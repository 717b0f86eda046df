"""Q4_1: blocks of 32 values, a scale and a minimum, 4-bit quants (x = d * q + m).

block_q4_1 (20 bytes): d    f16    bytes 0..1
                       m    f16    bytes 2..3
                       qs   16 B   bytes 4..19: low nibble of qs[j] = value j,
                                                high nibble of qs[j] = value j + 16
quantize is quantize_row_q4_1_ref: d = (max - min) / 15, m = min,
q = min(15, (int8)((x - min) / d + 0.5)).
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from .block32 import min_max
from .rounding import read_f16_pair, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_1]
HALF = QK // 2


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d, m = read_f16_pair(row, o)
        for j in range(HALF):
            q = np.int32(row[o + 4 + j])
            y[b * QK + j] = np.float32(q & 0xF) * d + m
            y[b * QK + HALF + j] = np.float32(q >> 4) * d + m


@njit(cache=True, nogil=True)
def quantize_row(xr, row):
    n = xr.shape[0]
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        o = b * BLOCK_BYTES
        vmin, vmax = min_max(QK, xb)
        d = (vmax - vmin) / np.float32(15)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        write_f16(row, o, d)
        write_f16(row, o + 2, vmin)
        for j in range(HALF):
            q0 = min(15, int((xb[j] - vmin) * inv + np.float32(0.5)))
            q1 = min(15, int((xb[HALF + j] - vmin) * inv + np.float32(0.5)))
            row[o + 4 + j] = np.uint8(q0 | (q1 << 4))
