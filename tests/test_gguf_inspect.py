"""`llamachat inspect`: the summary of a valid file and the one-line refusal of a broken one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType as T

from llamachat.runtime.gguf.writer import write_gguf
from llamachat.tui.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from gguf_corpus import MALFORMED  # noqa: E402

_CASES = {c[0]: c for c in MALFORMED}


@pytest.mark.parametrize("case_id", ["bad-magic", "version-byte-swapped", "tensor-count-2^62", "array-of-arrays", "alignment-not-power-of-two",
                                     "tensor-name-64-bytes", "tensor-row-not-block-multiple", "tensors-overlap", "truncated-by-one-byte", "empty-file"])
def test_cli_prints_the_exact_one_line_error(tmp_path, capsys, case_id):
    _, make, reason = _CASES[case_id]
    path = tmp_path / f"{case_id}.gguf"
    path.write_bytes(make())
    assert main(["inspect", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"llamachat: {path}: not a valid GGUF file: {reason}\n"


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    _, make, reason = _CASES["truncated-in-data"]
    path = tmp_path / "t.gguf"
    path.write_bytes(make())
    r = subprocess.run([sys.executable, "-m", "llamachat.tui.cli", "inspect", str(path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == f"llamachat: {path}: not a valid GGUF file: {reason}\n"
    r = subprocess.run([sys.executable, "-m", "llamachat.tui.cli", "inspect", str(tmp_path / "missing.gguf")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == f"llamachat: {tmp_path / 'missing.gguf'}: no such file\n"


def test_directory_is_one_sentence(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"llamachat: {tmp_path} is a directory, not a GGUF file\n"


def test_inspect_does_not_import_textual_or_numba(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"general.architecture": "llama"}, [("t", (32,), T.F32, bytes(128))])
    code = (
        "import sys\nfrom llamachat.tui.cli import main\n"
        f"assert main(['inspect', {str(path)!r}]) == 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'numba'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_inspect_small_synthetic_model(tmp_path, capsys):
    md = {
        "general.architecture": "llama", "general.name": "tiny", "general.file_type": 7,
        "llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.attention.head_count": 4, "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b", "c"],
    }
    tensors = [("token_embd.weight", (64, 3), T.Q8_0, bytes(3 * 2 * 34)), ("output_norm.weight", (64,), T.F32, bytes(256)),
               ("blk.0.attn_q.weight", (64, 64), T.Q8_0, bytes(64 * 2 * 34))]
    path = write_gguf(tmp_path / "tiny.gguf", md, tensors)
    assert main(["inspect", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["file_type"] == "Q8_0" and d["file_type_id"] == 7
    assert d["tensor_types"] == {"Q8_0": 2, "F32": 1} and d["tensor_count"] == 3
    assert d["parameters"] == 64 * 3 + 64 + 64 * 64
    assert d["head_count"] == 4 and d["head_count_kv"] == 4  # absent: same as heads, as llama.cpp
    assert d["rope_freq_base"] is None and d["chat_template"] is False
    assert d["vocab_type"] == "SPM" and d["vocab_size"] == 3 and d["file_size"] == path.stat().st_size
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "Q8_0 (general.file_type 7)" in text and "not set (llama.cpp uses 10000)" in text


@pytest.mark.real_model
def test_smollm2_inspects_correctly(smollm2_path, capsys):
    assert main(["inspect", str(smollm2_path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["architecture"] == "llama"
    assert d["block_count"] == 30 and d["head_count"] == 9 and d["head_count_kv"] == 3
    assert d["embedding_length"] == 576 and d["context_length"] == 8192
    assert d["vocab_size"] == 49152 and d["vocab_type"] == "BPE" and d["tokenizer_model"] == "gpt2"
    assert d["file_type"] == "Q4_1"
    assert d["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1} and d["tensor_count"] == 272
    assert d["parameters"] == 134_515_008  # llama.cpp: "model params = 134.52 M"
    assert d["rope_freq_base"] == 100000.0 and d["chat_template"] is True
    assert d["file_size"] == smollm2_path.stat().st_size
    assert main(["inspect", str(smollm2_path)]) == 0
    text = capsys.readouterr().out
    for expected in ("llama", "Q4_1", "Q4_1 210, F32 61, Q8_0 1", "49152 tokens", "134.52M"):
        assert expected in text


def test_odd_metadata_is_shown_not_crashed_on(tmp_path, capsys):
    # markup-like and non-UTF-8 names, keys of unexpected types, no general.file_type
    md = {
        "general.architecture": "llama",
        "general.name": b"[/] [bold]bad \xff name".decode("utf-8", "surrogateescape"),
        "llama.rope.freq_base": "fast", "llama.context_length": -3, "general.alignment": 64,
        "tokenizer.ggml.tokens": "not a list",
    }
    path = write_gguf(tmp_path / "odd.gguf", md, [("a", (32, 2), T.Q4_0, bytes(36)), ("b", (32, 3), T.Q4_0, bytes(54)), ("c", (4,), T.F32, bytes(16))])
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "[/] [bold]bad \ufffd name" in text and "Q4_0 (guessed from the tensors" in text
    assert main(["inspect", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["file_type"] == "Q4_0" and d["file_type_guessed"] is True and d["file_type_id"] is None
    assert d["rope_freq_base"] == "fast" and d["context_length"] == -3 and d["vocab_size"] is None
