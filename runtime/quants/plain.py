"""The unblocked float formats F32, F16 and BF16 (numpy, and numba for F16 -> F32, which numpy
does slowly).

Layouts: F32 = 4-byte IEEE single per value; F16 = 2-byte IEEE half per value;
BF16 = the upper 16 bits of the float32 (ggml_bf16_t).
Conversions follow ggml: F32->F16 rounds to nearest even (GGML_FP32_TO_FP16 == numpy's
astype); F32->BF16 is ggml_compute_fp32_to_bf16 (round to nearest even, NaN forced quiet).
Each `dequantize_X(raw, out)` / `quantize_X(x, out)` works on whole 2-D row arrays.
"""

import numpy as np
from numba import njit

F16_MAGIC = np.float32(2.0**-14)  # subtracting it turns a denormal half's rebased bits into its value


@njit(cache=True, nogil=True)
def dequantize_f16_row(row, y):
    """One row of halves (raw bytes) -> float32, bit-exact (NaN payloads aside): the half's
    fields are moved into float32 position with integer selects (vectorizable), then the
    denormals, rebased to 2^-14 * (1 + m/1024), get 2^-14 subtracted."""
    h = row.view(np.uint16)
    u = y.view(np.uint32)
    for i in range(h.shape[0]):
        x = np.uint32(h[i])
        o = (x & np.uint32(0x7FFF)) << np.uint32(13)
        e = o & np.uint32(0x0F800000)
        o += np.uint32(112 << 23)  # rebias the exponent 15 -> 127
        o = o + np.uint32(112 << 23) if e == np.uint32(0x0F800000) else o  # inf / NaN: exponent 255
        o = o + np.uint32(1 << 23) if e == np.uint32(0) else o  # zero / denormal: see below
        u[i] = o | ((x & np.uint32(0x8000)) << np.uint32(16))
    for i in range(h.shape[0]):
        x = np.uint32(h[i])
        if (x & np.uint32(0x7C00)) == np.uint32(0):
            v = abs(y[i]) - F16_MAGIC
            y[i] = -v if x & np.uint32(0x8000) else v


def dequantize_f32(raw, out):
    out[...] = raw.view(np.float32)


def quantize_f32(x, out):
    out.view(np.float32)[...] = x


F16_DENORM_MAGIC = np.float32(0.5)  # bits ((127 - 15) + (23 - 10) + 1) << 23: adding it rounds a tiny value to a half denormal


@njit(cache=True, nogil=True)
def quantize_f16_row(x, row):
    """One row float32 -> halves, round to nearest even like GGML_FP32_TO_FP16 (NaN -> 0x7E00):
    integer arithmetic on the bits for normal halves (add 0xFFF + the lowest kept bit, shift),
    and for denormals a float add of 0.5 that leaves the rounded half mantissa in the low bits.
    numpy's own cast is right too, but slow."""
    u = x.view(np.uint32)
    h = row.view(np.uint16)
    tmp = np.empty(x.shape[0], np.float32)
    for i in range(x.shape[0]):
        tmp[i] = abs(x[i]) + F16_DENORM_MAGIC
    t = tmp.view(np.uint32)
    for i in range(x.shape[0]):
        f = u[i] & np.uint32(0x7FFFFFFF)
        sign = (u[i] >> np.uint32(16)) & np.uint32(0x8000)
        normal = (f + np.uint32(((15 - 127) << 23) + 0xFFF) + ((f >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        denormal = t[i] - np.uint32(0x3F000000)
        big = np.uint32(0x7E00) if f > np.uint32(0x7F800000) else np.uint32(0x7C00)
        o = big if f >= np.uint32(0x47800000) else (denormal if f < np.uint32(0x38800000) else normal)
        h[i] = o | sign


def dequantize_bf16(raw, out):
    out.view(np.uint32)[...] = raw.view(np.uint16).astype(np.uint32) << 16


def quantize_bf16(x, out):
    u = x.view(np.uint32).astype(np.uint64)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    bits = np.where(is_nan, (u >> 16) | 64, rounded)
    out.view(np.uint16)[...] = bits.astype(np.uint16)
