"""`llamachat quantize` / runtime.gguf.quantize_model: llama-quantize's per-tensor type choices, the
bytes (SmolLM2 against llama.cpp's per-tensor sha256 in shared/reference), and the refusals
and failure paths that must leave no partial output."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from llamachat.runtime.errors import UserError
from llamachat.runtime.gguf.reader import GGUFFile
from llamachat.runtime.gguf.writer import write_gguf
from llamachat.runtime.gguf.quantize_model import QUANT_TYPES, plan_tensor_types, quantize_model
from llamachat.runtime.quants import dequantize, quantize
from llamachat.tui.cli import main

N_LAYER = 16


def tiny_llama(path, n_embd=256, n_ff=512, n_vocab=64, n_layer=N_LAYER, tied=True, seed=0):
    """A llama-shaped GGUF with random F32 weights (shapes in ggml order)."""
    rng = np.random.default_rng(seed)
    meta = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "general.file_type": 0,
        "llama.block_count": n_layer,
        "llama.embedding_length": n_embd,
        "llama.feed_forward_length": n_ff,
        "llama.attention.head_count": 8,
        "llama.attention.head_count_kv": 2,
        "llama.context_length": 128,
    }
    shapes = {"token_embd.weight": (n_embd, n_vocab), "output_norm.weight": (n_embd,)}
    if not tied:
        shapes["output.weight"] = (n_embd, n_vocab)
    for i in range(n_layer):
        for name, shape in (("attn_norm", (n_embd,)), ("attn_q", (n_embd, n_embd)), ("attn_k", (n_embd, n_embd // 4)),
                            ("attn_v", (n_embd, n_embd // 4)), ("attn_output", (n_embd, n_embd)),
                            ("ffn_norm", (n_embd,)), ("ffn_gate", (n_embd, n_ff)), ("ffn_up", (n_embd, n_ff)),
                            ("ffn_down", (n_ff, n_embd))):
            shapes[f"blk.{i}.{name}.weight"] = shape
    tensors = {name: (rng.standard_normal(shape[::-1]) * 0.02).astype(np.float32) for name, shape in shapes.items()}
    write_gguf(path, meta, [(n, shapes[n], T.F32, a) for n, a in tensors.items()])
    return tensors


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---- the type choices (llama_tensor_get_type) ---------------------------------------------


def types_of(path, quant_type, **kw):
    with GGUFFile(path) as g:
        return {p.name: p.dst_type for p in plan_tensor_types(g, quant_type, **kw)}


def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def test_plans_follow_llama_quantize_mixes(tmp_path):
    src = tmp_path / "tiny.gguf"
    tiny_llama(src)
    n = N_LAYER
    t = types_of(src, "Q4_K_M")
    assert t["output_norm.weight"] == T.F32 and t["blk.3.attn_norm.weight"] == T.F32
    assert t["token_embd.weight"] == T.Q6_K  # tied: token_embd is treated as the output tensor
    for i in range(n):
        more = use_more_bits(i, n)
        assert t[f"blk.{i}.attn_v.weight"] == (T.Q6_K if more else T.Q4_K)
        assert t[f"blk.{i}.ffn_down.weight"] == (T.Q6_K if more else T.Q4_K)
        assert t[f"blk.{i}.attn_q.weight"] == T.Q4_K and t[f"blk.{i}.ffn_up.weight"] == T.Q4_K
    t = types_of(src, "Q3_K_M")
    assert [t[f"blk.{i}.attn_v.weight"] for i in range(3)] == [T.Q5_K, T.Q5_K, T.Q4_K]
    assert t["blk.0.ffn_down.weight"] == T.Q5_K and t["blk.1.ffn_down.weight"] == T.Q4_K  # i < n/16
    assert t["blk.5.attn_output.weight"] == T.Q4_K and t["blk.5.attn_q.weight"] == T.Q3_K
    t = types_of(src, "Q3_K_L")
    assert t["blk.7.attn_v.weight"] == T.Q5_K and t["blk.7.ffn_down.weight"] == T.Q5_K
    assert t["blk.7.attn_output.weight"] == T.Q5_K
    t = types_of(src, "Q3_K_S")
    assert {t[f"blk.{i}.{w}.weight"] for i in range(n) for w in ("attn_v", "ffn_down", "attn_q")} == {T.Q3_K}
    t = types_of(src, "Q2_K")  # n_gqa = 8/2 = 4 -> attn_v Q4_K
    assert t["blk.0.attn_v.weight"] == T.Q4_K and t["blk.0.ffn_down.weight"] == T.Q3_K
    assert t["blk.0.attn_output.weight"] == T.Q3_K and t["blk.0.attn_q.weight"] == T.Q2_K
    t = types_of(src, "Q4_K_S")
    assert [t[f"blk.{i}.attn_v.weight"] for i in range(5)] == [T.Q5_K] * 4 + [T.Q4_K]
    assert [t[f"blk.{i}.ffn_down.weight"] for i in range(3)] == [T.Q5_K, T.Q5_K, T.Q4_K]  # i < n/8
    t = types_of(src, "Q5_K_M")
    assert t["blk.0.attn_v.weight"] == T.Q6_K and t["blk.3.attn_v.weight"] == T.Q5_K
    t = types_of(src, "Q8_0")
    assert t["token_embd.weight"] == T.Q8_0 and t["blk.0.attn_v.weight"] == T.Q8_0
    t = types_of(src, "F16")
    assert t["token_embd.weight"] == T.F16 and t["output_norm.weight"] == T.F32


def test_pure_and_leave_output_tensor(tmp_path):
    src = tmp_path / "untied.gguf"
    tiny_llama(src, tied=False)
    t = types_of(src, "Q4_K_M")
    assert t["output.weight"] == T.Q6_K and t["token_embd.weight"] == T.Q4_K  # untied: token_embd keeps the default
    t = types_of(src, "Q4_K_M", pure=True)
    assert {t[n] for n in t if n.endswith("weight") and "norm" not in n} == {T.Q4_K}
    t = types_of(src, "Q4_K_M", leave_output_tensor=True)
    assert t["output.weight"] == T.F32


def test_fallback_where_rows_are_not_whole_256_blocks(tmp_path):
    src = tmp_path / "narrow.gguf"
    tiny_llama(src, n_embd=96, n_ff=256, n_layer=8)  # like SmolLM2's 576: 96 % 256 != 0
    t = types_of(src, "Q4_K_M")
    assert t["blk.1.attn_q.weight"] == T.Q5_0  # Q4_K -> Q5_0
    assert t["blk.0.attn_v.weight"] == T.Q8_0  # Q6_K -> Q8_0
    assert t["blk.0.ffn_down.weight"] == T.Q6_K  # rows of 256 fit
    assert t["token_embd.weight"] == T.Q8_0
    assert types_of(src, "Q2_K")["blk.1.attn_q.weight"] == T.Q4_0
    assert types_of(src, "Q5_K_S")["blk.1.attn_q.weight"] == T.Q5_1
    with GGUFFile(src) as g:
        assert sum(p.fell_back for p in plan_tensor_types(g, "Q3_K_S")) > 0


# ---- every type: a valid file whose tensors are our kernels' bytes ------------------------


# gguf-py's numpy quantizers (gguf.quants.quantize) exist for these types only; for the
# K-quants the file's bytes are compared with quantize(), whose own bytes are pinned to ggml's
# elsewhere: test_quants.py::test_k_quant_quantize_matches_ggml_reference_bytes (ggml's
# quantize_row_q*_K_ref) and the llama-quantize hashes of test_quantize_model.py's real-model tests
GGUF_PY_QUANTIZES = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
# worst relative RMS error of a tensor of tiny_llama(n_layer=4) quantized to each type, measured
# with the code that reproduces llama-quantize's bytes; the bounds are 2x that
WRITER_RMS = {"Q4_0": 0.0867, "Q4_1": 0.0788, "Q5_0": 0.043, "Q5_1": 0.0381, "Q2_K": 0.299, "Q3_K_S": 0.1521,
              "Q3_K_M": 0.1521, "Q3_K_L": 0.1521, "Q4_K_S": 0.0718, "Q4_K_M": 0.072, "Q5_K_S": 0.0366,
              "Q5_K_M": 0.0363, "Q6_K": 0.0179, "Q8_0": 0.0054, "F16": 2.09e-4, "BF16": 1.68e-3, "F32": 0.0}


@pytest.mark.parametrize("quant_type", list(QUANT_TYPES))
def test_every_type_writes_a_valid_file_of_the_planned_bytes(tmp_path, quant_type):
    from gguf import quants as gq

    src = tmp_path / "tiny.gguf"
    weights = tiny_llama(src, n_layer=4)
    out = tmp_path / f"tiny-{quant_type}.gguf"
    seen = []
    result = quantize_model(src, out, quant_type, on_tensor=lambda i, n, p, b, a: seen.append((i, n, p.name, b, a)))
    assert [s[0] for s in seen] == list(range(len(weights))) and seen[0][1] == len(weights)
    with GGUFFile(out) as g, GGUFFile(src) as s:
        assert g.metadata["general.file_type"] == int(QUANT_TYPES[quant_type][0])
        assert g.metadata["general.quantization_version"] == 2
        assert g.metadata["general.name"] == "tiny" and g.metadata["llama.block_count"] == 4
        assert set(g.tensors) == set(s.tensors)
        assert list(g.tensors) == sorted(g.tensors, key=lambda n: (int(n.split(".")[1]) if n.startswith("blk.") else -1, n))
        for plan in result.plans:
            info = g.tensors[plan.name]
            assert info.ggml_type == plan.dst_type and info.shape == s.tensors[plan.name].shape
            x = weights[plan.name].reshape(-1, info.shape[0])
            if plan.dst_type in GGUF_PY_QUANTIZES:
                want = np.ascontiguousarray(gq.quantize(x, plan.dst_type)).tobytes()
            else:
                want = quantize(x, plan.dst_type).tobytes()
            assert bytes(info.data()) == want, plan.name
            y = dequantize(info.rows(), info.ggml_type, info.shape[0])
            assert np.array_equal(y, gq.dequantize(np.asarray(info.rows()), info.ggml_type).reshape(y.shape)), plan.name
            assert np.sqrt(np.mean((y - x) ** 2)) <= 2 * WRITER_RMS[quant_type] * np.sqrt(np.mean(x**2)), plan.name
    assert result.size_after == sum(s[4] for s in seen) and result.size_before == sum(s[3] for s in seen)
    assert leftovers(tmp_path) == []


# ---- refusals and failures: nothing half-written ------------------------------------------


def test_refusals(tmp_path, capsys):
    src = tmp_path / "tiny.gguf"
    tiny_llama(src, n_layer=2)
    assert main(["quantize", str(src), str(tmp_path / "o.gguf"), "Q9_9"]) == 2
    err = capsys.readouterr().err
    assert "unknown quantization type 'Q9_9'; valid types: Q4_0, Q4_1" in err and "Q4_K_M" in err and "Traceback" not in err
    assert main(["quantize", str(src), str(src), "Q8_0"]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert main(["quantize", str(src), str(tmp_path / ".." / tmp_path.name / "tiny.gguf"), "Q8_0", "--force"]) == 2
    assert "is the input file" in capsys.readouterr().err
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep me")
    assert main(["quantize", str(src), str(existing), "Q8_0"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
    assert main(["quantize", str(tmp_path / "missing.gguf"), str(tmp_path / "o.gguf"), "Q8_0"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["quantize", str(src), str(tmp_path / "nodir" / "o.gguf"), "Q8_0"]) == 2
    assert "no such directory" in capsys.readouterr().err
    # q4_k_m in any case, and llama-quantize's alias Q4_K
    assert main(["quantize", str(src), str(tmp_path / "o.gguf"), "q4_k"]) == 0
    assert "Q4_K_M" in capsys.readouterr().out
    assert main(["quantize", str(src), str(existing), "Q8_0", "--force"]) == 0
    with GGUFFile(existing) as g:
        assert g.metadata["general.file_type"] == 7
    assert leftovers(tmp_path) == []


def test_requantizing_needs_the_flag(tmp_path, capsys):
    src = tmp_path / "tiny.gguf"
    tiny_llama(src, n_layer=2)
    q8 = tmp_path / "q8.gguf"
    quantize_model(src, q8, "Q8_0")
    out = tmp_path / "q4.gguf"
    assert main(["quantize", str(q8), str(out), "Q4_0"]) == 2
    err = capsys.readouterr().err
    assert "already quantized (Q8_0)" in err and "--allow-requantize" in err
    assert not out.exists() and leftovers(tmp_path) == []
    # same type: nothing to convert, so no flag needed (llama.cpp copies such tensors)
    assert main(["quantize", str(q8), str(tmp_path / "same.gguf"), "Q8_0"]) == 0
    assert (tmp_path / "same.gguf").read_bytes()[-1000:] == q8.read_bytes()[-1000:]
    capsys.readouterr()
    assert main(["quantize", str(q8), str(out), "Q4_0", "--allow-requantize"]) == 0
    with GGUFFile(out) as g, GGUFFile(q8) as s:
        name = "blk.1.ffn_up.weight"
        x = dequantize(s.tensors[name].rows(), T.Q8_0, 256)
        assert bytes(g.tensors[name].data()) == quantize(x, T.Q4_0).tobytes()


def test_interrupt_and_write_failure_leave_nothing(tmp_path, monkeypatch):
    src = tmp_path / "tiny.gguf"
    tiny_llama(src, n_layer=2)
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old contents")

    def interrupt(i, n, plan, before, after):
        if i == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(src, out, "Q4_K_M", force=True, on_tensor=interrupt)
    assert out.read_bytes() == b"old contents" and leftovers(tmp_path) == []

    import llamachat.runtime.gguf.quantize_model as qm

    real_convert = qm._convert
    calls = []

    def disk_full(info, plan, sha):
        calls.append(plan.name)
        if len(calls) == 7:
            raise OSError(28, "No space left on device")
        return real_convert(info, plan, sha)

    monkeypatch.setattr(qm, "_convert", disk_full)
    with pytest.raises(UserError, match="writing failed: No space left on device"):
        quantize_model(src, out, "Q8_0", force=True)
    assert out.read_bytes() == b"old contents" and leftovers(tmp_path) == []
    monkeypatch.setattr(qm, "_convert", real_convert)

    class Usage:
        free = 1000

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(UserError, match="not enough free disk space"):
        quantize_model(src, out, "Q8_0", force=True)
    assert out.read_bytes() == b"old contents" and leftovers(tmp_path) == []


def test_corrupt_read_back_is_caught(tmp_path, monkeypatch):
    """The written file is read back and compared before it replaces OUT."""
    src = tmp_path / "tiny.gguf"
    tiny_llama(src, n_layer=2)
    from llamachat.runtime.gguf import writer as gguf_writer  # quantize_model looks write_gguf up at call time

    original = gguf_writer.write_gguf

    def flip_a_byte(path, *a, **kw):
        original(path, *a, **kw)
        with open(path, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            b = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([b[0] ^ 0xFF]))

    monkeypatch.setattr(gguf_writer, "write_gguf", flip_a_byte)
    out = tmp_path / "out.gguf"
    with pytest.raises(UserError, match="did not read back as written"):
        quantize_model(src, out, "Q8_0")
    assert not out.exists() and leftovers(tmp_path) == []


# ---- the proof: SmolLM2 byte for byte against llama-quantize ------------------------------


def sha256(info) -> str:
    return hashlib.sha256(info.data()).hexdigest()


def assert_matches(path, expected: dict):
    with GGUFFile(path) as g:
        assert list(g.tensors) == list(expected), "tensor order differs from llama-quantize's"
        wrong = [n for n, (t, h) in expected.items() if g.tensors[n].ggml_type.name != t or sha256(g.tensors[n]) != h]
        assert not wrong, f"{len(wrong)} tensors differ from llama.cpp's, e.g. {wrong[:5]}"


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantize") / "smollm2-f16.gguf"
    assert main(["quantize", str(smollm2_path), str(out), "F16", "--allow-requantize"]) == 0
    return out


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_q4_1_to_f16_matches_llama_quantize(smollm2_f16, reference):
    assert_matches(smollm2_f16, reference["f16_from_q4_1"])


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("quant_type", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_smollm2_f16_to_quant_matches_llama_quantize(smollm2_f16, reference, tmp_path, quant_type):
    out = tmp_path / f"smollm2-{quant_type}.gguf"
    result = quantize_model(smollm2_f16, out, quant_type)
    assert_matches(out, reference["quantized_from_f16"][quant_type])
    print(f"{quant_type}: {result.seconds:.2f} s")
