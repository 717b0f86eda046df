"""`llamachat import` of Meta checkpoint folders (params.json, consolidated.NN.pth written by
hand as torch.save would, tokenizer.model): tensors unpermuted, shards joined, vocab size."""

from __future__ import annotations


import numpy as np
import pytest

import import_fixtures as fx
from llamachat.model_store import paths
from llamachat.model_store.importers import run_import
from llamachat.model_store.library import Library
from llamachat.runtime.errors import UserError
from llamachat.runtime.gguf.reader import GGUFFile
from test_import_hf import gguf_tensor

PARAMS = {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "norm_eps": 1e-06, "vocab_size": -1}
META_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight",
    "attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight", "feed_forward.w2.weight": "ffn_down.weight",
}


def gguf_name(meta: str) -> str:
    if meta in META_TO_GGUF:
        return META_TO_GGUF[meta]
    _, layer, rest = meta.split(".", 2)
    return f"blk.{layer}.{META_TO_GGUF[rest]}"


def make_meta(folder, params=PARAMS, dtype="BF16", shards=1, tokenizer_in_parent=False, n_rows=None):
    tok_dir = folder.parent if tokenizer_in_parent else folder
    tok_dir.mkdir(parents=True, exist_ok=True)
    fx.train_sentencepiece(tok_dir / "tokenizer.model")
    hf = fx.random_llama(n_rows or 400, seed=3)
    weights = {fx.meta_name(n): w for n, w in hf.items()}  # random: taken as Meta-ordered already
    weights["rope.freqs"] = np.ones(8, np.float32)  # present in LLaMA 1 checkpoints, ignored
    held = fx.write_meta_model(folder, weights, params, dtype=dtype, shards=shards, transpose={"layers.1.attention.wo.weight"})
    del held["rope.freqs"]
    return held


def check_tensors(path, held):
    with GGUFFile(path) as g:
        assert set(g.tensors) == {gguf_name(n) for n in held}
        for meta, w in held.items():
            want = w if w.ndim == 1 else w.astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(gguf_tensor(g, gguf_name(meta)), want, err_msg=meta)  # no permutation


def test_meta_checkpoint_with_vocab_size_minus_one(tmp_path):
    held = make_meta(tmp_path / "7B", tokenizer_in_parent=True)
    result = run_import(tmp_path / "7B", name="llama-tiny")
    assert result.kind == "Meta"
    assert result.notes == ["params.json's vocab_size is -1; using the tokenizer's size, 400"]
    check_tensors(result.path, held)
    with GGUFFile(result.path) as g:
        m = g.metadata
        assert m["llama.context_length"] == 2048  # LLaMA 1 (norm_eps 1e-6), as convert_legacy_llama guesses
        assert m["llama.vocab_size"] == 400 and len(m["tokenizer.ggml.tokens"]) == 400
        assert (m["llama.attention.head_count"], m["llama.attention.head_count_kv"], m["llama.feed_forward_length"]) == (4, 2, 128)
        assert m["tokenizer.ggml.model"] == "llama"
        assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"], m["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert "llama-tiny" in Library.load().models


def test_meta_two_shards_are_joined(tmp_path):
    params = dict(PARAMS, norm_eps=1e-05, vocab_size=400)
    held = make_meta(tmp_path / "13B", params=params, dtype="F16", shards=2)
    result = run_import(tmp_path / "13B")
    assert result.notes == []
    check_tensors(result.path, held)
    with GGUFFile(result.path) as g:
        assert g.metadata["llama.context_length"] == 4096  # Llama 2


def test_meta_vocab_size_disagreeing_is_said(tmp_path, capsys):
    make_meta(tmp_path / "m", params=dict(PARAMS, vocab_size=32000))
    from llamachat.tui.cli import main

    assert main(["import", str(tmp_path / "m"), "--name", "m", "-q"]) == 0
    assert "note: params.json's vocab_size says 32000; using the tokenizer's size, 400" in capsys.readouterr().out


def test_meta_padded_embeddings_pad_the_vocab(tmp_path):
    make_meta(tmp_path / "m", n_rows=408)
    result = run_import(tmp_path / "m", name="m")
    assert "8 more than the tokenizer" in result.notes[1]
    with GGUFFile(result.path) as g:
        assert g.metadata["tokenizer.ggml.tokens"][-1] == "[PAD407]" and g.metadata["llama.vocab_size"] == 408


def test_meta_missing_shard(tmp_path):
    make_meta(tmp_path / "m", shards=3)
    (tmp_path / "m" / "consolidated.01.pth").unlink()
    with pytest.raises(UserError, match=r"missing shard consolidated\.01\.pth"):
        run_import(tmp_path / "m")
    assert not paths.models_dir().exists() or list(paths.models_dir().iterdir()) == []


def test_meta_hostile_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "m"
    make_meta(folder)
    fx.write_torch_checkpoint(folder / "consolidated.00.pth", {"tok_embeddings.weight": ("F16", np.zeros((400, 64), np.float16))},
                              extra_global=("builtins", "exec"))
    with pytest.raises(UserError, match=r"refers to builtins\.exec.*refusing"):
        run_import(folder)


def test_meta_tokenizer_missing(tmp_path):
    folder = tmp_path / "m"
    make_meta(folder)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="no tokenizer.model here or in the folder above it"):
        run_import(folder)


def test_meta_tiktoken_tokenizer_is_explained(tmp_path):
    folder = tmp_path / "m"
    make_meta(folder)
    (folder / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # Llama 3's tiktoken format
    with pytest.raises(UserError, match="not a SentencePiece model.*tiktoken"):
        run_import(folder)


def test_meta_size_folder_is_named_after_its_parent(tmp_path):
    make_meta(tmp_path / "llama" / "7B", tokenizer_in_parent=True)
    assert run_import(tmp_path / "llama" / "7B").entry.name == "llama-7b"
