"""Writing GGUF files (v3, little-endian), atomically: quantize, import and the tests use it.

`write_gguf` writes to a temporary file in the target's directory, fsyncs it and renames it
into place, so a reader never sees a half-written model. Tensor data is laid out the way
llama.cpp lays it out: each tensor at an offset that is a multiple of the alignment, packed
in the order given, the data section starting at the first aligned byte after the header.

Metadata value types: taken from `value_types` when given (what `GGUFFile.value_types`
holds, so a read file round-trips), else inferred: bool -> BOOL, int -> UINT32 (INT32 when
negative, UINT64/INT64 when it does not fit), float -> FLOAT32, str -> STRING, list of str
-> array of STRING, numpy array -> array of its dtype, list of numbers -> INT32/INT64 or
FLOAT32 array. A tensor's data may be bytes, a numpy array, or a zero-argument callable
returning either (called only when the tensor is written, so a large model is never held
in memory whole).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Union

import numpy as np
from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..atomic_file import atomic_output
from .reader import ARRAY_DTYPES, DEFAULT_ALIGNMENT, GGUF_MAGIC

GGUF_VERSION = 3
TensorData = Union[bytes, bytearray, memoryview, np.ndarray, Callable[[], Any]]

_SCALAR_FMT = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<B",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_DTYPE_TO_VTYPE = {np.dtype(np.bool_): GGUFValueType.BOOL}
_DTYPE_TO_VTYPE.update({dt.newbyteorder("="): vt for vt, dt in ARRAY_DTYPES.items() if vt != GGUFValueType.BOOL})


def _string(s: str | bytes) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _infer_scalar(value: Any) -> GGUFValueType:
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, np.generic):
        vt = _DTYPE_TO_VTYPE.get(value.dtype.newbyteorder("="))
        if vt is not None:
            return vt
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if 0 <= v < 1 << 32:
            return GGUFValueType.UINT32
        if -(1 << 31) <= v < 0:
            return GGUFValueType.INT32
        if v > 0:
            if v >= 1 << 64:
                raise ValueError(f"integer {v} does not fit in 64 bits")
            return GGUFValueType.UINT64
        if v < -(1 << 63):
            raise ValueError(f"integer {v} does not fit in 64 bits")
        return GGUFValueType.INT64
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, (str, bytes)):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple, np.ndarray)):
        return GGUFValueType.ARRAY
    raise TypeError(f"cannot store a {type(value).__name__} in GGUF metadata")


def _array_element_type(value: Any) -> GGUFValueType:
    if isinstance(value, np.ndarray):
        vt = _DTYPE_TO_VTYPE.get(value.dtype.newbyteorder("=") if value.dtype.kind != "b" else np.dtype(np.bool_))
        if vt is None:
            raise TypeError(f"cannot store a numpy {value.dtype} array in GGUF metadata")
        return vt
    items = list(value)
    if all(isinstance(x, (str, bytes)) for x in items):
        return GGUFValueType.STRING  # includes the empty list
    if all(isinstance(x, (bool, np.bool_)) for x in items):
        return GGUFValueType.BOOL
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items):
        if all(-(1 << 31) <= int(x) < 1 << 31 for x in items):
            return GGUFValueType.INT32
        return GGUFValueType.INT64
    if all(isinstance(x, (int, float, np.integer, np.floating)) for x in items):
        return GGUFValueType.FLOAT32
    raise TypeError("cannot store a list of mixed types in GGUF metadata")


def _encode_value(vtype: GGUFValueType, value: Any, elem_type: GGUFValueType | None = None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value)
    if vtype == GGUFValueType.ARRAY:
        et = _array_element_type(value) if elem_type is None else GGUFValueType(int(elem_type))
        if et == GGUFValueType.ARRAY:
            raise TypeError("GGUF does not allow arrays of arrays")
        head = struct.pack("<IQ", int(et), len(value))
        if et == GGUFValueType.STRING:
            return head + b"".join(_string(s) for s in value)
        dtype = ARRAY_DTYPES[et]
        arr = np.asarray(value)
        if et == GGUFValueType.BOOL:
            arr = arr != 0
        return head + np.ascontiguousarray(arr, dtype=dtype).tobytes()
    if vtype == GGUFValueType.BOOL:
        return struct.pack("<B", 1 if value else 0)
    v = float(value) if vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64) else int(value)
    return struct.pack(_SCALAR_FMT[vtype], v)


def tensor_nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    n = 1
    for d in shape:
        n *= int(d)
    row = int(shape[0]) if len(shape) else 1
    if row % block:
        raise ValueError(f"row length {row} is not a multiple of the {ggml_type.name} block size {block}")
    return n // block * type_size


def _as_bytes(data: TensorData) -> memoryview:
    if callable(data):
        data = data()
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data)).cast("B")
    return memoryview(data).cast("B")


def write_gguf(
    path: str | os.PathLike,
    metadata: dict[str, Any],
    tensors: Iterable[tuple[str, tuple[int, ...], GGMLQuantizationType | int, TensorData]],
    value_types: dict[str, GGUFValueType] | None = None,
    alignment: int = DEFAULT_ALIGNMENT,
    array_types: dict[str, GGUFValueType] | None = None,
) -> Path:
    """Write a GGUF v3 file atomically; returns the path. `array_types` (optional, as in
    `GGUFFile.array_types`) fixes the element type of array keys, e.g. for empty arrays."""
    path = Path(path)
    value_types = dict(value_types or {})
    array_types = dict(array_types or {})
    if "general.alignment" in metadata:
        alignment = int(metadata["general.alignment"])
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment {alignment} is not a power of two")
    meta = dict(metadata)
    if alignment != DEFAULT_ALIGNMENT or "general.alignment" in meta:
        meta["general.alignment"] = alignment
        value_types["general.alignment"] = GGUFValueType.UINT32

    entries = []
    for name, shape, ggml_type, data in tensors:
        ggml_type = GGMLQuantizationType(int(ggml_type))
        shape = tuple(int(d) for d in shape)
        entries.append((name, shape, ggml_type, tensor_nbytes(shape, ggml_type), data))

    head = bytearray()
    head += GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(entries), len(meta))
    for key, value in meta.items():
        vtype = value_types.get(key)
        if vtype is None:  # not `or`: UINT8 is 0
            vtype = _infer_scalar(value)
        vtype = GGUFValueType(int(vtype))
        head += _string(key) + struct.pack("<I", int(vtype))
        head += _encode_value(vtype, value, array_types.get(key))

    offset = 0
    for name, shape, ggml_type, nbytes, _ in entries:
        head += _string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
        head += struct.pack("<IQ", int(ggml_type), offset)
        offset += -(-nbytes // alignment) * alignment
    head += b"\0" * (-len(head) % alignment)

    with atomic_output(path, mode=0o644) as f:  # readable by other users, as models are shared
        f.write(head)
        for name, shape, ggml_type, nbytes, data in entries:
            raw = _as_bytes(data)
            if raw.nbytes != nbytes:
                raise ValueError(f"tensor {name!r}: {raw.nbytes} bytes of data given, {nbytes} expected for {ggml_type.name} {list(shape)}")
            f.write(raw)
            f.write(b"\0" * (-nbytes % alignment))
    return path
