"""--lora: a PEFT adapter merged into the base before conversion, W += (alpha/r) * B @ A,
checked against the same sum computed here in numpy, for Hugging Face, Meta and GGUF bases."""

from __future__ import annotations

import json

import numpy as np
import pytest

import import_fixtures as fx
from llamachat.model_store import paths
from llamachat.model_store.importers import run_import
from llamachat.model_store.library import Library
from llamachat.runtime.errors import UserError
from llamachat.runtime.gguf.reader import GGUFFile
from test_import_hf import expected_gguf, gguf_tensor, hf_to_llamacpp_rows, sentencepiece_model

R, ALPHA = 4, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "down_proj": (64, 128)}
MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}


def make_adapter(folder, dtype="F32", bad: str | None = None, config_changes=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """adapter_config.json + adapter_model.safetensors; returns {HF weight name: (A, B)} as
    float32 values held in the file. `bad` gives that module an A with the wrong input size."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": TARGETS, "lora_dropout": 0.05,
              "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "base_model_name_or_path": "tiny"}
    config.update(config_changes or {})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(7)
    tensors, held = {}, {}
    for layer in range(2):
        for mod in TARGETS:
            out_f, in_f = SHAPES[mod]
            if bad == f"{layer}.{mod}":
                in_f -= 16
            a = rng.standard_normal((R, in_f)).astype(np.float32) * 0.3
            b = rng.standard_normal((out_f, R)).astype(np.float32) * 0.3
            key = f"base_model.model.model.layers.{layer}.{MODULE[mod]}.{mod}"
            tensors[key + ".lora_A.weight"] = (dtype, fx.stored(a, dtype))
            tensors[key + ".lora_B.weight"] = (dtype, fx.stored(b, dtype))
            held[f"model.layers.{layer}.{MODULE[mod]}.{mod}.weight"] = (fx.as_f32(fx.stored(a, dtype), dtype), fx.as_f32(fx.stored(b, dtype), dtype))
    fx.write_safetensors(folder / "adapter_model.safetensors", tensors)
    return held


def merged_in_numpy(held_base: dict[str, np.ndarray], lora: dict, scale: float) -> dict[str, np.ndarray]:
    out = dict(held_base)
    for name, (a, b) in lora.items():
        out[name] = held_base[name] + np.float32(scale) * (b @ a)
    return out


def test_lora_merge_into_hf_model_equals_numpy(tmp_path):
    _, held = sentencepiece_model(tmp_path / "base", added=False)
    lora = make_adapter(tmp_path / "adapter")
    result = run_import(tmp_path / "base", name="merged", lora=tmp_path / "adapter")
    assert result.notes == ["merged LoRA adapter (r 4, alpha 8) into 8 tensors"]
    want = expected_gguf(merged_in_numpy(held, lora, ALPHA / R))
    with GGUFFile(result.path) as g:
        for name, w in want.items():
            np.testing.assert_array_equal(gguf_tensor(g, name), w, err_msg=name)
        # and the merge really changed the adapted tensors (and only those)
        plain = expected_gguf(held)
        changed = {n for n in want if not np.array_equal(gguf_tensor(g, n), plain[n])}
        assert changed == {f"blk.{i}.{t}.weight" for i in range(2) for t in ("attn_q", "attn_k", "attn_v", "ffn_down")}


def test_lora_rslora_scale(tmp_path):
    _, held = sentencepiece_model(tmp_path / "base", added=False)
    lora = make_adapter(tmp_path / "adapter", dtype="BF16", config_changes={"use_rslora": True})
    result = run_import(tmp_path / "base", name="merged", lora=tmp_path / "adapter")
    want = expected_gguf(merged_in_numpy(held, lora, ALPHA / np.sqrt(R)))
    with GGUFFile(result.path) as g:
        np.testing.assert_array_equal(gguf_tensor(g, "blk.1.attn_q.weight"), want["blk.1.attn_q.weight"])


def test_lora_merge_into_meta_checkpoint(tmp_path):
    from test_import_meta import make_meta

    held_meta = make_meta(tmp_path / "meta")
    lora = make_adapter(tmp_path / "adapter")
    result = run_import(tmp_path / "meta", name="merged", lora=tmp_path / "adapter")
    with GGUFFile(result.path) as g:
        for layer in range(2):
            a, b = lora[f"model.layers.{layer}.self_attn.q_proj.weight"]
            # Meta weights are in llama.cpp's order already; the HF-ordered delta is permuted
            want = held_meta[f"layers.{layer}.attention.wq.weight"] + hf_to_llamacpp_rows(np.float32(ALPHA / R) * (b @ a), 4)
            np.testing.assert_array_equal(gguf_tensor(g, f"blk.{layer}.attn_q.weight"), want.astype(np.float16).astype(np.float32))
            a, b = lora[f"model.layers.{layer}.mlp.down_proj.weight"]
            want = held_meta[f"layers.{layer}.feed_forward.w2.weight"] + np.float32(ALPHA / R) * (b @ a)
            np.testing.assert_array_equal(gguf_tensor(g, f"blk.{layer}.ffn_down.weight"), want.astype(np.float16).astype(np.float32))


def test_lora_merge_into_gguf(tmp_path):
    sentencepiece_model(tmp_path / "base", added=False)
    base = run_import(tmp_path / "base", name="base").path
    lora = make_adapter(tmp_path / "adapter")
    result = run_import(base, name="merged", lora=tmp_path / "adapter")
    with GGUFFile(base) as gb, GGUFFile(result.path) as g:
        assert g.metadata["tokenizer.ggml.tokens"] == gb.metadata["tokenizer.ggml.tokens"]
        a, b = lora["model.layers.0.self_attn.k_proj.weight"]
        want = gguf_tensor(gb, "blk.0.attn_k.weight") + hf_to_llamacpp_rows(np.float32(ALPHA / R) * (b @ a), 2)
        np.testing.assert_array_equal(gguf_tensor(g, "blk.0.attn_k.weight"), want.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(gguf_tensor(g, "blk.0.ffn_up.weight"), gguf_tensor(gb, "blk.0.ffn_up.weight"))


def test_lora_shape_mismatch_names_the_tensor_and_writes_nothing(tmp_path):
    sentencepiece_model(tmp_path / "base", added=False)
    make_adapter(tmp_path / "adapter", bad="1.v_proj")
    with pytest.raises(UserError, match=r"base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight x lora_A\.weight is \[32, 48\] but the base tensor blk\.1\.attn_v\.weight is \[32, 64\]"):
        run_import(tmp_path / "base", name="merged", lora=tmp_path / "adapter")
    assert not paths.models_dir().exists() or list(paths.models_dir().iterdir()) == []
    assert Library.load().models == {}


def test_lora_for_a_bigger_model_is_refused(tmp_path):
    sentencepiece_model(tmp_path / "base", added=False)
    make_adapter(tmp_path / "adapter")
    fx.write_safetensors(tmp_path / "adapter" / "adapter_model.safetensors", {
        "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": ("F32", np.zeros((R, 64), np.float32)),
        "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": ("F32", np.zeros((64, R), np.float32)),
    })
    with pytest.raises(UserError, match=r"layers\.5\.self_attn\.q_proj\.lora_A\.weight adapts blk\.5\.attn_q\.weight, which the base model does not have"):
        run_import(tmp_path / "base", name="merged", lora=tmp_path / "adapter")


@pytest.mark.parametrize("changes, message", [
    ({"r": 0}, "r must be a positive whole number"),
    ({"modules_to_save": ["embed_tokens"]}, "modules_to_save .* not supported"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
])
def test_bad_adapter_config(tmp_path, changes, message):
    sentencepiece_model(tmp_path / "base", added=False)
    make_adapter(tmp_path / "adapter", config_changes=changes)
    with pytest.raises(UserError, match=message):
        run_import(tmp_path / "base", name="merged", lora=tmp_path / "adapter")


def test_not_an_adapter_folder(tmp_path):
    sentencepiece_model(tmp_path / "base", added=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no adapter_config.json; --lora takes a PEFT adapter folder"):
        run_import(tmp_path / "base", lora=tmp_path / "empty")


def test_lora_into_quantized_gguf_is_refused(tmp_path):
    sentencepiece_model(tmp_path / "base", added=False)
    quantized = run_import(tmp_path / "base", name="q", quant="Q8_0").path
    make_adapter(tmp_path / "adapter")
    with pytest.raises(UserError, match=r"tensor .* is Q8_0; a LoRA can only be merged into an F32/F16/BF16 model"):
        run_import(quantized, name="merged", lora=tmp_path / "adapter")
    assert sorted(p.name for p in paths.models_dir().iterdir()) == ["q.gguf"]


def test_target_modules_as_regex(tmp_path):
    _, held = sentencepiece_model(tmp_path / "base", added=False)
    lora = make_adapter(tmp_path / "adapter", config_changes={"target_modules": r".*\.layers\.1\.self_attn\.(q|v)_proj"})
    result = run_import(tmp_path / "base", name="merged", lora=tmp_path / "adapter")
    assert result.notes == ["merged LoRA adapter (r 4, alpha 8) into 2 tensors"]
    only = {n: ab for n, ab in lora.items() if n.startswith("model.layers.1.self_attn.") and ("q_proj" in n or "v_proj" in n)}
    want = expected_gguf(merged_in_numpy(held, only, ALPHA / R))
    with GGUFFile(result.path) as g:
        for name, w in want.items():
            np.testing.assert_array_equal(gguf_tensor(g, name), w, err_msg=name)
