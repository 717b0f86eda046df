"""Q5_1: blocks of 32 values, a scale and a minimum, 5-bit quants (x = d * q + m).

block_q5_1 (24 bytes): d    f16         bytes 0..1
                       m    f16         bytes 2..3
                       qh   uint32 LE   bytes 4..7: bit j = 5th bit of value j (j < 32)
                       qs   16 B        bytes 8..23: low nibble of qs[j] = value j,
                                                     high nibble of qs[j] = value j + 16
quantize is quantize_row_q5_1_ref: d = (max - min) / 31, m = min,
q = (uint8)((x - min) / d + 0.5) (no clamp, as in ggml).
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from .rounding import read_f16, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_1]
HALF = QK // 2
FLT_MAX = np.float32(3.4028234663852886e38)


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d = read_f16(row, o)
        m = read_f16(row, o + 2)
        qh = (np.int64(row[o + 4]) | (np.int64(row[o + 5]) << 8) | (np.int64(row[o + 6]) << 16)
              | (np.int64(row[o + 7]) << 24))
        for j in range(HALF):
            q = np.int32(row[o + 8 + j])
            h0 = np.int32((qh >> j) << 4) & 0x10
            h1 = np.int32(qh >> (j + 12)) & 0x10
            y[b * QK + j] = np.float32((q & 0xF) | h0) * d + m
            y[b * QK + HALF + j] = np.float32((q >> 4) | h1) * d + m


@njit(cache=True, nogil=True)
def quantize_row(xr, row):
    n = xr.shape[0]
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        o = b * BLOCK_BYTES
        vmin = FLT_MAX
        vmax = -FLT_MAX
        for j in range(QK):
            if xb[j] < vmin:
                vmin = xb[j]
            if xb[j] > vmax:
                vmax = xb[j]
        d = (vmax - vmin) / np.float32(31)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        write_f16(row, o, d)
        write_f16(row, o + 2, vmin)
        qh = np.int64(0)
        for j in range(HALF):
            q0 = int((xb[j] - vmin) * inv + np.float32(0.5)) & 0xFF
            q1 = int((xb[HALF + j] - vmin) * inv + np.float32(0.5)) & 0xFF
            row[o + 8 + j] = np.uint8((q0 & 0xF) | ((q1 & 0xF) << 4))
            qh |= ((q0 & 0x10) >> 4) << j
            qh |= ((q1 & 0x10) >> 4) << (j + HALF)
        for k in range(4):
            row[o + 4 + k] = np.uint8((qh >> (8 * k)) & 0xFF)
