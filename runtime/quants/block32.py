"""What the 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1) share, as inlined numba helpers:
the range of a block, and the 5th bits of Q5_0/Q5_1, kept as one little-endian uint32 `qh`
where bit j belongs to value j (j < 32). Each format module keeps its own layout, dequantize
and quantize; these are only the steps that are the same in both of a pair.
"""

import numpy as np
from numba import njit

FLT_MAX = np.float32(3.4028234663852886e38)


@njit(cache=True, inline='always')
def min_max(n, x):
    """(min, max) of x[:n], as quantize_row_q4_1_ref/q5_1_ref find them (from +-FLT_MAX)."""
    vmin = FLT_MAX
    vmax = -FLT_MAX
    for j in range(n):
        if x[j] < vmin:
            vmin = x[j]
        if x[j] > vmax:
            vmax = x[j]
    return vmin, vmax


@njit(cache=True, inline='always')
def read_qh(row, o):
    """The uint32 of 5th bits at row[o:o+4] (little-endian), as int64."""
    return (np.int64(row[o]) | (np.int64(row[o + 1]) << 8) | (np.int64(row[o + 2]) << 16)
            | (np.int64(row[o + 3]) << 24))


@njit(cache=True, inline='always')
def write_qh(row, o, qh):
    for k in range(4):
        row[o + k] = np.uint8((qh >> (8 * k)) & 0xFF)


@njit(cache=True, inline='always')
def high_bits(qh, j):
    """The 5th bits of values j and j + 16 (j < 16), each at bit 4 (0 or 0x10)."""
    return np.int32((qh >> j) << 4) & 0x10, np.int32(qh >> (j + 12)) & 0x10


@njit(cache=True, inline='always')
def pack_pair(row, o, qh, j, q0, q1):
    """Store 5-bit quants q0 (value j) and q1 (value j + 16): their low nibbles in the byte
    row[o + j], their 5th bits added to qh, which is returned."""
    row[o + j] = np.uint8((q0 & 0xF) | ((q1 & 0xF) << 4))
    qh |= ((q0 & 0x10) >> 4) << j
    qh |= ((q1 & 0x10) >> 4) << (j + 16)
    return qh
