"""One tensor of a source checkpoint (safetensors, `.pth`), not yet converted, and what the two
checkpoint readers share (`CheckpointFile`: opening, errors, names, closing).

Owns the dtypes the importers accept (F32, F16, BF16) and the one way to widen them to
float32. The raw data is a numpy view of a memory-mapped file: nothing is read from disk
until `to_f32()` (or `raw`) is touched, so a checkpoint larger than memory converts tensor
by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamachat.runtime.errors import UserError

# dtype name (safetensors spelling) -> numpy dtype of the stored elements. BF16 has no numpy
# dtype: it is kept as its raw uint16 bits and widened by a 16-bit shift.
STORED_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}


@dataclass
class CheckpointTensor:
    name: str
    dtype: str  # "F32" | "F16" | "BF16"
    shape: tuple[int, ...]  # numpy order: shape[0] = rows
    raw: np.ndarray  # elements as stored (BF16 as uint16 bits), already shaped

    def to_f32(self) -> np.ndarray:
        if self.dtype == "BF16":
            bits = np.asarray(self.raw, dtype=np.uint16).astype(np.uint32) << 16
            return bits.view(np.float32)
        return np.asarray(self.raw, dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return int(self.raw.size) * STORED_DTYPES[self.dtype].itemsize


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even (as torch's .to(torch.bfloat16));
    used by the tests' checkpoint builders."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


class CheckpointFile:
    """The frame of SafetensorsFile and PthFile: `Reader(path)` opens the file and runs the
    subclass's `_open()`, which checks it, fills `self._index` {name: what tensor(name)
    needs} and maps the data; the file is closed again if that fails. Errors are one sentence
    naming the file: `self._bad(reason)` says it is not a valid file of kind `KIND`."""

    KIND = "checkpoint"

    def __init__(self, path):
        self.path = Path(path)
        self._index: dict = {}
        try:
            self._file = open(self.path, "rb")
        except OSError as err:
            raise UserError(f"{self.path}: cannot open ({err.strerror})") from None
        try:
            self._open()
        except BaseException:
            self._file.close()
            raise

    def _open(self) -> None:
        raise NotImplementedError

    def _bad(self, reason: str) -> UserError:
        return UserError(f"{self.path}: not {self.KIND}: {reason}")

    @property
    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def close(self) -> None:
        # views handed out keep the mapping alive; closing the file object is always safe
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
