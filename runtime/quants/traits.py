"""The record of one weight layout: what the engine needs to know about it, in one place
(ggml-cpu.c's `type_traits_cpu`). `runtime.quants.TRAITS` holds one per ggml type; it is the
only table that maps a type to its kernels.

Kernel signatures (numba; w uint8 [rows, row bytes], C-contiguous; ctx a
runtime.quants.matmul.KernelContext: the half-float table and the instruction set; xq int8, xd/xs
float32 the activations rounded to `vec_dot_type`, xhat float32 the same activations as floats;
see runtime.quants.matmul.quantize_activations):
  decode(w, ctx, xq [K], xd [K/32], xs [K/32], xhat [K], out [rows])         one token
  batch(w, ctx, xq [T, K], xd [T, K/32], xs [T, K/32], xhat [T, K], out [T, rows])
Each (row, token) of `batch` is `decode`'s float, bit for bit (one arithmetic for prompts and
generation).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

# activation formats: llama.cpp's vec_dot_type of each weight format (what x is rounded to)
ACT_F32, ACT_F16, ACT_BF16, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K = range(6)


class Traits(NamedTuple):
    ggml_type: object  # gguf.constants.GGMLQuantizationType
    block_size: int  # values per block (gguf's GGML_QUANT_SIZES)
    type_size: int  # bytes per block (likewise; for a repacked layout: per block of one row)
    vec_dot_type: int  # ACT_*
    dequantize_rows: Callable | None  # (raw uint8 [n, row bytes], out float32 [n, values]); quantize_rows likewise
    quantize_rows: Callable | None
    decode: Callable | None = None  # the one-token product (None: the tile path, float32 tiles and BLAS)
    batch: Callable | None = None  # the batch product (None: `decode` token by token)
    batch_rows: int = 1  # `batch` needs a multiple of this many rows
    kernel: int = -1  # the number runtime.quants.matmul.matvec_fused dispatches `decode` on (-1: none)
    packed: "Traits | None" = None  # the record of its interleaved layout, if it has one
    pack: Callable | None = None  # (rows [n, row bytes], out=None) -> rows in the `packed` layout
    # numba's CPU time to compile `batch`, relative to a block32 format's (1): only to split a
    # cold start's compile evenly between two processes (forward.compile_products); the
    # measured times behind each record's figure are in the commit that set it (Q4_K: the commit
    # after 118ef88)
    compile_cost: float = 1.0

    @property
    def name(self) -> str:
        return self.ggml_type.name
