"""ggml's scalar conversions and rounding rules, as numba functions the format kernels share.

- `fp16_to_fp32(bits)`: an IEEE half (given as its 16 bits) to float32, exact.
- `round_to_f16(x)`: x rounded to the nearest half (ties to even), as float32: what
  GGML_FP32_TO_FP16 does (F16C `_cvtss_sh(x, 0)` or ggml's software fallback, which agree), and
  what numpy's `astype(np.float16)` does; `fp32_to_fp16_bits(x)` the same half as its 16 bits.
- `F16_TABLE`: every half bit pattern as float32 (numpy's conversion), for table lookups.
- `read_f16(row, offset)`: the little-endian half at row[offset:offset+2], as float32;
  `read_f16_pair(row, offset)` the two at row[offset:offset+4] (a block's d and m/dmin).
- `write_f16(row, offset, x)`: round x to half (RNE), store it, and return the stored value as
  float32: ggml's quantizers keep computing with GGML_FP16_TO_FP32(y.d), the rounded scale.
- `nearest_int(x)`: ggml's `nearest_int` (adds 1.5*2^23 in float32: round half to even).
- `roundf(x)`: C's roundf (half away from zero), used by the Q8 quantizers.

All arithmetic on float32 values stays float32 where ggml's C does (numba promotes float32 op
python-float to float64, so constants are wrapped in np.float32 at the call sites).
"""

import math

import numpy as np
from numba import njit


# 2^(e - 25) for a half's exponent field e: a normal half is (1024 + mantissa) * 2^(e - 25).
# A table lookup, because math.ldexp is a library call that costs more than the rest of a
# block's dequantization.
_POW2_HALF_EXP = np.array([2.0 ** (e - 25) for e in range(32)])


@njit(cache=True)
def fp16_to_fp32(h):
    h = np.int32(h)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = m * 5.9604644775390625e-08  # subnormal: m * 2^-24
    elif e == 31:
        v = math.inf if m == 0 else math.nan
    else:
        v = float(m | 0x400) * _POW2_HALF_EXP[e]
    if h & 0x8000:
        v = -v
    return np.float32(v)


@njit(cache=True)
def read_f16(row, offset):
    return fp16_to_fp32(np.int32(row[offset]) | (np.int32(row[offset + 1]) << 8))


@njit(cache=True)
def read_f16_pair(row, offset):
    """The two halves at row[offset:offset+4] as float32: a block's (d, m) or (d, dmin)."""
    return read_f16(row, offset), read_f16(row, offset + 2)


F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, inline="always")
def round_to_f16(x):
    ax = abs(x)
    if ax == 0.0 or not math.isfinite(x):
        return np.float32(x)
    if ax >= 65520.0:  # halfway between 65504 (max half) and 65536 rounds (to even) to inf
        return np.float32(math.copysign(math.inf, x))
    if ax < 6.103515625e-05:  # half subnormals: a fixed quantum of 2**-24
        return np.float32(np.rint(x * 16777216.0) / 16777216.0)
    m, e = math.frexp(x)  # x = m * 2**e, 0.5 <= |m| < 1: 11 significant bits in a half
    return np.float32(math.ldexp(np.rint(m * 2048.0), e - 11))


@njit(cache=True)
def fp32_to_fp16_bits(x):
    if x != x:
        return np.int32(0x7E00)
    y = float(round_to_f16(x))  # a half's value (or +-inf), exactly
    sign = np.int32(0x8000) if math.copysign(1.0, y) < 0.0 else np.int32(0)
    a = abs(y)
    if a == math.inf:
        return sign | np.int32(0x7C00)
    if a < 6.103515625e-05:  # below 2^-14: subnormal half, step 2^-24
        return sign | np.int32(a * 16777216.0)
    m, e = math.frexp(a)  # a = m * 2**e, m in [0.5, 1): exponent field e + 14, 10 mantissa bits
    return sign | np.int32(((e + 14) << 10) + np.int32(m * 2048.0) - 1024)


@njit(cache=True)
def write_f16(row, offset, x):
    h = fp32_to_fp16_bits(x)
    row[offset] = np.uint8(h & 0xFF)
    row[offset + 1] = np.uint8((h >> 8) & 0xFF)
    return fp16_to_fp32(h)


@njit(cache=True)
def nearest_int(x):
    return np.int32(np.rint(x))


@njit(cache=True)
def roundf(x):
    a = math.floor(abs(float(x)) + 0.5)
    return -a if x < 0 else a
