"""`llamachat import` of Hugging Face folders: tiny random Llama models with real
vocabularies (SmolLM2's byte-level BPE; a SentencePiece model trained here), converted to
GGUF F16 and compared with the source, tensor by tensor and key by key."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import import_fixtures as fx
from llamachat.model_store import paths
from llamachat.model_store.importers import run_import
from llamachat.model_store.library import Library
from llamachat.runtime.errors import UserError
from llamachat.runtime.gguf.reader import GGUFFile
from llamachat.tui.cli import main

N_VOCAB_SMOL = 49152


def hf_to_llamacpp_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Written out by definition, independently of the importer: Hugging Face rotates row j
    with row j + d/2 of each head, llama.cpp rotates rows 2j and 2j+1."""
    hd = w.shape[0] // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for j in range(hd // 2):
            out[h * hd + 2 * j] = w[h * hd + j]
            out[h * hd + 2 * j + 1] = w[h * hd + hd // 2 + j]
    return out


def gguf_tensor(g: GGUFFile, name: str) -> np.ndarray:
    t = g.tensors[name]
    dtype = {"F16": np.float16, "F32": np.float32}[t.ggml_type.name]
    return t.data().view(dtype).reshape(tuple(reversed(t.shape))).astype(np.float32)


def expected_gguf(held: dict[str, np.ndarray], dims=fx.DIMS) -> dict[str, np.ndarray]:
    """GGUF name -> the float32 values the converted file must hold (F16 rounding of 2-D)."""
    out = {}
    for hf, w in held.items():
        meta = fx.meta_name(hf)
        name = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}.get(meta)
        if name is None:
            layer, rest = meta.split(".", 2)[1], meta.split(".", 2)[2]
            name = f"blk.{layer}." + {
                "attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
                "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
                "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
                "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
                "feed_forward.w2.weight": "ffn_down.weight"}[rest]
        if name.endswith("attn_q.weight"):
            w = hf_to_llamacpp_rows(w, dims["n_head"])
        elif name.endswith("attn_k.weight"):
            w = hf_to_llamacpp_rows(w, dims["n_head_kv"])
        out[name] = w if w.ndim == 1 else w.astype(np.float16).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def smol_vocab_folder(tmp_path_factory, smollm2_path):
    folder = tmp_path_factory.mktemp("smol-tokenizer")
    vocab = fx.write_smollm2_tokenizer(folder, smollm2_path)
    return folder, vocab


def make_bpe_model(folder, smol_vocab_folder, dtype="BF16", shards=1, tied=True, config_changes=None):
    src, vocab = smol_vocab_folder
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((src / f).read_bytes())
    config = fx.hf_config(N_VOCAB_SMOL, tied)
    config.update(config_changes or {})
    held = fx.write_hf_model(folder, fx.random_llama(N_VOCAB_SMOL, tied=tied), config, dtype=dtype, shards=shards)
    return held, vocab


def models_dir_files():
    d = paths.models_dir()
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_bpe_model_converts_like_convert_hf_to_gguf(tmp_path, smol_vocab_folder, smollm2_path):
    held, vocab = make_bpe_model(tmp_path / "SmolTiny", smol_vocab_folder)
    result = run_import(tmp_path / "SmolTiny")
    assert result.entry.name == "smoltiny" and result.kind == "Hugging Face"
    assert Library.load().models["smoltiny"].path == result.path == paths.models_dir() / "smoltiny.gguf"
    with GGUFFile(result.path) as g, GGUFFile(smollm2_path) as real:
        m = g.metadata
        assert m["general.architecture"] == "llama" and m["general.file_type"] == 1 and m["general.name"] == "smoltiny"
        assert m["general.quantization_version"] == 2
        expect = {"llama.block_count": 2, "llama.context_length": 256, "llama.embedding_length": 64,
                  "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                  "llama.rope.dimension_count": 16, "llama.vocab_size": N_VOCAB_SMOL}
        assert {k: m[k] for k in expect} == expect
        assert m["llama.rope.freq_base"] == 10000.0
        assert m["llama.attention.layer_norm_rms_epsilon"] == np.float32(1e-5)
        # the vocabulary is exactly the one llama.cpp's converter wrote into the real SmolLM2 file
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_space_prefix"):
            assert np.array_equal(np.asarray(m[key]), np.asarray(real.metadata[key])), key
        assert np.array_equal(m["tokenizer.ggml.token_type"], real.metadata["tokenizer.ggml.token_type"])
        assert m["tokenizer.chat_template"] == fx.CHAT_TEMPLATE
        # every tensor: F16 (F32 for 1-D), equal to the source after rounding, q/k un-permuted
        want = expected_gguf(held)
        assert set(g.tensors) == set(want)  # tied: no output.weight, like convert
        for name, w in want.items():
            assert g.tensors[name].ggml_type.name == ("F32" if w.ndim == 1 else "F16"), name
            np.testing.assert_array_equal(gguf_tensor(g, name), w, err_msg=name)


def test_q_k_permutation_round_trips(tmp_path, smol_vocab_folder):
    held, _ = make_bpe_model(tmp_path / "m", smol_vocab_folder, dtype="F16")
    from llamachat.model_store.conversion import unpermute_for_rope

    result = run_import(tmp_path / "m", name="m")
    with GGUFFile(result.path) as g:
        for layer in range(2):
            for proj, heads, gname in (("q_proj", 4, "attn_q"), ("k_proj", 2, "attn_k")):
                src = held[f"model.layers.{layer}.self_attn.{proj}.weight"]
                back = unpermute_for_rope(gguf_tensor(g, f"blk.{layer}.{gname}.weight"), heads)
                np.testing.assert_array_equal(back, src)  # F16 source: F16 -> GGUF F16 is exact
                assert not np.array_equal(gguf_tensor(g, f"blk.{layer}.{gname}.weight"), src)


def test_sharded_model_with_index_and_lm_head(tmp_path, smol_vocab_folder):
    held, _ = make_bpe_model(tmp_path / "sharded", smol_vocab_folder, dtype="F32", shards=3, tied=False,
                             config_changes={"architectures": ["MistralForCausalLM"]})
    result = run_import(tmp_path / "sharded", name="sharded")
    with GGUFFile(result.path) as g:
        want = expected_gguf(held)
        assert "output.weight" in g.tensors
        for name, w in want.items():
            np.testing.assert_array_equal(gguf_tensor(g, name), w, err_msg=name)


def test_missing_shard_is_named_and_nothing_is_written(tmp_path, smol_vocab_folder):
    make_bpe_model(tmp_path / "sharded", smol_vocab_folder, shards=3)
    os.unlink(tmp_path / "sharded" / "model-00002-of-00003.safetensors")
    with pytest.raises(UserError, match=r"missing shard model-00002-of-00003\.safetensors \(listed in model\.safetensors\.index\.json\)"):
        run_import(tmp_path / "sharded")
    assert models_dir_files() == [] and Library.load().models == {}


def test_unsupported_architecture(tmp_path, smol_vocab_folder):
    make_bpe_model(tmp_path / "m", smol_vocab_folder, config_changes={"architectures": ["GPTNeoXForCausalLM"]})
    with pytest.raises(UserError, match=r"config\.json: architecture 'GPTNeoXForCausalLM' is not supported \(supported: LlamaForCausalLM, MistralForCausalLM\)"):
        run_import(tmp_path / "m")
    assert models_dir_files() == []


def test_shape_disagreeing_with_config_is_named(tmp_path, smol_vocab_folder):
    make_bpe_model(tmp_path / "m", smol_vocab_folder, config_changes={"intermediate_size": 96})
    with pytest.raises(UserError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[128, 64\], config\.json implies \[96, 64\]"):
        run_import(tmp_path / "m")
    assert models_dir_files() == []


def test_unknown_pre_tokenizer_is_refused(tmp_path, smol_vocab_folder):
    make_bpe_model(tmp_path / "m", smol_vocab_folder)
    tj = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UserError, match="BPE pre-tokenizer it defines .* is not one llamachat knows"):
        run_import(tmp_path / "m")


def sentencepiece_model(folder, vocab_size_in_config=None, added=True):
    """An HF folder with a tokenizer.model (SentencePiece, byte fallback) and added tokens."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    fx.train_sentencepiece(folder / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n_sp = sp.vocab_size()
    n_vocab = vocab_size_in_config or n_sp
    tc = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": False, "chat_template": fx.CHAT_TEMPLATE}
    if added:
        tc["added_tokens_decoder"] = {str(n_sp): {"content": "<|im_start|>", "special": True},
                                      str(n_sp + 1): {"content": "\u2581user", "special": False}}
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    held = fx.write_hf_model(folder, fx.random_llama(n_vocab, tied=False), fx.hf_config(n_vocab, False), dtype="F16")
    return sp, held


def test_sentencepiece_model_converts_with_scores_and_types(tmp_path):
    sp, held = sentencepiece_model(tmp_path / "spm", vocab_size_in_config=403)
    result = run_import(tmp_path / "spm", name="spm")
    with GGUFFile(result.path) as g:
        m = g.metadata
        assert m["tokenizer.ggml.model"] == "llama" and m["tokenizer.ggml.pre"] == "default"
        n_sp = sp.vocab_size()
        tokens, scores, types = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.scores"], m["tokenizer.ggml.token_type"]
        assert len(tokens) == len(scores) == len(types) == 403 == m["llama.vocab_size"]
        for i in range(n_sp):
            assert tokens[i] == sp.id_to_piece(i) and scores[i] == np.float32(sp.get_score(i))
            want = 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
            assert types[i] == want, i
        assert (tokens[n_sp], types[n_sp], scores[n_sp]) == ("<|im_start|>", 3, -1000.0)
        assert (tokens[n_sp + 1], types[n_sp + 1]) == (" user", 4)  # user-defined: \u2581 pre-normalized
        assert (tokens[n_sp + 2], types[n_sp + 2], scores[n_sp + 2]) == (f"[PAD{n_sp + 2}]", 5, np.float32(-10000.0))
        assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"]) == (1, 2)
        assert (m["tokenizer.ggml.add_bos_token"], m["tokenizer.ggml.add_eos_token"]) == (True, False)
        for name, w in expected_gguf(held).items():
            np.testing.assert_array_equal(gguf_tensor(g, name), w, err_msg=name)


def test_cli_import_and_inspect(tmp_path, capsys):
    sentencepiece_model(tmp_path / "Tiny-SPM", added=False)
    assert main(["import", str(tmp_path / "Tiny-SPM"), "--name", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert "Imported tiny (Hugging Face; F16 " in out and str(paths.models_dir() / "tiny.gguf") in out
    assert "[ 1/21] token_embd.weight F16 -> F16 [400, 64]" in err
    assert "[21/21] output.weight F16 -> F16 [400, 64]" in err
    assert main(["inspect", str(paths.models_dir() / "tiny.gguf")]) == 0
    # the same name again: refused, the first import intact
    assert main(["import", str(tmp_path / "Tiny-SPM"), "--name", "tiny"]) == 2
    assert "a model named 'tiny' is already in the library" in capsys.readouterr().err
    assert models_dir_files() == ["tiny.gguf"]


@pytest.mark.parametrize("file, content, message", [
    ("config.json", "{not json", r"config\.json: cannot be read as JSON"),
    ("tokenizer_config.json", "{not json", r"tokenizer_config\.json: cannot be read as JSON|tokenizer files cannot be used"),
    ("tokenizer.json", "[1, 2]", r"tokenizer\.json: not a JSON object"),
])
def test_broken_json_files_are_named(tmp_path, smol_vocab_folder, file, content, message):
    make_bpe_model(tmp_path / "m", smol_vocab_folder)
    (tmp_path / "m" / file).write_text(content)
    with pytest.raises(UserError, match=message):
        run_import(tmp_path / "m")
    assert models_dir_files() == []
