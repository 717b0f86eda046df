"""Reading `.safetensors` files without the `safetensors` package: header JSON + mmap.

Layout: u64 little-endian header length N | N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}} | the data, offsets relative to its start.
Everything is checked against the file's size before a view is made, so a truncated or
corrupt file is refused with one sentence instead of crashing later.
"""

from __future__ import annotations

import json
import mmap
import struct

import numpy as np

from llamachat.runtime.errors import UserError

from .checkpoint_tensor import STORED_DTYPES, CheckpointFile, CheckpointTensor

MAX_HEADER_BYTES = 100 << 20  # the format's own limit


class SafetensorsFile(CheckpointFile):
    """`SafetensorsFile(path)`: `.names`, `.tensor(name) -> CheckpointTensor`, `.close()`."""

    KIND = "a valid safetensors file"

    def _open(self) -> None:
        size = self.path.stat().st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._bad("too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise self._bad(f"header length {n} does not fit in the file ({size} bytes)")
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._bad(f"header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_size = size - self.data_start
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"tensor {name!r} has no dtype/shape/data_offsets") from None
            if dtype not in STORED_DTYPES:
                raise UserError(f"{self.path}: tensor {name!r} has dtype {dtype}; only F32, F16 and BF16 checkpoints can be imported")
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if any(d < 0 for d in shape) or not (0 <= begin <= end <= data_size) or end - begin != count * STORED_DTYPES[dtype].itemsize:
                raise self._bad(f"tensor {name!r}: offsets {begin}..{end} do not hold a {dtype} {list(shape)} inside the file (truncated?)")
            self._index[name] = (dtype, shape, begin, end)
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._index[name][1]

    def tensor(self, name: str) -> CheckpointTensor:
        dtype, shape, begin, end = self._index[name]
        buf = np.frombuffer(self._mm, dtype=np.uint8, count=end - begin, offset=self.data_start + begin)
        return CheckpointTensor(name, dtype, shape, buf.view(STORED_DTYPES[dtype]).reshape(shape))
