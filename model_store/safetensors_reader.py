"""Reading `.safetensors` files without the `safetensors` package: header JSON + mmap.

Layout: u64 little-endian header length N | N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}} | the data, offsets relative to its start.
Everything is checked against the file's size before a view is made, so a truncated or
corrupt file is refused with one sentence instead of crashing later.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct

import numpy as np

from llamachat.runtime.errors import UserError, shown

from .checkpoint_tensor import STORED_DTYPES, CheckpointFile, CheckpointTensor

MAX_HEADER_BYTES = 100 << 20  # the format's own limit


class SafetensorsFile(CheckpointFile):
    """`SafetensorsFile(path)`: `.names`, `.tensor(name) -> CheckpointTensor`, `.close()`."""

    KIND = "a valid safetensors file"

    def _open(self) -> None:
        import stat

        st = os.fstat(self._file.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise self._bad("not a regular file")
        size = st.st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._bad("too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise self._bad(f"header length {n} does not fit in the file ({size} bytes)")
        try:
            header = json.loads(self._file.read(n))
        except RecursionError:
            raise self._bad("header is nested too deeply to be a safetensors header") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._bad(f"header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        self.metadata = metadata if isinstance(metadata, dict) else {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        spans = []
        for name, info in header.items():
            shown_name = shown(name)
            if not isinstance(info, dict):
                raise self._bad(f"tensor {shown_name} has no dtype/shape/data_offsets")
            dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise self._bad(f"tensor {shown_name} has shape {shown(shape)}, not a list of non-negative whole numbers")
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
                raise self._bad(f"tensor {shown_name} has data_offsets {shown(offsets)}, not two whole numbers")
            if not isinstance(dtype, str) or dtype not in STORED_DTYPES:
                what = dtype if isinstance(dtype, str) and len(dtype) <= 20 else shown(dtype)
                raise UserError(f"{self.path}: tensor {shown_name} has dtype {what}; only F32, F16 and BF16 checkpoints can be imported")
            begin, end = offsets
            count = math.prod(shape)  # Python integers: a product past int64 cannot wrap round
            if not (0 <= begin <= end <= data_size) or end - begin != count * STORED_DTYPES[dtype].itemsize:
                raise self._bad(f"tensor {shown_name}: offsets {begin}..{end} do not hold a {dtype} {shape} inside the file (truncated?)")
            self._index[name] = (dtype, tuple(shape), begin, end)
            spans.append((begin, end, name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._bad(f"tensors {shown(n0)} and {shown(n1)} overlap (bytes {b1}..{e0} belong to both)")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._index[name][1]

    def tensor(self, name: str) -> CheckpointTensor:
        dtype, shape, begin, end = self._index[name]
        buf = np.frombuffer(self._mm, dtype=np.uint8, count=end - begin, offset=self.data_start + begin)
        return CheckpointTensor(name, dtype, shape, buf.view(STORED_DTYPES[dtype]).reshape(shape))
