"""The checkpoint readers: safetensors (header + mmap) and torch zip checkpoints read with
the restricted unpickler, against files written by tests/import_fixtures.py."""

from __future__ import annotations

import json
import mmap
import struct
import zipfile

import numpy as np
import pytest

from import_fixtures import bf16_to_f32, stored, write_safetensors, write_torch_checkpoint
from llamachat.model_store.pth_reader import PthFile
from llamachat.model_store.safetensors_reader import SafetensorsFile
from llamachat.runtime.errors import UserError


def _arrays():
    rng = np.random.default_rng(1)
    return {
        "a": rng.standard_normal((5, 7)).astype(np.float32),
        "b": rng.standard_normal((3,)).astype(np.float32),
        "c": rng.standard_normal((4, 6)).astype(np.float32),
    }


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_safetensors_round_trip(tmp_path, dtype):
    arrays = _arrays()
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {n: (dtype, stored(a, dtype)) for n, a in arrays.items()})
    with SafetensorsFile(path) as f:
        assert f.names == list(arrays)
        for n, a in arrays.items():
            t = f.tensor(n)
            assert t.shape == a.shape and t.dtype == dtype
            expect = bf16_to_f32(stored(a, dtype)) if dtype == "BF16" else stored(a, dtype).astype(np.float32)
            np.testing.assert_array_equal(t.to_f32(), expect)


def test_bf16_widening_is_exact():
    bits = np.array([0x3F80, 0xC000, 0x7F80, 0x0001, 0x4049], dtype=np.uint16)  # 1, -2, inf, tiny, ~3.14
    from llamachat.model_store.checkpoint_tensor import CheckpointTensor

    got = CheckpointTensor("x", "BF16", (5,), bits).to_f32()
    assert got[0] == 1.0 and got[1] == -2.0 and np.isinf(got[2])
    assert got[3] == np.float32(2.0 ** -133) and got[4] == np.float32(3.140625)


def test_safetensors_truncated_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": ("F32", np.ones((100, 10), np.float32))})
    data = path.read_bytes()
    path.write_bytes(data[:-16])
    with pytest.raises(UserError, match=r"x\.safetensors: not a valid safetensors file: tensor 'a'.*truncated"):
        SafetensorsFile(path)


def test_safetensors_other_dtype_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    header = json.dumps({"a": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(UserError, match="dtype I64; only F32, F16 and BF16"):
        SafetensorsFile(path)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_pth_round_trip_with_strided_tensor(tmp_path, dtype):
    arrays = _arrays()
    path = tmp_path / "consolidated.00.pth"
    write_torch_checkpoint(path, {n: (dtype, stored(a, dtype)) for n, a in arrays.items()}, transpose={"c"})
    with PthFile(path) as f:
        assert f.names == list(arrays)
        for n, a in arrays.items():
            t = f.tensor(n)
            assert t.shape == a.shape and t.dtype == dtype
            expect = bf16_to_f32(stored(a, dtype)) if dtype == "BF16" else stored(a, dtype).astype(np.float32)
            np.testing.assert_array_equal(t.to_f32(), expect)


def test_pth_data_is_memory_mapped_not_copied(tmp_path):
    path = tmp_path / "m.pth"
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    write_torch_checkpoint(path, {"a": ("F32", a)})
    with PthFile(path) as f:
        raw = f.tensor("a").raw
        assert not raw.flags.owndata and not raw.flags.writeable
        base = raw
        while not isinstance(base, memoryview):  # ndarray views, as_strided's DummyArray
            base = base.base
        assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def test_pth_hostile_global_is_refused_without_running(tmp_path, monkeypatch):
    import os

    calls = []
    monkeypatch.setattr(os, "system", lambda cmd: calls.append(cmd))
    path = tmp_path / "evil.pth"
    write_torch_checkpoint(path, {"a": ("F32", np.ones(4, np.float32))}, extra_global=("os", "system"))
    with pytest.raises(UserError, match=r"evil\.pth: the checkpoint refers to os\.system.*refusing"):
        PthFile(path)
    assert calls == []


def test_pth_not_a_zip(tmp_path):
    path = tmp_path / "old.pth"
    path.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(UserError, match="not a zip archive"):
        PthFile(path)


def test_pth_missing_storage(tmp_path):
    path = tmp_path / "m.pth"
    write_torch_checkpoint(path, {"a": ("F16", np.ones(4, np.float16))})
    broken = tmp_path / "broken.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("data/0"):
                dst.writestr(info, src.read(info))
    with PthFile(broken) as f, pytest.raises(UserError, match="storage consolidated/data/0 is missing"):
        f.tensor("a")


def test_pth_written_by_real_torch(tmp_path):
    """tests/data/torch_2.13_state_dict.pth was written by PyTorch 2.13.0 (CPU) with:

        vals = lambda n, scale, shift: (torch.arange(n, dtype=torch.float32) % 29 - 14) * scale + shift
        base = vals(48, 0.125, 0.0).reshape(6, 8)
        torch.save(OrderedDict(f32=vals(12, .25, 1.).reshape(3, 4), f16=vals(20, .5, -1.).reshape(4, 5).half(),
                   bf16=vals(16, .125, .5).reshape(2, 8).bfloat16(), transposed=base.t(), rows_2_to_4=base[2:5],
                   base=base, param=nn.Parameter(vals(5, 1., 0.)), norm=torch.ones(8, dtype=torch.bfloat16)), path)

    (torch is not a dependency; the file is the real format, with storage alignment, a
    shared storage at an offset, a transposed view and a Parameter.)"""
    from pathlib import Path

    def vals(n, scale, shift):
        return ((np.arange(n, dtype=np.float32) % 29 - 14) * scale + shift).astype(np.float32)

    base = vals(48, 0.125, 0.0).reshape(6, 8)
    want = {
        "f32": ("F32", vals(12, 0.25, 1.0).reshape(3, 4)),
        "f16": ("F16", vals(20, 0.5, -1.0).reshape(4, 5)),
        "bf16": ("BF16", vals(16, 0.125, 0.5).reshape(2, 8)),
        "transposed": ("F32", base.T),
        "rows_2_to_4": ("F32", base[2:5]),
        "base": ("F32", base),
        "param": ("F32", vals(5, 1.0, 0.0)),
        "norm": ("BF16", np.ones(8, np.float32)),
    }
    with PthFile(Path(__file__).parent / "data" / "torch_2.13_state_dict.pth") as f:
        assert f.names == list(want)
        for name, (dtype, values) in want.items():
            t = f.tensor(name)
            assert (t.dtype, t.shape) == (dtype, values.shape), name
            np.testing.assert_array_equal(t.to_f32(), values, err_msg=name)
