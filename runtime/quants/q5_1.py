"""Q5_1: blocks of 32 values, a scale and a minimum, 5-bit quants (x = d * q + m).

block_q5_1 (24 bytes): d    f16         bytes 0..1
                       m    f16         bytes 2..3
                       qh   uint32 LE   bytes 4..7: bit j = 5th bit of value j (j < 32)
                       qs   16 B        bytes 8..23: low nibble of qs[j] = value j,
                                                     high nibble of qs[j] = value j + 16
quantize is quantize_row_q5_1_ref: d = (max - min) / 31, m = min,
q = (uint8)((x - min) / d + 0.5) (no clamp in ggml; clamped at 31 the bits are the same,
runtime.quants.block32.row_converters).

Products: `dot`/`rows` (ggml's AVX2 vec_dot_q5_1_q8_1) against Q8_1 activations, whose
per-block sums carry the minimum's term.
"""

from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .block32 import Layout32, fifth_bit_values, min_products, row_converters

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_1]
LAYOUT = Layout32(BLOCK_BYTES, m=2, qh=4, qs=8, offset=0, nmax=31)  # the fields above
# ggml's dequantize_row_q5_1 and quantize_row_q5_1_ref (above), compiled for LAYOUT
dequantize_row, quantize_row = row_converters(LAYOUT, __name__)


# --- the product with Q8_1 activations (ggml's AVX2 vec_dot_q5_1_q8_1) ---------------------

def _values(builder, blk):
    """ggml's qx = nibbles | (fifth bit & 0x10): the values 0..31 as unsigned bytes."""
    return fifth_bit_values(builder, blk, LAYOUT, 0x10, 0)


# w = d*q + m, as ggml's AVX2 vec_dot_q5_1_q8_1 (see min_kernels)
dot, rows, matvec, matmat = min_products("Q5_1", BLOCK_BYTES, _values, __name__)
