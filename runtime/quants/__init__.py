"""Weight formats, one module per ggml format (its layout drawn once, dequantize, quantize, its
product kernels, its repacked layout), and TRAITS, one record per type (runtime.quants.traits):
the only table that maps a type to its kernels and activation type.

    from llamachat.runtime.quants import dequantize, quantize, row_nbytes, TRAITS
    dequantize(raw_uint8, ggml_type, n_per_row) -> np.float32 [n_rows, n_per_row]
    quantize(x_f32_2d, ggml_type) -> np.uint8 [n_rows, row_nbytes]   (byte-exact with ggml)
    row_nbytes(ggml_type, n_per_row) -> int
    TRAITS (alias FORMATS): dict[GGMLQuantizationType, Traits]

Adding a format: its module, its place in _BLOCK_KINDS below, its record in TRAITS (the row
drivers and runtime.quants.matmul.matvec_fused find its kernels there).

`Traits.dequantize_rows(raw_2d_uint8, out_2d_f32)` and `Format.quantize_rows(x_2d_f32,
out_2d_uint8)` run the kernels (numba for the block formats, parallel over rows) writing into
caller-provided C-contiguous arrays, so the engine can dequantize a weight tile into a reused
buffer. Inside numba code, call a module's `dequantize_row(row_u8, y_f32)` directly.
Block and type sizes come from runtime.gguf.constants.GGML_QUANT_SIZES (gguf-py's table).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit, prange, types
from numba.extending import NativeValue, models, overload, register_model, typeof_impl, unbox

from . import plain, q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0
from .traits import ACT_BF16, ACT_F16, ACT_F32, ACT_Q8_0, ACT_Q8_1, ACT_Q8_K, Traits

T = GGMLQuantizationType


# The block formats' `kind` numbers, which the two row drivers below dispatch on (each module
# has serial `dequantize_row(row, y)` and `quantize_row(x, row)`); F16 <-> F32 share them as
# the last kind. The kind is passed as a BlockKind, whose numba type carries the number: each
# kind compiles (and is cached) apart with its own converter only, so a model compiles the
# converters of its formats, not of all eleven.
_BLOCK_KINDS = (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, plain)


class BlockKind:
    """A block kind (an index into _BLOCK_KINDS) as the row drivers take it."""

    __slots__ = ("kind",)

    def __init__(self, kind: int):
        self.kind = kind


class BlockKindType(types.Dummy):
    def __init__(self, kind: int):
        self.kind = kind
        super().__init__(name=f"BlockKind({kind})")


@typeof_impl.register(BlockKind)
def _typeof_block_kind(val, c):
    return BlockKindType(val.kind)


register_model(BlockKindType)(models.OpaqueModel)


@unbox(BlockKindType)
def _unbox_block_kind(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())


def _convert_row(kind, src, dst, direction):  # typed by _convert_row_of_kind below
    raise NotImplementedError


@overload(_convert_row, prefer_literal=True)
def _convert_row_of_kind(kind, src, dst, direction):
    """src -> dst through the row converter of `kind` (a BlockKind: only that format's converter
    is compiled), direction "dequantize" (row -> y) or "quantize" (x -> row)."""
    if not isinstance(kind, BlockKindType) or not isinstance(direction, types.StringLiteral):
        return None
    module = _BLOCK_KINDS[kind.kind]
    if direction.literal_value == "dequantize":
        convert = plain.dequantize_f16_row if module is plain else module.dequantize_row
    else:
        convert = plain.quantize_f16_row if module is plain else module.quantize_row

    def impl(kind, src, dst, direction):
        convert(src, dst)
    return impl


@njit(cache=True, parallel=True)
def _dequantize_block_rows(kind, raw, out):
    for r in prange(raw.shape[0]):
        _convert_row(kind, raw[r], out[r], "dequantize")


@njit(cache=True, nogil=True)
def _quantize_block_rows(kind, x, out):
    for r in range(x.shape[0]):
        _convert_row(kind, x[r], out[r], "quantize")


def read_only_view(a: np.ndarray) -> np.ndarray:
    """A read-only view: numba compiles read-only and writable arrays separately, and weights
    come from a read-only memory map, so every input is passed read-only (one compilation)."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _block_dequantizer(kind: int):
    kind = BlockKind(kind)

    def dequantize_rows(raw, out):
        _dequantize_block_rows(kind, read_only_view(raw), out)
    return dequantize_rows


def _block_quantizer(kind: int):
    kind = BlockKind(kind)

    def quantize_rows(x, out):
        # quantizing is per row and costly (the K-quant searches): rows are split over threads
        # (the numba kernel releases the GIL), which needs no parallel compilation
        global _pool
        x = read_only_view(x)
        n_threads = min(available_cores(), max(1, x.shape[0] // 16))
        if n_threads == 1:
            _quantize_block_rows(kind, x, out)
            return
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=available_cores(), thread_name_prefix="llamachat-quantize")
        bounds = np.linspace(0, x.shape[0], n_threads + 1).astype(int)
        jobs = [_pool.submit(_quantize_block_rows, kind, x[a:b], out[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for job in jobs:
            job.result()
    return quantize_rows


def _record(t, vec_dot_type, dequantize_rows, quantize_rows, **kernels) -> Traits:
    block_size, type_size = GGML_QUANT_SIZES[t]
    return Traits(t, block_size, type_size, vec_dot_type, dequantize_rows, quantize_rows, **kernels)


def _block(t, vec_dot_type, module, **kernels) -> Traits:
    """A format whose rows the two row drivers convert (module: its kind)."""
    kind = _BLOCK_KINDS.index(module)
    return _record(t, vec_dot_type, _block_dequantizer(kind), _block_quantizer(kind), **kernels)


def _packed(t, vec_dot_type, module, compile_cost: float = 1.0) -> Traits:
    """The record of t's interleaved layout (module.pack's): kernels only (the packed copy is
    only multiplied, never converted)."""
    return _record(t, vec_dot_type, None, None, decode=module.matvec_x8, batch=module.matmat_x8, batch_rows=8,
                   compile_cost=compile_cost)


def _number_kernels(table: dict) -> dict:
    """Give each one-token kernel (a record's, and its packed layout's) the number matvec_fused
    dispatches on."""
    numbered, n = {}, 0
    for t, tr in table.items():
        if tr.decode is not None:
            tr, n = tr._replace(kernel=n), n + 1
        if tr.packed is not None:
            tr, n = tr._replace(packed=tr.packed._replace(kernel=n)), n + 1
        numbered[t] = tr
    return numbered


TRAITS: dict[GGMLQuantizationType, Traits] = _number_kernels({
    T.F32: _record(T.F32, ACT_F32, plain.dequantize_f32, plain.quantize_f32, decode=plain.matvec_f32),
    T.F16: _block(T.F16, ACT_F16, plain, decode=plain.matvec_f16, batch=plain.matmat_f16),
    T.BF16: _record(T.BF16, ACT_BF16, plain.dequantize_bf16, plain.quantize_bf16),
    T.Q8_0: _block(T.Q8_0, ACT_Q8_0, q8_0, decode=q8_0.matvec, batch=q8_0.matmat),
    T.Q4_0: _block(T.Q4_0, ACT_Q8_0, q4_0, decode=q4_0.matvec, batch=q4_0.matmat,
                   packed=_packed(T.Q4_0, ACT_Q8_0, q4_0), pack=q4_0.pack),
    T.Q4_1: _block(T.Q4_1, ACT_Q8_1, q4_1, decode=q4_1.matvec, batch=q4_1.matmat,
                   packed=_packed(T.Q4_1, ACT_Q8_1, q4_1), pack=q4_1.pack),
    T.Q5_0: _block(T.Q5_0, ACT_Q8_0, q5_0, decode=q5_0.matvec, batch=q5_0.matmat),
    T.Q5_1: _block(T.Q5_1, ACT_Q8_1, q5_1, decode=q5_1.matvec, batch=q5_1.matmat),
    T.Q2_K: _block(T.Q2_K, ACT_Q8_K, q2_k),
    T.Q3_K: _block(T.Q3_K, ACT_Q8_K, q3_k),
    T.Q4_K: _block(T.Q4_K, ACT_Q8_K, q4_k, decode=q4_k.matvec, batch=q4_k.matmat, compile_cost=1.5,
                   packed=_packed(T.Q4_K, ACT_Q8_K, q4_k, compile_cost=1.5), pack=q4_k.pack),
    T.Q5_K: _block(T.Q5_K, ACT_Q8_K, q5_k, decode=q5_k.matvec, batch=q5_k.matmat),
    T.Q6_K: _block(T.Q6_K, ACT_Q8_K, q6_k, decode=q6_k.matvec, batch=q6_k.matmat),
})
FORMATS = TRAITS  # (the name quantize_model and the tests know it by)
# every one-token kernel's record, by its number
KERNELS = tuple(sorted([tr for tr in TRAITS.values() if tr.decode is not None]
                       + [tr.packed for tr in TRAITS.values() if tr.packed is not None], key=lambda tr: tr.kernel))


def get_format(ggml_type) -> Traits:
    """The Format for a ggml type (int or GGMLQuantizationType); ValueError naming the supported
    ones if there is none (callers that face a user's file turn that into a ModelError)."""
    try:
        t = GGMLQuantizationType(int(ggml_type))
    except ValueError:
        raise ValueError(f"unknown ggml type {ggml_type}") from None
    fmt = FORMATS.get(t)
    if fmt is None:
        supported = ", ".join(f.name for f in FORMATS.values())
        raise ValueError(f"ggml type {t.name} is not supported (supported: {supported})")
    return fmt


def row_nbytes(ggml_type, n_per_row: int) -> int:
    """Bytes of one row of n_per_row values; ValueError if n_per_row is not whole blocks."""
    fmt = get_format(ggml_type)
    if n_per_row % fmt.block_size:
        raise ValueError(f"a {fmt.name} row needs a multiple of {fmt.block_size} values, not {n_per_row}")
    return n_per_row // fmt.block_size * fmt.type_size


def dequantize(raw: np.ndarray, ggml_type, n_per_row: int) -> np.ndarray:
    """Rows of raw ggml data (uint8, 1-D or 2-D) -> float32 [n_rows, n_per_row]."""
    fmt = get_format(ggml_type)
    nbytes = row_nbytes(fmt.ggml_type, n_per_row)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.reshape(-1).view(np.uint8)
    if raw.size % nbytes:
        raise ValueError(f"{raw.size} bytes are not whole {fmt.name} rows of {n_per_row} values")
    rows = np.ascontiguousarray(raw.reshape(-1, nbytes))
    out = np.empty((rows.shape[0], n_per_row), dtype=np.float32)
    fmt.dequantize_rows(rows, out)
    return out


def quantize(x: np.ndarray, ggml_type) -> np.ndarray:
    """float rows [n_rows, n_per_row] (1-D = one row) -> uint8 [n_rows, row_nbytes], byte for
    byte what ggml's quantize_row_*_ref / quantize_* (no imatrix) write."""
    fmt = get_format(ggml_type)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    elif x.ndim != 2:
        x = x.reshape(-1, x.shape[-1])
    out = np.empty((x.shape[0], row_nbytes(fmt.ggml_type, x.shape[1])), dtype=np.uint8)
    fmt.quantize_rows(x, out)
    return out
