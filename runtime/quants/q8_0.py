"""Q8_0: blocks of 32 values, one scale, int8 quants (x = d * q).

block_q8_0 (34 bytes): d    f16   bytes 0..1
                       qs   int8  bytes 2..33   value j = d * qs[j]
quantize is quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d) (half away from zero).
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from .rounding import read_f16, roundf, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d = read_f16(row, o)
        for j in range(QK):
            q = np.int32(row[o + 2 + j])
            y[b * QK + j] = np.float32(q - ((q & 0x80) << 1)) * d


@njit(cache=True, nogil=True)
def quantize_row(xr, row):
    n = xr.shape[0]
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        o = b * BLOCK_BYTES
        amax = np.float32(0.0)
        for j in range(QK):
            amax = max(amax, abs(xb[j]))
        d = amax / np.float32(127)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        write_f16(row, o, d)
        for j in range(QK):
            row[o + 2 + j] = np.uint8(np.int32(roundf(xb[j] * inv)) & 0xFF)
