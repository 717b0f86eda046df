"""The unblocked float formats F32, F16 and BF16 (numpy: each is one vectorized conversion).

Layouts: F32 = 4-byte IEEE single per value; F16 = 2-byte IEEE half per value;
BF16 = the upper 16 bits of the float32 (ggml_bf16_t).
Conversions follow ggml: F32->F16 rounds to nearest even (GGML_FP32_TO_FP16 == numpy's
astype); F32->BF16 is ggml_compute_fp32_to_bf16 (round to nearest even, NaN forced quiet).
Each `dequantize_X(raw, out)` / `quantize_X(x, out)` works on whole 2-D row arrays.
"""

import numpy as np


def dequantize_f32(raw, out):
    out[...] = raw.view(np.float32)


def quantize_f32(x, out):
    out.view(np.float32)[...] = x


def dequantize_f16(raw, out):
    out[...] = raw.view(np.float16)


def quantize_f16(x, out):
    out.view(np.float16)[...] = x  # numpy's float32->float16 cast is round-to-nearest-even


def dequantize_bf16(raw, out):
    out.view(np.uint32)[...] = raw.view(np.uint16).astype(np.uint32) << 16


def quantize_bf16(x, out):
    u = x.view(np.uint32).astype(np.uint64)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    bits = np.where(is_nan, (u >> 16) | 64, rounded)
    out.view(np.uint16)[...] = bits.astype(np.uint16)
