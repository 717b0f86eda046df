"""Planning the conversion of a Hugging Face model folder (Llama / Mistral) to GGUF.

Owns: reading config.json (architecture, hyper-parameters), finding the weight files
(`model.safetensors`, sharded `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`, or the same for `pytorch_model*.bin`), mapping Hugging Face
tensor names to llama.cpp's, checking every shape against the config, and undoing the q/k
row permutation Hugging Face applies for its rotate-half RoPE (conversion.permute_for_rope).
The metadata is what convert_hf_to_gguf.py's LlamaModel writes.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np

from llamachat.runtime.errors import UserError, shown

from .checkpoint_tensor import CheckpointTensor
from .conversion import (Conversion, PlannedTensor, check_llama_dims, new_recorder, permute_for_rope, positive_number,
                         whole_number)
from .pth_reader import PthFile
from .safetensors_reader import SafetensorsFile
from .vocab_convert import add_bpe_vocab, add_sentencepiece_vocab, read_json

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# Hugging Face name (after "model.layers.N.") -> llama.cpp name (after "blk.N.")
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# present in some checkpoints, never needed (RoPE frequencies are recomputed)
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _read_config(folder: Path) -> dict:
    return read_json(folder / "config.json")


def _need(config: dict, key: str, path: Path):
    if config.get(key) is None:
        raise UserError(f"{path}: {key} is missing")
    return config[key]


class WeightFiles:
    """All tensors of a folder's weight files, by Hugging Face name."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, SafetensorsFile | PthFile] = {}
        self.where: dict[str, str] = {}
        for index_name, opener in (("model.safetensors.index.json", SafetensorsFile), ("pytorch_model.bin.index.json", PthFile)):
            index = folder / index_name
            if index.is_file():
                self._from_index(index, opener)
                return
        single = [p for p in (folder / "model.safetensors", folder / "pytorch_model.bin") if p.is_file()]
        # Mistral's folders also hold consolidated.safetensors (Meta naming): not ours to read
        shards = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("consolidated")) \
            or sorted(folder.glob("pytorch_model*.bin"))
        files = single[:1] or shards
        if not files:
            raise UserError(f"{folder}: no weights found (model.safetensors, model-*-of-*.safetensors or pytorch_model.bin)")
        for f in files:
            self._open(f, SafetensorsFile if f.suffix == ".safetensors" else PthFile)

    def _from_index(self, index: Path, opener) -> None:
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and "/" not in f for f in weight_map.values()):
            raise UserError(f"{index}: cannot be read (no weight_map of tensor names to file names in this folder)")
        missing = sorted({f for f in weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise UserError(f"{self.folder}: missing shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} (listed in {index.name}); download {'them' if len(missing) > 1 else 'it'} and import again")
        for f in sorted(set(weight_map.values())):
            self._open(self.folder / f, opener)
        for name, f in weight_map.items():
            if name not in self.files[f]:
                raise UserError(f"{self.folder / f}: has no tensor {name!r}, which {index.name} says it holds (an incomplete download?)")

    def _open(self, path: Path, opener) -> None:
        handle = opener(path)
        self.files[path.name] = handle
        for name in handle.names:
            self.where.setdefault(name, path.name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.files[self.where[name]].shape(name))

    def tensor(self, name: str) -> CheckpointTensor:
        return self.files[self.where[name]].tensor(name)


def plan_hf(folder: Path, name: str) -> Conversion:
    folder = Path(folder)
    config = _read_config(folder)
    cfg_path = folder / "config.json"
    archs = config.get("architectures") or []
    archs = [archs] if isinstance(archs, str) else archs
    arch = archs[0] if archs else config.get("model_type", "unknown")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{cfg_path}: architecture {shown(arch)} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    n_embd = whole_number(_need(config, "hidden_size", cfg_path), "hidden_size", cfg_path)
    n_head = whole_number(_need(config, "num_attention_heads", cfg_path), "num_attention_heads", cfg_path)
    if n_embd % n_head and config.get("head_dim") is None:
        raise UserError(f"{cfg_path}: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}")
    dims = check_llama_dims(
        cfg_path, n_embd, _need(config, "num_hidden_layers", cfg_path), n_head, config.get("num_key_value_heads") or n_head,
        _need(config, "intermediate_size", cfg_path), config.get("head_dim") or n_embd // n_head,
        ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim"))
    n_layer, n_head_kv, n_ff, head_dim = dims.n_layer, dims.n_head_kv, dims.n_ff, dims.head_dim
    vocab_size = config.get("vocab_size")
    if vocab_size is not None:
        whole_number(vocab_size, "vocab_size", cfg_path)
    for key in ("rope_theta", "rms_norm_eps"):
        if config.get(key) is not None:
            positive_number(config[key], key, cfg_path)
    if (ctx := config.get("max_position_embeddings")) is not None:
        whole_number(ctx, "max_position_embeddings", cfg_path, high=(1 << 32) - 1)  # a GGUF u32

    weights = WeightFiles(folder)
    conv = Conversion(source=folder, kind="Hugging Face", recorder=new_recorder(name), n_head=n_head, n_head_kv=n_head_kv)
    gw = conv.recorder

    # tokenizer first: it decides the vocabulary size convert would write
    if not (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder}: no tokenizer.json or tokenizer.model; the model cannot be converted without its vocabulary")

    # hyper-parameters, in the order TextModel/LlamaModel.set_gguf_parameters add them
    gw.add_block_count(n_layer)
    if (ctx := config.get("max_position_embeddings")) is not None:
        gw.add_context_length(int(ctx))
    gw.add_embedding_length(n_embd)
    gw.add_feed_forward_length(n_ff)
    gw.add_head_count(n_head)
    gw.add_head_count_kv(n_head_kv)
    if (theta := config.get("rope_theta")) is not None:
        gw.add_rope_freq_base(float(theta))
    gw.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    if config.get("head_dim") is not None:
        gw.add_key_length(head_dim)
        gw.add_value_length(head_dim)
    rope_freqs = _rope_scaling(gw, config, head_dim, cfg_path)

    # the vocabulary is read once into its own recorder and added after the hyper-parameters,
    # in the converters' order; its size goes into llama.vocab_size first
    vocab_gw = gguf.GGUFWriter(None, "llama")
    if (folder / "tokenizer.model").is_file():
        n_vocab = add_sentencepiece_vocab(vocab_gw, folder, vocab_size)
    else:
        n_vocab = add_bpe_vocab(vocab_gw, folder, vocab_size)
    gw.add_vocab_size(n_vocab)
    gw.add_rope_dimension_count(head_dim)
    if (folder / "tokenizer_config.json").is_file():
        tc = read_json(folder / "tokenizer_config.json")
        if (prefix := tc.get("add_prefix_space")) is not None:
            gw.add_add_space_prefix(bool(prefix))
    for key, value in vocab_gw.kv_data[0].items():
        if key != "general.architecture":
            gw.add_key_value(key, value.value, value.type, value.sub_type)
    if vocab_size == 49152:
        # convert_hf_to_gguf.py's LlamaModel: granite/SmolLM-sized vocabularies never add BOS
        gw.kv_data[0].pop(gguf.Keys.Tokenizer.ADD_BOS, None)  # replaced, not duplicated (gguf-py warns)
        gw.add_add_bos_token(False)

    # tensors: expected shape (numpy order) of each, then check the files against them
    dims = replace(dims, n_vocab=n_vocab)
    llama_shapes = dims.layer_shapes()
    layer_shapes = {hf: llama_shapes[ours] for hf, ours in LAYER_TENSORS.items()}
    expected = {"model.embed_tokens.weight": dims.global_shape("token_embd.weight")}
    for i in range(n_layer):
        for suffix, shape in layer_shapes.items():
            expected[f"model.layers.{i}.{suffix}"] = shape
    expected["model.norm.weight"] = dims.global_shape("output_norm.weight")
    if "lm_head.weight" in weights.where:
        expected["lm_head.weight"] = dims.global_shape("output.weight")
    elif not config.get("tie_word_embeddings", False):
        raise UserError(f"{folder}: tensor lm_head.weight is missing (and config.json does not tie it to the embeddings); a shard may be missing")

    for hf_name in weights.where:
        if hf_name not in expected and not IGNORED.match(hf_name):
            raise UserError(f"{weights.folder / weights.where[hf_name]}: tensor {hf_name!r} is not part of a {arch} with this config.json (num_hidden_layers {n_layer}); cannot convert it")

    if rope_freqs is not None:
        conv.tensors.append(PlannedTensor("rope_freqs.weight", rope_freqs.shape, "F32", lambda r=rope_freqs: r))
    order = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{s}" for i in range(n_layer) for s in layer_shapes] + ["model.norm.weight", "lm_head.weight"]
    for hf_name in order:
        if hf_name not in expected:
            continue
        if hf_name not in weights.where:
            raise UserError(f"{folder}: tensor {hf_name} is missing from the weight files (a shard may be missing)")
        shape = weights.shape(hf_name)
        if shape != expected[hf_name]:
            raise UserError(f"{weights.folder / weights.where[hf_name]}: tensor {hf_name} has shape {list(shape)}, config.json implies {list(expected[hf_name])}")
        conv.tensors.append(_planned(weights, hf_name, n_head, n_head_kv))
    return conv


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", hf_name)
    return f"blk.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}"


def _planned(weights: WeightFiles, hf_name: str, n_head: int, n_head_kv: int) -> PlannedTensor:
    name = gguf_name(hf_name)
    heads = n_head if name.endswith("attn_q.weight") else n_head_kv if name.endswith("attn_k.weight") else None

    def load() -> np.ndarray:
        x = weights.tensor(hf_name).to_f32()
        return permute_for_rope(x, heads) if heads else x

    src = weights.files[weights.where[hf_name]]
    dtype = src.tensor(hf_name).dtype
    return PlannedTensor(name, weights.shape(hf_name), dtype, load)


def _rope_scaling(gw, config: dict, head_dim: int, path: Path):
    """Linear RoPE scaling -> rope.scaling.* keys; Llama 3.1's "llama3" scaling -> the
    rope_freqs tensor convert_hf_to_gguf.py computes. Returns that tensor or None."""
    scaling = config.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise UserError(f"{path}: rope_scaling must be an object, not {shown(scaling)}")
    kind = scaling.get("rope_type") or scaling.get("type") or ""
    if not isinstance(kind, str):
        raise UserError(f"{path}: rope_scaling type must be text, not {shown(kind)}")
    kind = kind.lower()
    if not kind or kind == "default":
        return None
    if kind == "linear":
        gw.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        gw.add_rope_scaling_factor(positive_number(scaling.get("factor"), "rope_scaling factor", path))
        return None
    if kind == "llama3":
        base = positive_number(config.get("rope_theta", 10000.0), "rope_theta", path)
        freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        factor = positive_number(scaling.get("factor", 8.0), "rope_scaling factor", path)
        low = positive_number(scaling.get("low_freq_factor", 1.0), "rope_scaling low_freq_factor", path)
        high = positive_number(scaling.get("high_freq_factor", 4.0), "rope_scaling high_freq_factor", path)
        if high <= low:
            raise UserError(f"{path}: rope_scaling high_freq_factor {high:g} must be larger than low_freq_factor {low:g}")
        old_ctx = positive_number(scaling.get("original_max_position_embeddings", 8192), "rope_scaling original_max_position_embeddings", path)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / float(freq)
            if wavelen < high_wavelen:
                factors.append(1.0)
            elif wavelen > low_wavelen:
                factors.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return np.array(factors, dtype=np.float32)
    raise UserError(f"{path}: rope_scaling type {shown(kind)} is not supported (linear and llama3 are)")
