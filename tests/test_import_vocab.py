"""Byte-level BPE vocabularies converted from tokenizer.json equal the vocabularies llama.cpp's
converter wrote into its test vocab files (Llama 3 -> pre "llama-bpe", GPT-2 -> "gpt-2"),
and a Hugging Face folder whose weights are a pytorch_model.bin converts too."""

from __future__ import annotations

import json

import numpy as np
import pytest

import import_fixtures as fx
from llamachat.model_store.conversion import new_recorder, recorded_metadata
from llamachat.model_store.importers import run_import
from llamachat.model_store.vocab_convert import LLAMA3_PATTERN, add_bpe_vocab
from llamachat.runtime.gguf.reader import GGUFFile
from test_import_hf import expected_gguf, gguf_tensor

PRE_TOKENIZERS = {
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
}


@pytest.mark.parametrize("name", ["llama-bpe", "gpt-2"])
def test_bpe_vocab_equals_llama_cpp_vocab_file(tmp_path, reference_dir, name):
    with GGUFFile(reference_dir / "vocab" / f"ggml-vocab-{name}.gguf") as g:
        ref = dict(g.metadata)
    tokens, types, merges = ref["tokenizer.ggml.tokens"], np.asarray(ref["tokenizer.ggml.token_type"]), ref["tokenizer.ggml.merges"]
    control = {i for i, t in enumerate(types) if t == 3}
    tj = {
        "added_tokens": [{"id": i, "content": tokens[i], "special": True} for i in sorted(control)],
        "pre_tokenizer": PRE_TOKENIZERS[name],
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens) if i not in control},
                  "merges": [m.split(" ") for m in merges]},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": tokens[ref["tokenizer.ggml.bos_token_id"]], "eos_token": tokens[ref["tokenizer.ggml.eos_token_id"]]}))
    gw = new_recorder(name)
    assert add_bpe_vocab(gw, tmp_path, len(tokens)) == len(tokens)
    got, _ = recorded_metadata(gw)
    assert got["tokenizer.ggml.model"] == "gpt2" and got["tokenizer.ggml.pre"] == name
    assert got["tokenizer.ggml.tokens"] == tokens
    assert np.array_equal(np.asarray(got["tokenizer.ggml.token_type"]), types)
    assert got["tokenizer.ggml.merges"] == merges
    assert got["tokenizer.ggml.bos_token_id"] == ref["tokenizer.ggml.bos_token_id"]
    assert got["tokenizer.ggml.eos_token_id"] == ref["tokenizer.ggml.eos_token_id"]


def test_hf_folder_with_pytorch_model_bin(tmp_path):
    import sentencepiece as spm

    folder = tmp_path / "bin-model"
    folder.mkdir()
    fx.train_sentencepiece(folder / "tokenizer.model")
    n_vocab = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()
    weights = fx.random_llama(n_vocab, seed=5)
    (folder / "config.json").write_text(json.dumps(fx.hf_config(n_vocab, False)))
    fx.write_torch_checkpoint(folder / "pytorch_model.bin", {n: ("BF16", fx.stored(w, "BF16")) for n, w in weights.items()},
                              root="pytorch_model")
    held = {n: fx.as_f32(fx.stored(w, "BF16"), "BF16") for n, w in weights.items()}
    result = run_import(folder, name="bin")
    with GGUFFile(result.path) as g:
        for name, w in expected_gguf(held).items():
            np.testing.assert_array_equal(gguf_tensor(g, name), w, err_msg=name)
