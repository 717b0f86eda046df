"""Q5_0: blocks of 32 values, one scale, 5-bit quants offset by 16 (x = d * (q - 16)).

block_q5_0 (22 bytes): d    f16         bytes 0..1
                       qh   uint32 LE   bytes 2..5: bit j = 5th bit of value j (j < 32)
                       qs   16 B        bytes 6..21: low nibble of qs[j] = value j,
                                                     high nibble of qs[j] = value j + 16
quantize is quantize_row_q5_0_ref: d = (the value of largest magnitude) / -16,
q = min(31, (int8)(x / d + 16.5)).
"""

from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange

from .simd import (_ZERO8, _half, _i8, _lane_accumulate, _lanes_finish, _lanes_signed, _load, _vec, row_kernels)
from .block32 import Layout32, fifth_bit_values, row_converters, vnni_kernels

QK, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_0]
LAYOUT = Layout32(BLOCK_BYTES, m=0, qh=2, qs=6, offset=16, nmax=31)  # the fields above
# ggml's dequantize_row_q5_0 and quantize_row_q5_0_ref (above), compiled for LAYOUT
dequantize_row, quantize_row = row_converters(LAYOUT, __name__)


# --- the product with Q8_0 activations (ggml's AVX2 vec_dot_q5_0_q8_0) ---------------------

def _values(builder, blk):
    """ggml's qx = nibbles | (~fifth bit & 0xF0): the 32 values less 16 as signed bytes."""
    return fifth_bit_values(builder, blk, LAYOUT, 0, 0xF0)


def _dot_body(builder, blk, y, scales, state):
    qy = _load(builder, y, _vec(_i8, 32), 0)
    lanes = _lanes_signed(builder, _values(builder, blk), qy)
    return [_lane_accumulate(builder, scales[0], lanes, state[0])]  # (scales[0]: d * d_y, d_at=0)


def _unpack_shifted(builder, blk):
    """A block's scale and its values less 16, + 128, as unsigned bytes (runtime.quants.simd.tile_kernel)."""
    return _half(builder, blk, 0), builder.xor(_values(builder, blk), ir.Constant(_vec(_i8, 32), [128 - 256] * 32))



dot, rows = row_kernels(BLOCK_BYTES, 1, [_ZERO8], _dot_body, _lanes_finish, d_at=0)


@njit(cache=True, parallel=True)
def matvec(w, ctx, xq, xd, xs, xhat, out):
    """As ggml's AVX2 vec_dot_q5_0_q8_0: Q8_0's lanes and order."""
    for r in prange(w.shape[0]):
        out[r] = dot(w, r, xq, xd, ctx.isa)


matmat = vnni_kernels("Q5_0", BLOCK_BYTES, _unpack_shifted, rows)  # the batch product (runtime.quants.block32.matmat)
