"""One tensor of a source checkpoint (safetensors, `.pth`), not yet converted.

Owns the dtypes the importers accept (F32, F16, BF16) and the one way to widen them to
float32. The raw data is a numpy view of a memory-mapped file: nothing is read from disk
until `to_f32()` (or `raw`) is touched, so a checkpoint larger than memory converts tensor
by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
