"""Reading GGUF files: memory-mapped, lazy, and validated in full before anything is used.

`GGUFFile(path)` maps the file read-only, parses the header, the key/value metadata and the
tensor infos, and checks everything llama.cpp's gguf.cpp checks plus the gaps other readers
leave (counts against the file's size, lengths against the bytes remaining, key and name
rules, alignment, shapes, tensor types, data offsets inside the file). Any failure raises
`GGUFError(path, reason)`; a file that passed can be used without further checks: every
tensor's bytes lie inside the mapping, so touching them can never SIGBUS.

Tensor data is never copied: `TensorInfo.data()` is a read-only numpy view of the mapping.
The GGUF constants (value types, ggml types, block sizes) come from the `gguf` package.

File layout (little-endian; GGUF v2/v3):
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key | u32 value type | value)
    n_tensors x (string name | u32 n_dims | n_dims x i64 dim | u32 ggml type | u64 offset)
    padding to `general.alignment` (default 32) | tensor data (offsets relative to here)
    string = u64 length + bytes; array = u32 element type + u64 count + elements
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import GGUFError, UserError, shown, stat_regular_file

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20  # ours: no real file needs more, and it bounds the padding we trust
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL
INT64_MAX = (1 << 63) - 1
HEADER_BYTES = 4 + 4 + 8 + 8

# The smallest possible encodings, used to reject absurd counts before allocating anything:
# a key/value is a u64 length, at least one key byte, a u32 type and at least one value byte;
# a tensor info is a u64 length, one name byte, u32 n_dims, u32 type and u64 offset.
MIN_KV_BYTES = 8 + 1 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 4 + 8

# scalar value types -> (struct format, size)
_SCALAR = {
    GGUFValueType.UINT8: ("<B", 1),
    GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4),
    GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4),
    GGUFValueType.BOOL: ("<B", 1),
    GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
# numeric array element types -> numpy dtype (bool arrays are read as uint8 then != 0)
ARRAY_DTYPES = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_VALUE_TYPES = {int(t): t for t in GGUFValueType}
_GGML_TYPES = {int(t): t for t in GGMLQuantizationType}

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")


class _Invalid(Exception):
    """Raised inside the parser with the reason; turned into GGUFError(path, reason)."""


class TensorInfo:
    """One tensor: name, shape (ggml order: shape[0] is the row length), type and where its
    bytes are. `data()` and `rows()` are views of the file's mapping, never copies."""

    __slots__ = ("name", "shape", "ggml_type", "offset", "nbytes", "n_elements", "_file")

    def __init__(self, name, shape, ggml_type, offset, nbytes, n_elements, file):
        self.name: str = name
        self.shape: tuple[int, ...] = shape
        self.ggml_type: GGMLQuantizationType = ggml_type
        self.offset: int = offset  # absolute, from the start of the file
        self.nbytes: int = nbytes
        self.n_elements: int = n_elements
        self._file = file

    @property
    def row_nbytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return (self.shape[0] // block) * type_size if self.shape else type_size

    @property
    def n_rows(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    def data(self) -> np.ndarray:
        """The tensor's bytes: a read-only np.uint8 1-D view of the mapping."""
        buf = self._file._buffer()
        return buf[self.offset : self.offset + self.nbytes]

    def rows(self) -> np.ndarray:
        """The tensor's bytes as rows: np.uint8 [n_rows, row_nbytes] (a view)."""
        return self.data().reshape(self.n_rows, self.row_nbytes)

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, shape={self.shape}, type={self.ggml_type.name}, offset={self.offset}, nbytes={self.nbytes})"


class GGUFFile:
    """A validated, memory-mapped GGUF file. Use as a context manager or call close()."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.version: int = 0
        self.alignment: int = DEFAULT_ALIGNMENT
        self.file_size: int = 0
        self.data_offset: int = 0
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, GGUFValueType] = {}
        self.array_types: dict[str, GGUFValueType] = {}  # element type of each array key
        self.tensors: dict[str, TensorInfo] = {}
        self._mmap: mmap.mmap | None = None
        self._array: np.ndarray | None = None
        self._open()

    # ---- life cycle -------------------------------------------------------------------
    def _open(self) -> None:
        p = self.path
        self.file_size = stat_regular_file(p, "a GGUF file").st_size
        if self.file_size < HEADER_BYTES:
            raise GGUFError(p, f"the file is {self.file_size} bytes long, too short for a GGUF header ({HEADER_BYTES} bytes)")
        try:
            with open(p, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise UserError(f"{p}: cannot read the file ({e.strerror or e})") from None
        # the size that counts is the mapping's (the file could change between stat and mmap)
        self.file_size = len(self._mmap)
        try:
            self._parse(self._mmap)
        except _Invalid as e:
            self.close()
            raise GGUFError(p, str(e)) from None
        except BaseException:
            self.close()
            raise
        self._array = np.frombuffer(self._mmap, dtype=np.uint8)

    def close(self) -> None:
        self._array = None
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # tensor views handed out still use the mapping; it is released with them
                pass

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _buffer(self) -> np.ndarray:
        if self._array is None:
            raise ValueError(f"{self.path}: the GGUF file has been closed")
        return self._array

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, version={self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"

    # ---- parsing ----------------------------------------------------------------------
    def _parse(self, mm: mmap.mmap) -> None:
        size = len(mm)
        if mm[:4] != GGUF_MAGIC:
            raise _Invalid(f"it does not start with the GGUF magic (found {bytes(mm[:4])!r}, expected b'GGUF')")
        (version,) = _U32.unpack_from(mm, 4)
        if version == 1:
            raise _Invalid("GGUF version 1 is not supported (only versions 2 and 3)")
        if version not in (2, 3):
            # a big-endian file read as little-endian shows its small version in the high
            # bytes (3 reads as 0x03000000); gguf.cpp uses the same low-16-bits test
            if version and not version & 0xFFFF:
                swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
                raise _Invalid(f"version {version} looks like version {swapped} byte-swapped: probably a big-endian GGUF file, and only little-endian files are supported")
            raise _Invalid(f"unsupported GGUF version {version} (only versions 2 and 3)")
        self.version = version
        n_tensors, n_kv = struct.unpack_from("<QQ", mm, 8)
        room = size - HEADER_BYTES
        if n_tensors * MIN_TENSOR_INFO_BYTES + n_kv * MIN_KV_BYTES > room:
            raise _Invalid(f"the header claims {n_tensors} tensors and {n_kv} metadata keys, more than the file's {size} bytes can hold")

        pos = HEADER_BYTES

        def need(n: int, what: str) -> None:
            if n > size - pos:
                raise _Invalid(f"{what} runs past the end of the file at byte {size} (truncated?)")

        def read_string(what: str) -> bytes:
            nonlocal pos
            need(8, what)
            (n,) = _U64.unpack_from(mm, pos)
            pos += 8
            if n > size - pos:
                raise _Invalid(f"{what} has length {n}, more than the {size - pos} bytes left in the file")
            s = mm[pos : pos + n]
            pos += n
            return s

        def read_name(what: str, empty: str) -> tuple[bytes, str]:
            # a metadata key or tensor name: a non-empty UTF-8 string
            raw = read_string(what)
            if not raw:
                raise _Invalid(empty)
            try:
                return raw, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _Invalid(f"{what} ({raw[:64]!r}) is not valid UTF-8") from None

        # ---- key/value metadata
        metadata = self.metadata
        value_types = self.value_types
        for i in range(n_kv):
            _, key = read_name(f"metadata key #{i}", f"metadata key #{i} is empty")
            if key in metadata:
                raise _Invalid(f"duplicate metadata key {shown(key)}")
            need(4, f"the type of key {shown(key)}")
            (vt_raw,) = _U32.unpack_from(mm, pos)
            pos += 4
            vtype = _VALUE_TYPES.get(vt_raw)
            if vtype is None:
                raise _Invalid(f"key {shown(key)} has unknown value type {vt_raw}")
            if vtype == GGUFValueType.ARRAY:
                need(12, f"the array header of key {shown(key)}")
                et_raw, count = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                etype = _VALUE_TYPES.get(et_raw)
                if etype is None:
                    raise _Invalid(f"key {shown(key)} is an array of unknown value type {et_raw}")
                if etype == GGUFValueType.ARRAY:
                    raise _Invalid(f"key {shown(key)} is an array of arrays, which GGUF does not allow")
                if etype == GGUFValueType.STRING:
                    # each string is at least its u64 length
                    if count * 8 > size - pos:
                        raise _Invalid(f"key {shown(key)} claims {count} strings, more than the {size - pos} bytes left in the file")
                    value, pos = _read_string_array(mm, pos, count, size, key)
                else:
                    dtype = ARRAY_DTYPES[etype]
                    if count * dtype.itemsize > size - pos:
                        raise _Invalid(f"key {shown(key)} claims {count} {etype.name} items, more than the {size - pos} bytes left in the file")
                    arr = np.frombuffer(mm, dtype=dtype, count=count, offset=pos).copy()
                    pos += count * dtype.itemsize
                    value = arr != 0 if etype == GGUFValueType.BOOL else arr
                self.array_types[key] = etype
            elif vtype == GGUFValueType.STRING:
                value = read_string(f"the value of key {shown(key)}").decode("utf-8", "surrogateescape")
            else:
                fmt, n = _SCALAR[vtype]
                need(n, f"the value of key {shown(key)}")
                (value,) = struct.unpack_from(fmt, mm, pos)
                pos += n
                if vtype == GGUFValueType.BOOL:
                    value = value != 0
            metadata[key] = value
            value_types[key] = vtype

        if "general.alignment" in metadata:
            if value_types["general.alignment"] != GGUFValueType.UINT32:
                raise _Invalid(f"general.alignment must be a UINT32, not {value_types['general.alignment'].name}")
            a = metadata["general.alignment"]
            if a == 0 or a & (a - 1):
                raise _Invalid(f"general.alignment {a} is not a non-zero power of two")
            if a > MAX_ALIGNMENT:
                raise _Invalid(f"general.alignment {a} is larger than 1 MiB")
            self.alignment = a
        align = self.alignment

        # ---- tensor infos
        infos = []
        names = set()
        for i in range(n_tensors):
            raw_name, name = read_name(f"the name of tensor #{i}", f"tensor #{i} has an empty name")
            if len(raw_name) > MAX_NAME_BYTES:
                raise _Invalid(f"tensor name {name[:64]!r}... is {len(raw_name)} bytes long (at most {MAX_NAME_BYTES})")
            if name in names:
                raise _Invalid(f"duplicate tensor name {name!r}")
            names.add(name)
            need(4, f"the dimension count of tensor {name!r}")
            (n_dims,) = _U32.unpack_from(mm, pos)
            pos += 4
            if n_dims > MAX_DIMS:
                raise _Invalid(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            need(8 * n_dims + 4 + 8, f"the info of tensor {name!r}")
            shape = struct.unpack_from(f"<{n_dims}q", mm, pos)
            pos += 8 * n_dims
            (t_raw,) = _U32.unpack_from(mm, pos)
            (offset,) = _U64.unpack_from(mm, pos + 4)
            pos += 12
            for d in shape:
                if d < 0:
                    raise _Invalid(f"tensor {name!r} has a negative dimension ({d}) in shape {list(shape)}")
            n_elements = 1
            for d in shape:
                n_elements *= d
            if n_elements > INT64_MAX:
                raise _Invalid(f"tensor {name!r} has shape {list(shape)}: {n_elements} elements overflow int64")
            ggml_type = _GGML_TYPES.get(t_raw)
            if ggml_type is None or ggml_type not in GGML_QUANT_SIZES:
                raise _Invalid(f"tensor {name!r} has unknown ggml type {t_raw}")
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            if block <= 0 or type_size <= 0:
                raise _Invalid(f"tensor {name!r} has type {ggml_type.name} with no block size")
            row = shape[0] if shape else 1
            if row % block:
                raise _Invalid(f"tensor {name!r} of type {ggml_type.name} has a row length {row} that is not a multiple of the block size {block}")
            nbytes = n_elements // block * type_size
            if nbytes > INT64_MAX:
                raise _Invalid(f"tensor {name!r} has shape {list(shape)}: {nbytes} bytes overflow int64")
            if offset % align:
                raise _Invalid(f"tensor {name!r} data offset {offset} is not a multiple of the alignment {align}")
            infos.append((name, tuple(shape), ggml_type, offset, nbytes, n_elements))

        # ---- the data section: every tensor in order, apart, and wholly inside the file
        data_offset = -(-pos // align) * align
        if infos and data_offset > size:
            raise _Invalid(f"the tensor data section would start at byte {data_offset}, past the end of the file ({size} bytes): truncated")
        self.data_offset = min(data_offset, size)
        end_prev = 0
        prev_name = None
        for name, shape, ggml_type, offset, nbytes, n_elements in infos:
            if offset < end_prev:
                raise _Invalid(f"tensor {name!r} data at offset {offset} overlaps tensor {prev_name!r} (which ends at {end_prev}); offsets must increase in file order")
            start = data_offset + offset
            if start + nbytes > size:
                raise _Invalid(f"tensor {name!r} data (bytes {start}..{start + nbytes}) runs past the end of the file ({size} bytes): truncated")
            end_prev = offset + nbytes
            prev_name = name
            self.tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes, n_elements, self)


def _read_string_array(mm: mmap.mmap, pos: int, count: int, size: int, key: str) -> tuple[list[str], int]:
    """`count` GGUF strings from `pos`: the hot loop for vocabularies (tens of thousands)."""
    out = [""] * count
    unpack = _U64.unpack_from
    for i in range(count):
        if pos + 8 > size:
            raise _Invalid(f"string #{i} of key {shown(key)} runs past the end of the file at byte {size} (truncated?)")
        (n,) = unpack(mm, pos)
        pos += 8
        if n > size - pos:
            raise _Invalid(f"string #{i} of key {shown(key)} has length {n}, more than the {size - pos} bytes left in the file")
        # surrogateescape: token texts may hold bytes that are not UTF-8; they survive the
        # round trip (s.encode("utf-8", "surrogateescape")) instead of being replaced
        out[i] = mm[pos : pos + n].decode("utf-8", "surrogateescape")
        pos += n
    return out, pos
