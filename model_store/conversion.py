"""What every source format converts into, and writing it as a GGUF F16 file.

A `Conversion` is the plan for one GGUF: metadata recorded through gguf-py's GGUFWriter
(so keys and value types are exactly the ones llama.cpp's converters write) and a list of
`PlannedTensor`s, each able to load itself as float32 in llama.cpp's layout on demand. The
importers (import_hf, import_meta, importers.plan_gguf) build one; lora.py wraps the
tensors' loaders; `write_float` streams it to disk one tensor at a time.

Output types follow convert_hf_to_gguf.py with `--outtype f16`: 1-D tensors and norms stay
F32, every other tensor becomes F16 (round to nearest even, as torch's `.to(float16)`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType, LlamaFileType

from llamachat.runtime.errors import UserError, shown
from llamachat.runtime.gguf.writer import write_gguf

from .checkpoint_tensor import bf16_bits

Progress = Callable[[str, int, int, str], None]  # (stage, done, total, what)

# Bounds on a source's hyper-parameters, far above any llama-family model (the largest have
# 126 layers, hidden size 16384, a 256k vocabulary) and low enough that nothing sized by them
# (the expected-tensor table, a row) is allocated before the files are checked against them.
MAX_DIM = 1 << 20
MAX_LAYERS = 4096

# llama.cpp's layer tensors (after "blk.N.") and their shapes in numpy order (rows, row
# length), from the hyper-parameters: one table for every importer.
LLAMA_LAYER_SHAPES: dict[str, Callable[["LlamaDims"], tuple[int, ...]]] = {
    "attn_norm.weight": lambda d: (d.n_embd,),
    "attn_q.weight": lambda d: (d.n_head * d.head_dim, d.n_embd),
    "attn_k.weight": lambda d: (d.n_head_kv * d.head_dim, d.n_embd),
    "attn_v.weight": lambda d: (d.n_head_kv * d.head_dim, d.n_embd),
    "attn_output.weight": lambda d: (d.n_embd, d.n_head * d.head_dim),
    "ffn_norm.weight": lambda d: (d.n_embd,),
    "ffn_gate.weight": lambda d: (d.n_ff, d.n_embd),
    "ffn_up.weight": lambda d: (d.n_ff, d.n_embd),
    "ffn_down.weight": lambda d: (d.n_embd, d.n_ff),
}
LLAMA_GLOBAL_SHAPES: dict[str, Callable[["LlamaDims"], tuple[int, ...]]] = {
    "token_embd.weight": lambda d: (d.n_vocab, d.n_embd),
    "output_norm.weight": lambda d: (d.n_embd,),
    "output.weight": lambda d: (d.n_vocab, d.n_embd),
}


@dataclass(frozen=True)
class LlamaDims:
    """A llama model's sizes as a source states them, checked (check_llama_dims)."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    head_dim: int
    n_vocab: int = 0  # known once the tokenizer is read

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape(self) for name, shape in LLAMA_LAYER_SHAPES.items()}

    def global_shape(self, name: str) -> tuple[int, ...]:
        return LLAMA_GLOBAL_SHAPES[name](self)


def whole_number(value, key: str, where, low: int = 1, high: int = MAX_DIM) -> int:
    """A hyper-parameter that must be an integer in [low, high] (JSON 1e9 and "64" are not)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: {key} must be a whole number, not {shown(value)}")
    if not low <= value <= high:
        raise UserError(f"{where}: {key} is {value}; it must be between {low} and {high}")
    return value


def positive_number(value, key: str, where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{where}: {key} must be a positive number, not {shown(value)}")
    return float(value)


def check_llama_dims(where, n_embd, n_layer, n_head, n_head_kv, n_ff, head_dim, names) -> LlamaDims:
    """The sizes, each a bounded whole number, consistent with each other; `names` are the
    source's own key names (hidden_size / dim, ...) in the order of the arguments."""
    k_embd, k_layer, k_head, k_head_kv, k_ff, k_head_dim = names
    dims = LlamaDims(
        n_embd=whole_number(n_embd, k_embd, where), n_layer=whole_number(n_layer, k_layer, where, high=MAX_LAYERS),
        n_head=whole_number(n_head, k_head, where), n_head_kv=whole_number(n_head_kv, k_head_kv, where),
        n_ff=whole_number(n_ff, k_ff, where), head_dim=whole_number(head_dim, k_head_dim, where),
    )
    if dims.n_head % dims.n_head_kv or dims.head_dim % 2:
        raise UserError(f"{where}: {k_head} {dims.n_head} / {k_head_kv} {dims.n_head_kv} / head size {dims.head_dim} "
                        "do not form a llama model (the heads must divide evenly, the head size be even)")
    return dims


# JSON files beside a checkpoint (config.json, params.json, indexes, tokenizer.json): the
# largest real ones are tokenizer.json files of some tens of megabytes.
MAX_JSON_BYTES = 256 << 20


def read_json_file(path: Path, max_bytes: int = MAX_JSON_BYTES):
    """A JSON file's value, or one UserError: not a regular file, too large, not UTF-8, not
    JSON, or nested too deeply for the parser (a hostile config.json)."""
    import json
    import stat

    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{path}: not a regular file, so not read as JSON")
        if st.st_size > max_bytes:
            raise UserError(f"{path}: {st.st_size} bytes, more than a JSON file beside a model needs ({max_bytes}); not read")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise UserError(f"{path}: more than {max_bytes} bytes, more than a JSON file beside a model needs; not read")
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise UserError(f"{path}: cannot be read as JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: cannot be read as JSON ({shown(str(err), 200)[1:-1]})") from None


@dataclass
class PlannedTensor:
    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]  # numpy order: (rows, row length)
    source_dtype: str  # shown in the progress log
    load: Callable[[], np.ndarray]  # float32, llama.cpp layout, `shape`

    float_type: GGMLQuantizationType = GGMLQuantizationType.F16  # what 2-D weights are written as

    @property
    def out_type(self) -> GGMLQuantizationType:
        if len(self.shape) <= 1 or self.name.endswith("_norm.weight"):
            return GGMLQuantizationType.F32
        return self.float_type

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def out_nbytes(self) -> int:
        return self.n_elements * (4 if self.out_type == GGMLQuantizationType.F32 else 2)


@dataclass
class Conversion:
    source: Path
    kind: str  # "Hugging Face", "Meta", "GGUF"
    recorder: gguf.GGUFWriter  # metadata, recorded (never written by gguf-py)
    tensors: list[PlannedTensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # said to the user (e.g. the vocab size used)
    n_head: int = 0
    n_head_kv: int = 0
    array_types: dict = field(default_factory=dict)  # element types of array keys, when known (a GGUF source)

    @property
    def out_nbytes(self) -> int:
        return sum(t.out_nbytes for t in self.tensors)

    def find(self, name: str) -> PlannedTensor | None:
        for t in self.tensors:
            if t.name == name:
                return t
        return None


def new_recorder(name: str) -> gguf.GGUFWriter:
    """A GGUFWriter that is never opened: only its add_* methods are used, to record the
    metadata the way the converters add it (general.* first, as they do)."""
    gw = gguf.GGUFWriter(None, "llama")
    gw.add_type("model")
    gw.add_name(name)
    return gw


def recorded_metadata(gw: gguf.GGUFWriter) -> tuple[dict, dict]:
    """(metadata, value_types) for write_gguf from the recorder's key/values."""
    metadata, types = {}, {}
    for key, v in gw.kv_data[0].items():
        metadata[key] = v.value
        if v.type != GGUFValueType.ARRAY:
            types[key] = v.type
    return metadata, types


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face q/k rows -> llama.cpp's (Meta's) order: convert_hf_to_gguf.py's
    `LlamaModel.permute`. HF rotates the two halves of each head; llama.cpp (like Meta's
    code) rotates adjacent pairs, so each head's rows are interleaved back."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_for_rope` (llama.cpp order -> Hugging Face order)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


FILE_TYPES = {
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
}


def _cast(x: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    if ggml_type == GGMLQuantizationType.F32:
        return x.astype(np.float32)
    if ggml_type == GGMLQuantizationType.BF16:
        return bf16_bits(x)
    return x.astype(np.float16)  # round to nearest even, as torch's .to(torch.float16)


def write_float(conv: Conversion, path: Path, progress: Progress | None = None,
                float_type: GGMLQuantizationType = GGMLQuantizationType.F16) -> Path:
    """Write the conversion as GGUF to `path` (2-D weights as `float_type`: F16 by default,
    BF16 or F32), atomically; each tensor is loaded only when it is written."""
    for t in conv.tensors:
        t.float_type = float_type
    gw = conv.recorder
    gw.add_file_type(FILE_TYPES[float_type])
    gw.add_quantization_version(gguf.GGML_QUANT_VERSION)
    metadata, value_types = recorded_metadata(gw)
    total = len(conv.tensors)

    def data_of(i: int, t: PlannedTensor):
        def load():
            if progress:
                progress("convert", i, total, f"{t.name} {t.source_dtype} -> {t.out_type.name} {list(t.shape)}")
            x = t.load()
            if tuple(x.shape) != tuple(t.shape):  # a bug, not a user error: shapes were checked when planned
                raise AssertionError(f"{t.name}: loaded {x.shape}, planned {t.shape}")
            out = _cast(x, t.out_type)
            if progress and i + 1 == total:
                progress("convert", total, total, "")
            return out

        return load

    entries = [(t.name, tuple(reversed(t.shape)), t.out_type, data_of(i, t)) for i, t in enumerate(conv.tensors)]
    return write_gguf(path, metadata, entries, value_types=value_types, array_types=conv.array_types)


def free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize
