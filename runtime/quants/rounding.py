"""ggml's scalar conversions and rounding rules, as numba functions the format kernels share.

- `fp16_to_fp32(bits)`: an IEEE half (given as its 16 bits) to float32, exact.
- `fp32_to_fp16_bits(x)`: float32 to half bits, round-to-nearest-even: what GGML_FP32_TO_FP16
  does (F16C `_cvtss_sh(x, 0)` or ggml's software fallback, which agree), and what numpy's
  `astype(np.float16)` does.
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


# for half exponents e = -14..15 (index e + 14): 2^e, and the scale 2^(10 - e) that puts the
# mantissa of a value in [2^e, 2^(e+1)) into 1024..2048 (exact: a power-of-two product)
_POW2_F16_NORMAL = np.array([2.0 ** (k - 14) for k in range(30)])
_POW2_F16_SCALE = np.array([2.0 ** (10 - (k - 14)) for k in range(30)])


@njit(cache=True)
def fp32_to_fp16_bits(x):
    a = float(x)  # float64 holds every float32 exactly, and the scalings below are exact
    if a != a:
        return np.int32(0x7E00)
    sign = np.int32(0)
    if a < 0.0 or (a == 0.0 and math.copysign(1.0, a) < 0.0):
        sign = np.int32(0x8000)
    a = abs(a)
    if a >= 65520.0:  # halfway between 65504 (max half) and 65536 rounds (to even) to inf
        return sign | np.int32(0x7C00)
    if a < 6.103515625e-05:  # below 2^-14: subnormal half, step 2^-24
        return sign | np.int32(np.rint(a * 16777216.0))
    # a = 1.f * 2^e with e in -14..15: find e by binary search over the powers of two
    lo = 0
    hi = 29
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if a >= _POW2_F16_NORMAL[mid]:
            lo = mid
        else:
            hi = mid - 1
    e = lo - 14
    mant = np.int32(np.rint(a * _POW2_F16_SCALE[lo]))  # 1024..2048; 2048 carries into the exponent
    return sign | (((e + 15) << 10) + mant - 1024)


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
