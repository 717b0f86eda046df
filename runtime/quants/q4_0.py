"""Q4_0: blocks of 32 values, one scale, 4-bit quants offset by 8 (x = d * (q - 8)).

block_q4_0 (18 bytes): d    f16    bytes 0..1
                       qs   16 B   bytes 2..17: low nibble of qs[j] = value j,
                                                high nibble of qs[j] = value j + 16
quantize is quantize_row_q4_0_ref: d = (the value of largest magnitude) / -8,
q = min(15, (int8)(x / d + 8.5)) (truncation toward zero, as the C cast does).
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from .ksearch import signed_absmax
from .rounding import read_f16, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
HALF = QK // 2


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d = read_f16(row, o)
        for j in range(HALF):
            q = np.int32(row[o + 2 + j])
            y[b * QK + j] = np.float32((q & 0xF) - 8) * d
            y[b * QK + HALF + j] = np.float32((q >> 4) - 8) * d


@njit(cache=True, nogil=True)
def quantize_row(xr, row):
    n = xr.shape[0]
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        o = b * BLOCK_BYTES
        vmax, _ = signed_absmax(QK, xb)
        d = vmax / np.float32(-8)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        write_f16(row, o, d)
        for j in range(HALF):
            q0 = min(15, int(xb[j] * inv + np.float32(8.5)))
            q1 = min(15, int(xb[HALF + j] * inv + np.float32(8.5)))
            row[o + 2 + j] = np.uint8(q0 | (q1 << 4))
