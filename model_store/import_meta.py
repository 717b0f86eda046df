"""Planning the conversion of a Meta checkpoint folder (params.json, consolidated.NN.pth,
tokenizer.model) to GGUF, as llama.cpp's convert_legacy_llama.py does.

Owns: params.json (dim, n_layers, n_heads, n_kv_heads, norm_eps, rope_theta, vocab_size),
the context length guess the legacy converter makes (2048 for LLaMA 1, 4096 for Llama 2,
16384 for Code Llama), joining model-parallel shards (embeddings, `wo` and `w2` are split
along their columns, the other matrices along their rows, norms are copied in every shard)
and Meta's tensor names. Meta's q/k rows are already in llama.cpp's order: no permutation.

The vocabulary comes from tokenizer.model (read with sentencepiece). params.json's
vocab_size is -1 in the original LLaMA release and can disagree with the tokenizer; the
tokenizer's size is used and the user is told.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from llamachat.runtime.errors import UserError

from .conversion import Conversion, PlannedTensor, check_llama_dims, new_recorder, positive_number, whole_number
from .pth_reader import PthFile
from .vocab_convert import add_sentencepiece_vocab, read_json, sentencepiece_size

LAYER_TENSORS = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight"}
IGNORED = {"rope.freqs"}


def _split_axis(name: str) -> int:
    """The axis model-parallel shards split a matrix along (fairscale's Parallel layers)."""
    if name.startswith("tok_embeddings.") or name.endswith((".attention.wo.weight", ".feed_forward.w2.weight")):
        return 1
    return 0


def find_tokenizer(folder: Path) -> Path:
    for candidate in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise UserError(f"{folder}: no tokenizer.model here or in the folder above it; Meta's download keeps it beside the model folders")


def plan_meta(folder: Path, name: str) -> Conversion:
    folder = Path(folder)
    params_path = folder / "params.json"
    params = read_json(params_path)
    for key in ("dim", "n_layers", "n_heads", "norm_eps"):
        if params.get(key) is None:
            raise UserError(f"{params_path}: {key} is missing")
    positive_number(params["norm_eps"], "norm_eps", params_path)
    if params.get("rope_theta") is not None:
        positive_number(params["rope_theta"], "rope_theta", params_path)
    if params.get("moe"):
        raise UserError(f"{params_path}: mixture-of-experts checkpoints are not supported")
    n_embd = whole_number(params["dim"], "dim", params_path)
    n_head = whole_number(params["n_heads"], "n_heads", params_path)
    if n_embd % n_head:
        raise UserError(f"{params_path}: dim {n_embd} is not a multiple of n_heads {n_head}")
    dims = check_llama_dims(params_path, n_embd, params["n_layers"], n_head, params.get("n_kv_heads") or n_head, 1, n_embd // n_head,
                            ("dim", "n_layers", "n_heads", "n_kv_heads", "the feed-forward size", "the head size"))
    n_layer, n_head_kv, head_dim = dims.n_layer, dims.n_head_kv, dims.head_dim

    shard_paths = sorted(folder.glob("consolidated.*.pth"))
    if not shard_paths:
        raise UserError(f"{folder}: no consolidated.*.pth checkpoint files")
    numbers = []
    for p in shard_paths:
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", p.name)
        if not m:
            raise UserError(f"{p}: unexpected checkpoint file name (consolidated.NN.pth expected)")
        numbers.append(int(m.group(1)))
    expected_numbers = list(range(len(numbers)))
    if numbers != expected_numbers:
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        raise UserError(f"{folder}: missing shard{'s' if len(missing) > 1 else ''} " + ", ".join(f"consolidated.{n:02d}.pth" for n in missing))
    shards = [PthFile(p) for p in shard_paths]
    names = shards[0].names
    for shard in shards[1:]:
        if set(shard.names) != set(names):
            raise UserError(f"{shard.path}: holds different tensors from {shards[0].path.name}; the shards do not belong together")

    def joined_shape(tname: str) -> tuple[int, ...]:
        shape = list(shards[0].shape(tname))
        if len(shape) == 2 and len(shards) > 1:
            shape[_split_axis(tname)] = sum(s.shape(tname)[_split_axis(tname)] for s in shards)
        return tuple(shape)

    for tname in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if tname not in names:
            raise UserError(f"{shard_paths[0]}: tensor {tname} is missing; this is not a Meta llama checkpoint")
    n_ff = joined_shape("layers.0.feed_forward.w1.weight")[0]
    n_emb_rows = joined_shape("tok_embeddings.weight")[0]

    conv = Conversion(source=folder, kind="Meta", recorder=new_recorder(name), n_head=n_head, n_head_kv=n_head_kv)
    gw = conv.recorder
    tokenizer = find_tokenizer(folder)
    n_tok = sentencepiece_size(tokenizer)
    added = folder / "added_tokens.json"
    if added.is_file():
        n_tok += len(read_json(added))
    declared = params.get("vocab_size", -1)
    if declared != n_tok:
        what = "is -1" if declared == -1 else f"says {declared}"
        conv.notes.append(f"params.json's vocab_size {what}; using the tokenizer's size, {n_tok}")
    n_vocab = n_tok
    if n_emb_rows != n_tok:
        if n_emb_rows < n_tok:
            raise UserError(f"{folder}: tok_embeddings.weight has {n_emb_rows} rows but {tokenizer.name} has {n_tok} tokens; the tokenizer does not belong to this checkpoint")
        conv.notes.append(f"the embeddings have {n_emb_rows} rows, {n_emb_rows - n_tok} more than the tokenizer: the vocabulary is padded with unused [PADi] tokens")
        n_vocab = n_emb_rows

    theta = params.get("rope_theta")
    if theta == 1000000:
        n_ctx = 16384  # Code Llama
    elif params["norm_eps"] == 1e-05:
        n_ctx = 4096  # Llama 2
    else:
        n_ctx = 2048  # LLaMA 1
    gw.add_context_length(n_ctx)
    gw.add_embedding_length(n_embd)
    gw.add_block_count(n_layer)
    gw.add_feed_forward_length(n_ff)
    gw.add_rope_dimension_count(head_dim)
    gw.add_head_count(n_head)
    gw.add_head_count_kv(n_head_kv)
    gw.add_layer_norm_rms_eps(float(params["norm_eps"]))
    if theta is not None:
        gw.add_rope_freq_base(float(theta))
    gw.add_vocab_size(n_vocab)
    add_sentencepiece_vocab(gw, folder, n_vocab, model_file=tokenizer)

    dims = replace(dims, n_ff=n_ff, n_vocab=n_vocab)
    llama_shapes = dims.layer_shapes()
    layer_shapes = {meta: llama_shapes[ours] for meta, ours in LAYER_TENSORS.items()}
    expected = {"tok_embeddings.weight": dims.global_shape("token_embd.weight")}
    for i in range(n_layer):
        for suffix, shape in layer_shapes.items():
            expected[f"layers.{i}.{suffix}"] = shape
    expected["norm.weight"] = dims.global_shape("output_norm.weight")
    expected["output.weight"] = dims.global_shape("output.weight")
    for tname in names:
        if tname not in expected and tname not in IGNORED:
            raise UserError(f"{shard_paths[0]}: tensor {tname!r} is not part of a llama model with this params.json (n_layers {n_layer}); cannot convert it")
    for tname, shape in expected.items():
        if tname not in names:
            raise UserError(f"{shard_paths[0]}: tensor {tname} is missing (an incomplete checkpoint?)")
        got = joined_shape(tname)
        if got != shape:
            raise UserError(f"{folder}: tensor {tname} has shape {list(got)}, params.json implies {list(shape)}")
        conv.tensors.append(_planned(shards, tname, shape))
    return conv


def gguf_name(meta_name: str) -> str:
    if meta_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[meta_name]
    m = re.match(r"layers\.(\d+)\.(.+)$", meta_name)
    return f"blk.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}"


def _planned(shards: list[PthFile], tname: str, shape: tuple[int, ...]) -> PlannedTensor:
    def load() -> np.ndarray:
        parts = [s.tensor(tname).to_f32() for s in shards]
        if len(parts) == 1 or len(shape) == 1:
            return parts[0]
        return np.concatenate(parts, axis=_split_axis(tname))

    return PlannedTensor(gguf_name(tname), shape, shards[0].tensor(tname).dtype, load)
