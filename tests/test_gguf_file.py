"""The GGUF reader and writer: the malformed-file corpus, a fuzz test, round trips."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T
from gguf.constants import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamachat.runtime.errors import GGUFError, UserError
from llamachat.runtime.gguf.reader import GGUFFile
from llamachat.runtime.gguf.writer import write_gguf

sys.path.insert(0, str(Path(__file__).parent))
from gguf_corpus import MALFORMED, kv_u32, valid_base  # noqa: E402


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ---- the malformed corpus ---------------------------------------------------------------


def test_corpus_is_large_and_distinct():
    ids = [c[0] for c in MALFORMED]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    assert len({c[2] for c in MALFORMED}) == len(MALFORMED), "two cases expect the same error"


@pytest.mark.parametrize("case_id, make, reason", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_file_is_refused_with_its_reason(tmp_path, case_id, make, reason):
    path = _write(tmp_path, f"{case_id}.gguf", make())
    with pytest.raises(GGUFError) as info:
        GGUFFile(path)
    assert info.value.reason == reason
    assert str(info.value) == f"{path}: not a valid GGUF file: {reason}"
    assert info.value.exit_code == 2


def test_valid_base_opens_and_its_data_is_where_it_was_written(tmp_path):
    raw = valid_base()
    path = _write(tmp_path, "ok.gguf", raw.build())
    with GGUFFile(path) as g:
        assert g.version == 3 and g.alignment == 32 and g.data_offset == 512
        assert g.metadata["general.name"] == "tiny test"
        assert g.metadata["tokenizer.ggml.tokens"] == ["<s>", "</s>", "a", "b"]
        np.testing.assert_array_equal(g.metadata["tokenizer.ggml.scores"], np.array([0, 0, -1, -2], np.float32))
        assert g.value_types["tokenizer.ggml.tokens"] == V.ARRAY and g.array_types["tokenizer.ggml.tokens"] == V.STRING
        assert list(g.tensors) == ["token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"]
        q = g.tensors["blk.0.attn_q.weight"]
        assert q.shape == (32, 32) and q.ggml_type == T.Q8_0 and q.n_elements == 1024 and q.nbytes == 32 * 34
        assert q.rows().shape == (32, 34)
        # the builder fills tensor i's bytes with (i*7 + j) % 251
        np.testing.assert_array_equal(q.data()[:10], (7 + np.arange(10)) % 251)
        assert not q.data().flags.writeable


def test_version_2_is_accepted(tmp_path):
    raw = valid_base()
    raw.version = 2
    with GGUFFile(_write(tmp_path, "v2.gguf", raw.build())) as g:
        assert g.version == 2 and len(g.tensors) == 3


def test_alignment_is_honoured(tmp_path):
    raw = valid_base()
    raw.kvs.append(kv_u32("general.alignment", 256))
    raw.alignment = 256
    with GGUFFile(_write(tmp_path, "a256.gguf", raw.build())) as g:
        assert g.alignment == 256 and g.data_offset % 256 == 0
        assert all((t.offset - g.data_offset) % 256 == 0 for t in g.tensors.values())


def test_missing_file_and_directory_get_one_sentence(tmp_path):
    with pytest.raises(UserError) as info:
        GGUFFile(tmp_path / "nope.gguf")
    assert str(info.value) == f"{tmp_path / 'nope.gguf'}: no such file"
    with pytest.raises(UserError) as info:
        GGUFFile(tmp_path)
    assert str(info.value) == f"{tmp_path} is a directory, not a GGUF file"


def test_huge_counts_fail_fast_without_allocating(tmp_path):
    import time
    import tracemalloc

    raw = valid_base()
    raw.n_kv = 1 << 62
    path = _write(tmp_path, "huge.gguf", raw.build())
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(GGUFError):
        GGUFFile(path)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # a loop over 2^62 keys would never end: any bound proves it fails fast (generous: shared CI machines)
    assert elapsed < 30.0 and peak < 1 << 20


def test_closed_file_refuses_new_views_but_old_views_stay_valid(tmp_path):
    path = _write(tmp_path, "ok.gguf", valid_base().build())
    g = GGUFFile(path)
    view = g.tensors["token_embd.weight"].data()
    g.close()
    assert view[:3].tolist() == [0, 1, 2]  # still mapped: the view keeps the mapping alive
    with pytest.raises(ValueError):
        g.tensors["token_embd.weight"].data()


# ---- fuzzing: mutate a small valid file; only GGUFError may come out ---------------------

_BASE = valid_base()
_BASE_BYTES = _BASE.build()
_FIELDS = list(_BASE.fields)  # (position, size) of every count, length, type, dim, offset
_INTERESTING = [0, 1, 2, 3, 4, 5, 31, 32, 33, 63, 64, 255, 4096, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(_BASE_BYTES) - 1), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(_BASE_BYTES) - 1), st.just(0)),
    st.tuples(st.just("field"), st.sampled_from(range(len(_FIELDS))), st.one_of(st.sampled_from(_INTERESTING), st.integers(0, (1 << 64) - 1))),
    st.tuples(st.just("insert"), st.integers(0, len(_BASE_BYTES)), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, len(_BASE_BYTES) - 1), st.integers(1, 16)),
)


def _mutate(data: bytes, mutations) -> bytes:
    b = bytearray(data)
    for kind, where, what in mutations:
        if kind == "flip" and where < len(b):
            b[where] ^= what
        elif kind == "truncate":
            del b[where:]
        elif kind == "field":
            pos, size = _FIELDS[where]
            if pos + size <= len(b):
                b[pos : pos + size] = (what & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        elif kind == "insert":
            b[min(where, len(b)) : min(where, len(b))] = bytes([what])
        elif kind == "delete":
            del b[where : where + what]
    return bytes(b)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzzed_files_give_only_the_clean_error(tmp_path, mutations):
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(_mutate(_BASE_BYTES, mutations))
    try:
        g = GGUFFile(path)
    except GGUFError as err:
        assert str(err).startswith(f"{path}: not a valid GGUF file: ") and "\n" not in str(err)
        return
    # accepted: then every tensor lies wholly inside the file, and reading it is safe
    with g:
        size = os.path.getsize(path)
        for t in g.tensors.values():
            assert g.data_offset <= t.offset and t.offset + t.nbytes <= size
            assert t.data().nbytes == t.nbytes
            block, type_size = GGML_QUANT_SIZES[t.ggml_type]
            assert t.nbytes == t.n_elements // block * type_size
            int(t.data().sum())


# ---- the writer ---------------------------------------------------------------------------


def test_write_gguf_round_trip_of_every_value_type(tmp_path):
    metadata = {
        "general.architecture": "llama",
        "general.name": "ünïcode ✓",
        "a.u8": 200, "a.i8": -100, "a.u16": 60000, "a.i16": -30000, "a.u32": 4_000_000_000, "a.i32": -5,
        "a.u64": 1 << 40, "a.i64": -(1 << 40), "a.f32": 0.5, "a.f64": 1e-300, "a.bool": True,
        "a.inferred_int": 7, "a.inferred_big": 1 << 50, "a.inferred_neg": -(1 << 40), "a.inferred_float": 1.25,
        "arr.str": ["x", "", "ü"], "arr.empty_str": [], "arr.i32": np.array([1, -2, 3], np.int32),
        "arr.f32": np.array([0.5, -1.5], np.float32), "arr.bool": np.array([True, False]), "arr.u8": np.arange(5, dtype=np.uint8),
        "arr.f64": np.array([1e-300]), "arr.list_int": [1, 2, 3], "arr.empty_f32": np.zeros(0, np.float32),
    }
    value_types = {"a.u8": V.UINT8, "a.i8": V.INT8, "a.u16": V.UINT16, "a.i16": V.INT16, "a.u32": V.UINT32, "a.i32": V.INT32,
                   "a.u64": V.UINT64, "a.i64": V.INT64, "a.f32": V.FLOAT32, "a.f64": V.FLOAT64}
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 64)).astype(np.float32)
    q8 = rng.integers(0, 256, (2, 2 * 34), dtype=np.uint8)
    tensors = [
        ("w.f32", (64, 3), T.F32, f32),
        ("w.q8", (64, 2), T.Q8_0, lambda: q8.tobytes()),
        ("w.f16", (7,), T.F16, np.arange(7, dtype=np.float16)),
    ]
    path = write_gguf(tmp_path / "rt.gguf", metadata, tensors, value_types=value_types, alignment=64)
    assert sorted(os.listdir(tmp_path)) == ["rt.gguf"]  # no temp file left behind
    with GGUFFile(path) as g:
        assert g.alignment == 64 and g.metadata["general.alignment"] == 64
        for key, vt in value_types.items():
            assert g.value_types[key] == vt
        assert g.value_types["a.inferred_int"] == V.UINT32 and g.value_types["a.inferred_big"] == V.UINT64
        assert g.value_types["a.inferred_neg"] == V.INT64 and g.value_types["a.inferred_float"] == V.FLOAT32
        assert g.value_types["a.bool"] == V.BOOL and g.metadata["a.bool"] is True
        for key, value in metadata.items():
            got = g.metadata[key]
            if isinstance(value, np.ndarray):
                assert got.dtype == value.dtype and np.array_equal(got, value), key
            elif isinstance(value, list) and value and isinstance(value[0], int):
                assert got.tolist() == value and got.dtype == np.int32
            elif key == "a.f32":
                assert got == 0.5
            else:
                assert got == value, key
        assert g.array_types["arr.empty_str"] == V.STRING and g.array_types["arr.bool"] == V.BOOL
        np.testing.assert_array_equal(g.tensors["w.f32"].data().view(np.float32).reshape(3, 64), f32)
        np.testing.assert_array_equal(g.tensors["w.q8"].rows(), q8)
        np.testing.assert_array_equal(g.tensors["w.f16"].data().view(np.float16), np.arange(7, dtype=np.float16))
        assert all((t.offset - g.data_offset) % 64 == 0 for t in g.tensors.values())
        # written files round-trip through the writer again, byte for byte
        again = write_gguf(tmp_path / "again.gguf", g.metadata, [(t.name, t.shape, t.ggml_type, t.data()) for t in g.tensors.values()],
                           value_types=g.value_types, array_types=g.array_types)
    assert again.read_bytes() == path.read_bytes()


def test_write_gguf_failure_leaves_nothing_behind(tmp_path):
    target = tmp_path / "bad.gguf"
    target.write_bytes(b"previous")
    with pytest.raises(ValueError, match="expected"):
        write_gguf(target, {"general.architecture": "llama"}, [("t", (32,), T.F32, b"\0" * 4)])
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"] and target.read_bytes() == b"previous"
    with pytest.raises(ValueError, match="multiple of the Q8_0 block size"):
        write_gguf(target, {}, [("t", (33,), T.Q8_0, b"")])


def test_writer_output_is_read_by_gguf_py(tmp_path):
    import gguf

    path = write_gguf(tmp_path / "x.gguf", {"general.architecture": "llama", "l.list": ["a", "b"]},
                      [("t", (32, 2), T.Q4_1, bytes(range(40)))])
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["l.list"].contents() == ["a", "b"]
    assert bytes(np.asarray(r.tensors[0].data).view(np.uint8).reshape(-1)) == bytes(range(40))


# ---- the real model -------------------------------------------------------------------------


@pytest.mark.real_model
def test_smollm2_matches_gguf_py_and_round_trips(smollm2_path, tmp_path):
    import time

    import gguf

    g = GGUFFile(smollm2_path)  # opening speed is measured by bench/, not asserted here
    with g:
        r = gguf.GGUFReader(smollm2_path)
        keys = [k for k in r.fields if not k.startswith("GGUF.")]
        assert list(g.metadata) == keys
        for k in keys:
            f, v = r.fields[k], g.metadata[k]
            assert g.value_types[k] == f.types[0]
            if isinstance(v, np.ndarray):
                assert np.array_equal(v, np.array(f.contents())), k
            elif isinstance(v, float):
                assert np.float32(v) == np.float32(f.contents()), k
            else:
                assert v == f.contents(), k
        assert len(g.tensors) == len(r.tensors) == 272
        for rt in r.tensors:
            t = g.tensors[rt.name]
            assert t.shape == tuple(int(d) for d in rt.shape) and t.ggml_type == rt.tensor_type
            assert t.offset == rt.data_offset and t.nbytes == rt.n_bytes and t.n_elements == rt.n_elements
        emb = g.tensors["token_embd.weight"]
        data = emb.data()  # a view of the mapping, not a copy
        assert not data.flags.owndata and np.shares_memory(data, g._buffer())
        assert np.array_equal(emb.rows()[5], np.asarray(r.tensors[[t.name for t in r.tensors].index(emb.name)].data)[5].view(np.uint8))
        out = write_gguf(tmp_path / "copy.gguf", g.metadata, ((t.name, t.shape, t.ggml_type, t.data()) for t in g.tensors.values()),
                         value_types=g.value_types, array_types=g.array_types)
    # the writer lays files out exactly as llama.cpp's converter did
    assert out.stat().st_size == smollm2_path.stat().st_size
    with open(out, "rb") as a, open(smollm2_path, "rb") as b:
        while True:
            x, y = a.read(1 << 22), b.read(1 << 22)
            assert x == y
            if not x:
                break


def test_own_constants_equal_gguf_py():
    """runtime.gguf.constants copies gguf-py's numbers (importing gguf-py costs every start
    about 50 ms): each enum has the same members and values, and the block sizes are the same."""
    import gguf.constants as theirs

    from llamachat.runtime.gguf import constants as ours

    for name in ("GGMLQuantizationType", "GGUFValueType", "LlamaFileType", "TokenType"):
        assert {m.name: int(m) for m in getattr(ours, name)} == {m.name: int(m) for m in getattr(theirs, name)}, name
    assert {int(k): v for k, v in ours.GGML_QUANT_SIZES.items()} == {int(k): v for k, v in theirs.GGML_QUANT_SIZES.items()}
    assert ours.QK_K == theirs.QK_K
    assert ours.GGMLQuantizationType.Q4_K == theirs.GGMLQuantizationType.Q4_K  # interchangeable as keys
    assert theirs.GGML_QUANT_SIZES[ours.GGMLQuantizationType.Q6_K] == ours.GGML_QUANT_SIZES[theirs.GGMLQuantizationType.Q6_K]


def test_starting_the_app_and_engine_does_not_import_gguf_py():
    import subprocess

    code = ("import sys, llamachat.tui.cli, llamachat.tui.app, llamachat.tui.engine_worker, "
            "llamachat.runtime.generation.llama_api, llamachat.runtime.model.model; "
            "print(sorted(m for m in sys.modules if m == 'gguf' or m.startswith('gguf.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
