"""Q5_0: blocks of 32 values, one scale, 5-bit quants offset by 16 (x = d * (q - 16)).

block_q5_0 (22 bytes): d    f16         bytes 0..1
                       qh   uint32 LE   bytes 2..5: bit j = 5th bit of value j (j < 32)
                       qs   16 B        bytes 6..21: low nibble of qs[j] = value j,
                                                     high nibble of qs[j] = value j + 16
quantize is quantize_row_q5_0_ref: d = (the value of largest magnitude) / -16,
q = min(31, (int8)(x / d + 16.5)).
"""

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from .block32 import high_bits, pack_pair, read_qh, write_qh
from .ksearch import signed_absmax
from .rounding import read_f16, write_f16

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_0]
HALF = QK // 2


@njit(cache=True, nogil=True)
def dequantize_row(row, y):
    n = y.shape[0]
    for b in range(n // QK):
        o = b * BLOCK_BYTES
        d = read_f16(row, o)
        qh = read_qh(row, o + 2)
        for j in range(HALF):
            q = np.int32(row[o + 6 + j])
            h0, h1 = high_bits(qh, j)
            y[b * QK + j] = np.float32(((q & 0xF) | h0) - 16) * d
            y[b * QK + HALF + j] = np.float32(((q >> 4) | h1) - 16) * d


@njit(cache=True, nogil=True)
def quantize_row(xr, row):
    n = xr.shape[0]
    for b in range(n // QK):
        xb = xr[b * QK:(b + 1) * QK]
        o = b * BLOCK_BYTES
        vmax, _ = signed_absmax(QK, xb)
        d = vmax / np.float32(-16)
        inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
        write_f16(row, o, d)
        qh = np.int64(0)
        for j in range(HALF):
            q0 = min(31, int(xb[j] * inv + np.float32(16.5)))
            q1 = min(31, int(xb[HALF + j] * inv + np.float32(16.5)))
            qh = pack_pair(row, o + 6, qh, j, q0, q1)
        write_qh(row, o + 2, qh)
