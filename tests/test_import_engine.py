"""Imported models run: the engine's logits for a converted tiny model equal a plain numpy
forward pass written here in the *source's* convention (Hugging Face's rotate-half RoPE on
HF-ordered q/k; Meta's interleaved pairs), which checks names, layouts and the q/k
permutation end to end; and text generation and tokenization work on the result."""

from __future__ import annotations

import numpy as np

import import_fixtures as fx
from llamachat.model_store.importers import run_import
from test_import_hf import make_bpe_model, sentencepiece_model, smol_vocab_folder  # noqa: F401 (fixture)

EPS = 1e-5


def reference_logits(w: dict[str, np.ndarray], tokens: list[int], rope: str, eps: float, theta: float = 10000.0,
                     dims=fx.DIMS) -> np.ndarray:
    """Llama forward in float64 over Hugging Face-named weights (rounded as the GGUF holds them)."""
    w = {n: (a if a.ndim == 1 else a.astype(np.float16)).astype(np.float64) for n, a in w.items()}
    n_head, n_kv, e = dims["n_head"], dims["n_head_kv"], dims["n_embd"]
    hd = e // n_head
    T = len(tokens)
    pos = np.arange(T)[:, None]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos * inv[None, :]  # T x hd/2
    cos, sin = np.cos(ang), np.sin(ang)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rotate(x):  # x: T x heads x hd
        if rope == "half":  # Hugging Face: pair j with j + hd/2
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            c, s = cos[:, None, :], sin[:, None, :]
            return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # Meta / llama.cpp: adjacent pairs
        c, s = cos[:, None, :], sin[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x1 * c - x2 * s, x2 * c + x1 * s
        return out

    x = w["model.embed_tokens.weight"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(dims["n_layer"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = rotate((h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, n_head, hd))
        k = rotate((h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, n_kv, hd))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, n_kv, hd)
        out = np.empty((T, n_head, hd))
        for head in range(n_head):
            kvh = head // (n_head // n_kv)
            att = q[:, head] @ k[:, kvh].T / np.sqrt(hd) + mask
            att = np.exp(att - att.max(-1, keepdims=True))
            out[:, head] = (att / att.sum(-1, keepdims=True)) @ v[:, kvh]
        x = x + out.reshape(T, e) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


def engine_logits(path, tokens):
    from llamachat.runtime.model.model import load_model

    m = load_model(path, n_ctx=64)
    try:
        return np.asarray(m.eval(tokens, logits="all"), dtype=np.float64)
    finally:
        m.close()


def assert_close_logits(got, want, tol):
    assert got.shape == want.shape
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= tol * scale, np.abs(got - want).max() / scale
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_hf_model_logits_match_hf_forward(tmp_path):
    _, held = sentencepiece_model(tmp_path / "hf", added=False)
    result = run_import(tmp_path / "hf", name="hf")
    tokens = [1, 57, 300, 12, 99, 250, 7, 388]
    want = reference_logits(held, tokens, rope="half", eps=EPS)
    # the F16 KV cache and half-precision attention sums: measured 1.74e-3 of the largest
    # logit; bound 2x that (scores 2% too sharp would move them by 1.2e-2)
    assert_close_logits(engine_logits(result.path, tokens), want, 3.5e-3)
    # the same weights read with Meta's rotation would not match: the check can fail
    assert np.abs(reference_logits(held, tokens, rope="pairs", eps=EPS) - want).max() > 0.05 * np.abs(want).max()


def test_meta_model_logits_match_meta_forward(tmp_path):
    from test_import_meta import PARAMS, make_meta

    held_meta = make_meta(tmp_path / "meta")
    result = run_import(tmp_path / "meta", name="meta")
    inverse = {fx.meta_name(n): n for n in fx.random_llama(8)}
    held = {inverse[n]: w for n, w in held_meta.items()}
    tokens = [1, 33, 200, 5, 399, 42]
    want = reference_logits(held, tokens, rope="pairs", eps=PARAMS["norm_eps"])
    # measured 1.86e-3 of the largest logit; bound 2x that
    assert_close_logits(engine_logits(result.path, tokens), want, 3.7e-3)


def test_generation_and_tokenizer_on_imported_bpe_model(tmp_path, smol_vocab_folder, smollm2_path):  # noqa: F811
    from llamachat.runtime import Llama
    from llamachat.runtime.tokenizer.tokenizer import Tokenizer

    make_bpe_model(tmp_path / "smol", smol_vocab_folder)
    result = run_import(tmp_path / "smol", name="smol")
    text = "Hello world! 123 <|im_start|>user"
    assert Tokenizer.from_gguf(result.path).encode(text, parse_special=True) == Tokenizer.from_gguf(smollm2_path).encode(text, parse_special=True)
    llm = Llama(str(result.path), n_ctx=64, seed=1)
    out = llm("Once upon a time", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1 and isinstance(out["choices"][0]["text"], str)
    assert llm.last_stats["prompt_tokens"] == len(llm.tokenize("Once upon a time", add_bos=False))


def test_generation_on_imported_spm_model(tmp_path):
    import sentencepiece as spm
    from llamachat.runtime import Llama
    from llamachat.runtime.tokenizer.tokenizer import Tokenizer

    sentencepiece_model(tmp_path / "spm", added=False)
    result = run_import(tmp_path / "spm", name="spm")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm" / "tokenizer.model"))
    text = "Licensed under the Apache License, Version 2.0"
    assert Tokenizer.from_gguf(result.path).encode(text, add_special=False) == sp.encode(text)
    llm = Llama(str(result.path), n_ctx=64, seed=1)
    out = llm("Licensed under", max_tokens=6, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
