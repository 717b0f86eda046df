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

from .block32 import high_bits, min_max, pack_pair, read_qh, write_qh
from .rounding import read_f16_pair, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_1]
HALF = QK // 2


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d, m = read_f16_pair(row, o)
        qh = read_qh(row, o + 4)
        for j in range(HALF):
            q = np.int32(row[o + 8 + j])
            h0, h1 = high_bits(qh, j)
            y[b * QK + j] = np.float32((q & 0xF) | h0) * d + m
            y[b * QK + HALF + j] = np.float32((q >> 4) | h1) * d + m


@njit(cache=True, nogil=True)
def quantize_row(xr, row):
    n = xr.shape[0]
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        o = b * BLOCK_BYTES
        vmin, vmax = min_max(QK, xb)
        d = (vmax - vmin) / np.float32(31)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        write_f16(row, o, d)
        write_f16(row, o + 2, vmin)
        qh = np.int64(0)
        for j in range(HALF):
            q0 = int((xb[j] - vmin) * inv + np.float32(0.5)) & 0xFF
            q1 = int((xb[HALF + j] - vmin) * inv + np.float32(0.5)) & 0xFF
            qh = pack_pair(row, o + 8, qh, j, q0, q1)
        write_qh(row, o + 4, qh)
