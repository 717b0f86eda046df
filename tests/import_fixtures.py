"""Builders of tiny checkpoints in every format `llamachat import` reads, for the tests.

Written independently of the readers in model_store (own safetensors writer, own torch
zip + pickle writer, opcode by opcode), so a reader bug cannot be mirrored by its writer.
Weights are random; dimensions tiny (n_embd 64, 2 layers, 4 heads, 2 KV heads); the
vocabularies are real: SmolLM2's byte-level BPE (taken from the real GGUF) or a small
SentencePiece model trained here on the Apache License text.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
APACHE_TEXT = ROOT.parent / "shared" / "reference" / "texts" / "apache-2.0.txt"

DIMS = dict(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=128)
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"

_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """The elements as a checkpoint of `dtype` stores them (BF16 as its bits)."""
    if dtype == "BF16":
        return bf16_bits(x)
    return np.asarray(x, dtype=_ST_DTYPES[dtype])


def as_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_to_f32(arr) if dtype == "BF16" else arr.astype(np.float32)


# --- safetensors ---------------------------------------------------------------------

def write_safetensors(path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        data = np.ascontiguousarray(arr, dtype=_ST_DTYPES[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


# --- torch.save's zip + pickle, by hand ------------------------------------------------

_STORAGE_CLASS = {"F32": "FloatStorage", "F16": "HalfStorage", "BF16": "BFloat16Storage"}


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def torch_pickle(entries: list[tuple[str, str, str, int, int, tuple, tuple]], extra_global: tuple[str, str] | None = None) -> bytes:
    """A protocol-2 pickle of {name: tensor} as torch.save writes it. Each entry:
    (name, dtype, storage key, storage numel, offset, size, stride)."""
    out = bytearray(b"\x80\x02}(")
    for name, dtype, key, numel, offset, size, stride in entries:
        out += _str(name)
        out += _global("torch._utils", "_rebuild_tensor_v2") + b"("
        out += b"(" + _str("storage") + _global("torch", _STORAGE_CLASS[dtype]) + _str(key) + _str("cpu") + _int(numel) + b"tQ"
        out += _int(offset)
        out += b"(" + b"".join(_int(d) for d in size) + b"t"
        out += b"(" + b"".join(_int(d) for d in stride) + b"t"
        out += b"\x89"  # requires_grad False
        out += _global("collections", "OrderedDict") + b")R"
        out += b"tR"
    if extra_global:  # a hostile checkpoint: calls e.g. os.system("...")
        out += _str("evil") + _global(*extra_global) + b"(" + _str("echo pwned > /dev/null") + b"tR"
    out += b"u."
    return bytes(out)


def write_torch_checkpoint(path, tensors: dict[str, tuple[str, np.ndarray]], transpose: set[str] = frozenset(),
                           extra_global: tuple[str, str] | None = None, root: str = "consolidated") -> None:
    """torch.save's zip layout: ROOT/data.pkl, ROOT/data/KEY (stored, uncompressed),
    ROOT/byteorder, ROOT/version. Tensors named in `transpose` are stored as the transpose
    of their storage (a non-contiguous view, stride (1, rows)), as `w.t()` would be saved."""
    entries, blobs = [], {}
    for i, (name, (dtype, arr)) in enumerate(tensors.items()):
        key = str(i)
        if name in transpose:
            base = np.ascontiguousarray(arr.T)
            entries.append((name, dtype, key, base.size, 0, arr.shape, (1, arr.shape[0])))
        else:
            base = np.ascontiguousarray(arr)
            stride = tuple(int(np.prod(arr.shape[j + 1:])) for j in range(arr.ndim))
            entries.append((name, dtype, key, base.size, 0, arr.shape, stride))
        blobs[key] = np.ascontiguousarray(base, dtype=_ST_DTYPES[dtype]).tobytes()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", torch_pickle(entries, extra_global))
        z.writestr(f"{root}/byteorder", "little")
        for key, blob in blobs.items():
            z.writestr(f"{root}/data/{key}", blob)
        z.writestr(f"{root}/version", "3\n")


# --- vocabularies ----------------------------------------------------------------------

def train_sentencepiece(path: Path, vocab_size: int = 400) -> Path:
    import sentencepiece as spm

    lines = [line for line in APACHE_TEXT.read_text().splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def write_smollm2_tokenizer(folder: Path, gguf_path: Path) -> dict:
    """tokenizer.json + tokenizer_config.json holding SmolLM2's real vocabulary (read from the
    GGUF): the control tokens as special added tokens, merges, SmolLM's pre-tokenizer."""
    from llamachat.runtime.gguf.reader import GGUFFile

    with GGUFFile(gguf_path) as g:
        tokens = list(g.metadata["tokenizer.ggml.tokens"])
        types = np.asarray(g.metadata["tokenizer.ggml.token_type"]).tolist()
        merges = list(g.metadata["tokenizer.ggml.merges"])
    vocab = {t: i for i, t in enumerate(tokens)}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                  "merges": [m.split(" ") for m in merges]},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }))
    return {"tokens": tokens, "types": types, "merges": merges}


# --- models ------------------------------------------------------------------------------

def random_llama(n_vocab: int, seed: int = 0, tied: bool = False, dims: dict = DIMS) -> dict[str, np.ndarray]:
    """float32 weights under Hugging Face names, Hugging Face q/k row order."""
    rng = np.random.default_rng(seed)
    e, f = dims["n_embd"], dims["n_ff"]
    hd = e // dims["n_head"]
    q, kv = dims["n_head"] * hd, dims["n_head_kv"] * hd
    w = {"model.embed_tokens.weight": rng.standard_normal((n_vocab, e)).astype(np.float32) * 0.5}
    for i in range(dims["n_layer"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(e)).astype(np.float32)
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((q, e)).astype(np.float32) * 0.2
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((kv, e)).astype(np.float32) * 0.2
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((kv, e)).astype(np.float32) * 0.2
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((e, q)).astype(np.float32) * 0.2
        w[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(e)).astype(np.float32)
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((f, e)).astype(np.float32) * 0.2
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((f, e)).astype(np.float32) * 0.2
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((e, f)).astype(np.float32) * 0.2
    w["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(e)).astype(np.float32)
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((n_vocab, e)).astype(np.float32) * 0.2
    return w


def hf_config(n_vocab: int, tied: bool, arch: str = "LlamaForCausalLM", dims: dict = DIMS) -> dict:
    return {
        "architectures": [arch],
        "model_type": "llama",
        "hidden_size": dims["n_embd"],
        "intermediate_size": dims["n_ff"],
        "num_hidden_layers": dims["n_layer"],
        "num_attention_heads": dims["n_head"],
        "num_key_value_heads": dims["n_head_kv"],
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": n_vocab,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
    }


def write_hf_model(folder: Path, weights: dict[str, np.ndarray], config: dict, dtype: str = "BF16", shards: int = 1) -> dict[str, np.ndarray]:
    """config.json + weights as safetensors (sharded with an index when shards > 1).
    Returns the float32 values the files hold (after rounding to `dtype`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = list(weights)
    held = {n: as_f32(stored(weights[n], dtype), dtype) for n in names}
    if shards == 1:
        write_safetensors(folder / "model.safetensors", {n: (dtype, stored(weights[n], dtype)) for n in names})
        return held
    groups = np.array_split(np.arange(len(names)), shards)
    weight_map = {}
    for k, idx in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / fname, {names[i]: (dtype, stored(weights[names[i]], dtype)) for i in idx})
        weight_map.update({names[i]: fname for i in idx})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return held


HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}


def meta_name(hf_name: str) -> str:
    if hf_name in HF_TO_META:
        return HF_TO_META[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    return f"layers.{parts[2]}.{HF_TO_META[parts[3]]}"


def write_meta_model(folder: Path, weights_meta: dict[str, np.ndarray], params: dict, dtype: str = "F16", shards: int = 1,
                     transpose: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """params.json + consolidated.NN.pth; weights under Meta names (already in Meta's q/k
    order). With shards > 1, split like Meta's model-parallel checkpoints. Returns the
    float32 values held."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    held = {n: as_f32(stored(w, dtype), dtype) for n, w in weights_meta.items()}
    for k in range(shards):
        part = {}
        for n, w in weights_meta.items():
            if w.ndim == 1 or shards == 1:
                part[n] = (dtype, stored(w, dtype))
                continue
            axis = 1 if n.startswith("tok_embeddings.") or n.endswith((".attention.wo.weight", ".feed_forward.w2.weight")) else 0
            part[n] = (dtype, np.array_split(stored(w, dtype), shards, axis=axis)[k])
        write_torch_checkpoint(folder / f"consolidated.{k:02d}.pth", part, transpose=transpose)
    return held
