"""One arithmetic for prompts and decode: a token's logits are the same bits however its prompt
was split, alone or after a cached prefix (ARCHITECTURE.md's rule; issue 16 goal 4).

- Tiny random llamas, every matrix (and the tied output) in one format, for each format with a
  fused kernel: the logits of every token of a 40-token prompt, evaluated whole, token by token,
  and split 1+39, 16+24, 13+27, are bit-equal (batches below ggml's 64-token flash-attention
  tile, where llama.cpp itself switches attention kernels).
- The real SmolLM2 Q4_1 file: the last token's logits for the same splits, and a chat turn at
  temperature 0 equal with and without the prompt cache (and equal to llama.cpp's reply).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from llamachat.runtime.model.model import load_model

from test_model import tiny_metadata, write_tiny

N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_VOCAB = 256, 512, 4, 2, 64  # K-quants need rows of 256
SPLITS = [(40,), (1, 39), (16, 24), (13, 27), (1,) * 40]


def _weights(seed):
    rng = np.random.default_rng(seed)
    kv = N_HEAD_KV * (N_EMBD // N_HEAD)
    shapes = {"attn_q": (N_EMBD, N_EMBD), "attn_k": (kv, N_EMBD), "attn_v": (kv, N_EMBD),
              "attn_output": (N_EMBD, N_EMBD), "ffn_gate": (N_FF, N_EMBD), "ffn_up": (N_FF, N_EMBD),
              "ffn_down": (N_EMBD, N_FF)}
    w = {"token_embd.weight": rng.standard_normal((N_VOCAB, N_EMBD)),
         "output_norm.weight": 1 + 0.1 * rng.standard_normal(N_EMBD)}
    for i in range(2):
        w[f"blk.{i}.attn_norm.weight"] = 1 + 0.1 * rng.standard_normal(N_EMBD)
        w[f"blk.{i}.ffn_norm.weight"] = 1 + 0.1 * rng.standard_normal(N_EMBD)
        for name, shape in shapes.items():
            w[f"blk.{i}.{name}.weight"] = rng.standard_normal(shape) / np.sqrt(shape[1]) * 1.5
    return {k: v.astype(np.float32) for k, v in w.items()}


def tiny_model(tmp_path, qtype, seed=1):
    """A 2-layer llama with every matrix, the token embeddings and the tied output in qtype."""
    w = _weights(seed)
    types = {name: qtype for name in w if not name.endswith("norm.weight")}
    md = tiny_metadata(**{"llama.embedding_length": N_EMBD, "llama.feed_forward_length": N_FF})
    return load_model(write_tiny(tmp_path / f"{qtype.name}.gguf", w, md, types), n_ctx=64, n_threads=2)


def logits_by_split(m, tokens, split):
    """Every token's logits [T, n_vocab], the prompt evaluated in chunks of the given sizes."""
    m.truncate(0)
    out, start = [], 0
    for n in split:
        chunk = tokens[start:start + n]
        out.append(m.eval(chunk, logits="all").reshape(n, -1))
        start += n
    return np.concatenate(out)


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q4_0, T.Q8_0, T.Q5_0, T.Q5_1, T.Q6_K, T.Q5_K, T.Q4_K, T.F16], ids=lambda t: t.name)
def test_logits_do_not_depend_on_the_split(tmp_path, qtype):
    m = tiny_model(tmp_path, qtype)
    assert m.fused is not None  # decode takes the one-call path, prompts `forward`
    if qtype == T.Q4_K:  # repacked at load on an AVX-512 VNNI CPU (its 8-row kernels), else the file's layout
        from llamachat.runtime.quants.simd import HOST_ISA
        assert m.weights.layers[0].w_up.packed == (HOST_ISA.name == "avx512vnni")
    rng = np.random.default_rng(int(qtype))
    tokens = rng.integers(0, N_VOCAB, 40).tolist()
    whole = logits_by_split(m, tokens, SPLITS[0])
    assert np.isfinite(whole).all() and whole.std() > 0.1
    for split in SPLITS[1:]:
        got = logits_by_split(m, tokens, split)
        assert np.array_equal(got.view(np.uint32), whole.view(np.uint32)), (qtype.name, split[:4])
    # a cached prefix: the last token evaluated after the first 39 stayed in the cache
    m.truncate(39)
    last = m.eval(tokens[39:])
    assert np.array_equal(last.view(np.uint32), whole[-1].view(np.uint32))
    # decode deferred (a cold start's first reply, while a second process compiles the one-call
    # decode kernels): single tokens through the batch forward pass, then, once the kernels are
    # ready, through them again - the same bits all along
    ready = threading.Event()
    m.defer_decode(ready)
    got = logits_by_split(m, tokens[:20], (1,) * 20)
    assert m.decode_deferred()
    ready.set()
    m.truncate(20)
    got = np.concatenate([got] + [m.eval([t], logits="all") for t in tokens[20:]])
    assert not m.decode_deferred()
    assert np.array_equal(got.view(np.uint32), whole.view(np.uint32)), qtype.name


def test_repacked_and_file_layout_batches_agree(tmp_path):
    """Q4_1 and Q4_0 layer matrices are repacked at load, the tied output is not: the same
    logits come from both layouts' batch kernels (the output product of a batch asked for every
    token's logits) as from one-token decode."""
    m = tiny_model(tmp_path, T.Q4_1, seed=2)
    assert m.weights.layers[0].wq.packed and not m.weights.output.packed
    tokens = list(range(3, 43))
    whole = logits_by_split(m, tokens, (40,))
    single = logits_by_split(m, tokens, (1,) * 40)
    assert np.array_equal(whole.view(np.uint32), single.view(np.uint32))


@pytest.mark.real_model
def test_smollm2_last_logits_do_not_depend_on_the_split(smollm2_path):
    from llamachat.runtime.tokenizer.tokenizer import Tokenizer

    m = load_model(smollm2_path, n_ctx=128, n_threads=2)
    text = ("The quick brown fox jumps over the lazy dog, and then it runs into the forest where "
            "the other animals are waiting for the spring to come back to the valley, singing songs "
            "about the long winter nights and the stars.")
    tokens = Tokenizer.from_gguf(m.gguf).encode(text)[:40]
    assert len(tokens) == 40
    want = None
    for split in SPLITS[:4]:
        m.truncate(0)
        start = 0
        for n in split:
            logits = m.eval(tokens[start:start + n])
            start += n
        want = logits if want is None else want
        assert np.array_equal(logits.view(np.uint32), want.view(np.uint32)), split
    m.truncate(39)  # after a cached prefix
    assert np.array_equal(m.eval(tokens[39:]).view(np.uint32), want.view(np.uint32))


@pytest.mark.real_model
def test_chat_turn_is_the_same_with_and_without_the_prompt_cache(smollm2_path):
    from llamachat.runtime import Llama

    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    llm = Llama(model_path=str(smollm2_path), n_ctx=256, n_threads=2, verbose=False)
    fresh = llm.create_chat_completion(messages, temperature=0, max_tokens=24)
    assert llm.n_tokens > 0
    cached = llm.create_chat_completion(messages, temperature=0, max_tokens=24)  # prompt from the cache
    reply = fresh["choices"][0]["message"]["content"]
    assert cached["choices"][0]["message"]["content"] == reply
    # llama.cpp's reply to these messages (issue 16, llama-cpp-python's create_chat_completion)
    assert reply.strip() == "The capital of France is Paris."


def test_the_products_shares_cover_every_batch_kernel_once(tmp_path, monkeypatch):
    """forward.compile_products: a cold start's two processes each compile one share of a
    prompt's batch products; together they are every (kernel, layout) a prompt multiplies with,
    and no kernel is in both (two processes adding entries to one kernel's cache index at once
    would lose one)."""
    from llamachat.runtime.model import forward

    w = _weights(3)
    mix = {"attn_q": T.Q5_0, "attn_k": T.Q8_0, "attn_v": T.Q4_K, "attn_output": T.Q5_0,
           "ffn_gate": T.Q6_K, "ffn_up": T.Q4_1, "ffn_down": T.Q8_0}
    types = {name: (mix[name.split(".")[2]] if name.startswith("blk.") else T.Q8_0)
             for name in w if not name.endswith("norm.weight")}
    md = tiny_metadata(**{"llama.embedding_length": N_EMBD, "llama.feed_forward_length": N_FF})
    m = load_model(write_tiny(tmp_path / "mix.gguf", w, md, types), n_ctx=64, n_threads=2)
    seen = []
    real = forward.matmul
    monkeypatch.setattr(forward, "matmul", lambda wt, act, **kw: seen.append((part, getattr(wt.traits.batch, 'func', wt.traits.batch), wt.ggml_type, wt.packed)) or real(wt, act, **kw))
    for part in (0, 1):
        forward.compile_products(m.weights, part)
    layouts = {(getattr(w.traits.batch, 'func', w.traits.batch), w.ggml_type, w.packed) for layer in m.weights.layers
               for w in layer.matrices}
    assert sorted(map(repr, layouts)) == sorted(repr(s[1:]) for s in seen)  # each once
    kernels = {p: {s[1] for s in seen if s[0] == p} for p in (0, 1)}
    assert kernels[0] and kernels[1] and not kernels[0] & kernels[1]
    # the prompt then multiplies with what the shares compiled, the same floats as decode
    whole = logits_by_split(m, list(range(3, 23)), (20,))
    assert np.array_equal(logits_by_split(m, list(range(3, 23)), (1,) * 20).view(np.uint32), whole.view(np.uint32))
