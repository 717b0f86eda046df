"""Reading PyTorch checkpoints (`consolidated.00.pth`, `pytorch_model.bin`) without torch.

A checkpoint saved by `torch.save` (PyTorch >= 1.6) is a zip: `ROOT/data.pkl` is a pickle of
the state dict, and each tensor's storage is the entry `ROOT/data/KEY`, stored uncompressed.
The pickle is read by a restricted unpickler that knows only the globals a state dict of
tensors needs (`torch._utils._rebuild_tensor_v2`, the typed storage classes, and
`collections.OrderedDict`); any other global is refused, so a malicious checkpoint cannot
run code. Storages are memory-mapped straight from the zip entries: no tensor is read until
it is converted.
"""

from __future__ import annotations

import collections
import mmap
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from llamachat.runtime.errors import UserError

from .checkpoint_tensor import STORED_DTYPES, CheckpointFile, CheckpointTensor

# torch storage class name -> our dtype name
STORAGE_DTYPES = {
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
}
_UNSUPPORTED_STORAGES = {"DoubleStorage", "LongStorage", "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage"}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _StorageRef:
    """A storage named by the pickle's persistent id: (dtype, zip entry key, element count)."""

    def __init__(self, dtype: str, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


class _LazyTensor:
    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("a tensor without a storage")
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    # nn.Parameter wrapping a tensor: the tensor is all we need
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _UNSUPPORTED_STORAGES:
            raise UserError(f"{self.path}: holds {name} tensors; only float32, float16 and bfloat16 checkpoints can be imported")
        raise UserError(f"{self.path}: the checkpoint refers to {module}.{name}, which a plain tensor checkpoint never needs; refusing to load it (it could run code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        return _StorageRef(STORAGE_DTYPES[stype.name], str(key), int(numel))


def _entry_data_offset(raw: mmap.mmap, info: zipfile.ZipInfo) -> int:
    """Where an entry's bytes start: after its local header, whose name and extra lengths may
    differ from the central directory's (torch pads the extra field to align the data)."""
    pos = info.header_offset
    if raw[pos:pos + 4] != b"PK\x03\x04":
        raise ValueError("bad local header")
    name_len, extra_len = struct.unpack("<HH", raw[pos + 26:pos + 30])
    return pos + 30 + name_len + extra_len


class PthFile(CheckpointFile):
    """`PthFile(path)`: `.names`, `.shape(name)`, `.tensor(name) -> CheckpointTensor`."""

    KIND = "a readable PyTorch checkpoint"

    def _open(self) -> None:
        if not zipfile.is_zipfile(self._file):
            raise self._bad("not a zip archive (checkpoints saved before PyTorch 1.6 are not supported; re-save it with a newer torch.save)")
        self._zip = zipfile.ZipFile(self._file)
        names = self._zip.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise self._bad("no data.pkl in the archive")
        self._root = pkl[0].rsplit("/", 1)[0]
        byteorder = f"{self._root}/byteorder"
        if byteorder in names and self._zip.read(byteorder).strip() not in (b"little", b""):
            raise self._bad("big-endian checkpoints are not supported")
        try:
            with self._zip.open(pkl[0]) as f:
                state = _RestrictedUnpickler(f, self.path).load()
        except UserError:
            raise
        except Exception as err:
            raise self._bad(f"data.pkl cannot be read ({err})") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # some trainers nest the state dict
        if not isinstance(state, dict):
            raise self._bad("data.pkl does not hold a state dict")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        for name, value in state.items():
            if isinstance(value, _LazyTensor):
                self._index[str(name)] = value  # a _LazyTensor
        self._storages: dict[str, np.ndarray] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._index[name].size

    def _storage(self, ref: _StorageRef) -> np.ndarray:
        arr = self._storages.get(ref.key)
        if arr is not None:
            return arr
        entry = f"{self._root}/data/{ref.key}"
        try:
            info = self._zip.getinfo(entry)
        except KeyError:
            raise self._bad(f"storage {entry} is missing") from None
        dtype = STORED_DTYPES[ref.dtype]
        if info.file_size < ref.numel * dtype.itemsize:
            raise self._bad(f"storage {entry} holds {info.file_size} bytes, {ref.numel * dtype.itemsize} expected (truncated?)")
        if info.compress_type == zipfile.ZIP_STORED:
            start = _entry_data_offset(self._mm, info)
            if start + info.file_size > len(self._mm):
                raise self._bad(f"storage {entry} runs past the end of the file (truncated?)")
            arr = np.frombuffer(self._mm, dtype=dtype, count=ref.numel, offset=start)
        else:  # never written by torch.save, but a re-zipped file may be compressed
            arr = np.frombuffer(self._zip.read(entry), dtype=dtype, count=ref.numel)
        self._storages[ref.key] = arr
        return arr

    def tensor(self, name: str) -> CheckpointTensor:
        t = self._index[name]
        storage = self._storage(t.storage)
        itemsize = storage.itemsize
        extent = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) + 1 if all(t.size) else t.offset
        if t.offset < 0 or any(s < 0 for s in t.stride) or extent > storage.size:
            raise self._bad(f"tensor {name!r} lies outside its storage")
        view = np.lib.stride_tricks.as_strided(
            storage[t.offset:], shape=t.size, strides=tuple(s * itemsize for s in t.stride), writeable=False
        )
        return CheckpointTensor(name, t.storage.dtype, t.size, view)
