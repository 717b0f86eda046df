"""Converting a whole GGUF model to another quantization type, as llama-quantize does.

`quantize_model(IN, OUT, "Q4_K_M", ...)` makes the same file llama.cpp's llama-quantize makes
(llama-quant.cpp at llama.cpp 0c1e570, no importance matrix): the same type for every tensor
and, through runtime.quants, the same bytes.

Which type a tensor gets (`plan_tensor_types`, llama_tensor_get_type):
- only 2-D (and 3-D) tensors whose name ends in "weight", not norms, not output.weight with
  --leave-output-tensor, are converted; everything else is copied as it is;
- the file type's default type (Q4_K for Q4_K_M, ...), changed per tensor by the mix rules of
  the _S/_M/_L types (attn_v, ffn_down, attn_output; use_more_bits on some layers) unless
  --pure; output.weight (and token_embd.weight when the output is tied to it) gets Q6_K, or
  Q8_0 when its rows do not fit the default type's blocks;
- a type whose block does not divide the row length falls back (Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, then F16): SmolLM2's 576-wide rows hit this.
Tensors are written in llama.cpp's order (non-layer tensors first, then by layer, by name).

The file is written to a temporary file beside OUT, read back and checked (every tensor's
type, shape and sha256), then renamed to OUT; on any failure or Ctrl-C the temporary file is
removed and OUT (if it existed) and IN are untouched.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from ..errors import UserError
from .reader import GGUFFile
from ..quants import FORMATS, dequantize, quantize, row_nbytes

T = GGMLQuantizationType
F = LlamaFileType

GGML_QNT_VERSION = 2  # general.quantization_version llama.cpp writes

# llama-quantize's type names -> (file type, default tensor type), in its order.
QUANT_TYPES: dict[str, tuple[LlamaFileType, GGMLQuantizationType]] = {
    "Q4_0": (F.MOSTLY_Q4_0, T.Q4_0),
    "Q4_1": (F.MOSTLY_Q4_1, T.Q4_1),
    "Q5_0": (F.MOSTLY_Q5_0, T.Q5_0),
    "Q5_1": (F.MOSTLY_Q5_1, T.Q5_1),
    "Q2_K": (F.MOSTLY_Q2_K, T.Q2_K),
    "Q3_K_S": (F.MOSTLY_Q3_K_S, T.Q3_K),
    "Q3_K_M": (F.MOSTLY_Q3_K_M, T.Q3_K),
    "Q3_K_L": (F.MOSTLY_Q3_K_L, T.Q3_K),
    "Q4_K_S": (F.MOSTLY_Q4_K_S, T.Q4_K),
    "Q4_K_M": (F.MOSTLY_Q4_K_M, T.Q4_K),
    "Q5_K_S": (F.MOSTLY_Q5_K_S, T.Q5_K),
    "Q5_K_M": (F.MOSTLY_Q5_K_M, T.Q5_K),
    "Q6_K": (F.MOSTLY_Q6_K, T.Q6_K),
    "Q8_0": (F.MOSTLY_Q8_0, T.Q8_0),
    "F16": (F.MOSTLY_F16, T.F16),
    "BF16": (F.MOSTLY_BF16, T.BF16),
    "F32": (F.ALL_F32, T.F32),
}
# llama-quantize accepts these short names for the _M mixes
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# tensor type fallbacks where the row length is not a multiple of the type's block
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

PLAIN_TYPES = (T.F32, T.F16, T.BF16)
ROWS_PER_CHUNK = 4096  # bounds the float32 working memory per step and lets Ctrl-C in between


def parse_quant_type(name: str) -> str:
    """A llama.cpp type name (any case; Q4_K etc. as aliases) -> its canonical name."""
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    if key not in QUANT_TYPES:
        from ..params import suggestion

        shown = name if len(name) <= 40 else name[:40] + "..."
        raise UserError(f"unknown quantization type {shown!r}{suggestion(key, QUANT_TYPES)}; valid types: {', '.join(QUANT_TYPES)}")
    return key


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    src_type: GGMLQuantizationType
    dst_type: GGMLQuantizationType
    fell_back: bool = False  # the mix's type did not fit the rows

    @property
    def converted(self) -> bool:
        return self.src_type != self.dst_type


def _category(name: str) -> str:
    """tensor_get_category: broad roles used by the mix rules."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _allows_quantization(name: str, shape: tuple[int, ...], leave_output_tensor: bool) -> bool:
    """tensor_allows_quantization (the parts that can apply to llama-family files)."""
    if len(shape) < 2 or all(d == 1 for d in shape[1:]):  # ggml_n_dims < 2
        return False
    if not name.endswith("weight") or "_norm.weight" in name:
        return False
    if leave_output_tensor and name == "output.weight":
        return False
    excluded = ("ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj", "ssm_conv1d", "attn_rel_b.weight",
                "time_mix_", "position_embd", "token_types.weight")
    return not any(e in name for e in excluded)


def _layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def llama_tensor_order(names) -> list[str]:
    """llama_model_loader's weight_name_comparer: by layer number (non-layer tensors first),
    then by name."""
    return sorted(names, key=lambda n: (_layer_of(n), n))


class _MixState:
    """quantize_state_impl: the per-role counters the mix rules look at."""

    def __init__(self, metadata: dict, names: list[str]):
        arch = metadata.get("general.architecture", "llama")
        self.arch = arch
        self.n_layer = int(metadata.get(f"{arch}.block_count", 0) or 0)
        n_head = int(metadata.get(f"{arch}.attention.head_count", 0) or 0)
        n_head_kv = int(metadata.get(f"{arch}.attention.head_count_kv", n_head) or n_head)
        self.n_gqa = n_head // n_head_kv if n_head_kv else 0
        self.n_expert = int(metadata.get(f"{arch}.expert_count", 0) or 0)
        self.is_70b = arch == "llama" and self.n_layer == 80 and n_head != n_head_kv
        cats = [_category(n) for n in names]
        self.n_attention_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats)
        self.tied_embeddings = "output" not in cats
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _mix_type(qs: _MixState, new_type: T, name: str, row_len: int, ftype: F, category: str) -> T:
    """llama_tensor_get_type_impl for the file types llamachat offers."""
    falcon = qs.arch == "falcon"
    if category == "output" or (qs.tied_embeddings and category == "token_embd"):
        if falcon or row_len % GGML_QUANT_SIZES[new_type][0]:
            return T.Q8_0
        return new_type if new_type == T.Q8_0 else T.Q6_K
    if category == "token_embd":
        return new_type
    if category in ("attn_v", "attn_qkv", "attn_kv_b"):
        if ftype == F.MOSTLY_Q2_K:
            new_type = T.Q4_K if qs.n_gqa >= 4 else T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new_type = T.Q5_K if qs.i_attention_wv < 2 else T.Q4_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new_type = T.Q5_K
        elif ftype in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new_type = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and qs.i_attention_wv < 4:
            new_type = T.Q5_K
        if qs.is_70b and new_type in (T.Q3_K, T.Q4_K):
            new_type = T.Q5_K
        if qs.n_expert == 8:
            new_type = T.Q8_0
        qs.i_attention_wv += 1
    elif category == "attn_k":
        if qs.n_expert == 8:
            new_type = T.Q8_0
    elif category == "ffn_down":
        i_layer, n_layer = qs.i_ffn_down, qs.n_layer
        if qs.n_expert > 1:
            i_layer = _layer_of(name)
        if ftype == F.MOSTLY_Q2_K:
            new_type = T.Q3_K
        elif ftype == F.MOSTLY_Q3_K_M:
            new_type = (T.Q5_K if i_layer < n_layer // 16
                        else T.Q4_K if not falcon or _use_more_bits(i_layer, n_layer) else T.Q3_K)
        elif ftype == F.MOSTLY_Q3_K_L:
            new_type = T.Q4_K if falcon else T.Q5_K
        elif ftype == F.MOSTLY_Q4_K_M:
            if falcon:
                new_type = (T.Q6_K if i_layer < n_layer // 16
                            else T.Q5_K if _use_more_bits(i_layer, n_layer) else T.Q4_K)
            elif _use_more_bits(i_layer, n_layer):
                new_type = T.Q6_K
        elif ftype == F.MOSTLY_Q5_K_M and _use_more_bits(i_layer, n_layer):
            new_type = T.Q6_K
        elif ftype == F.MOSTLY_Q4_K_S and not falcon and i_layer < n_layer // 8:
            new_type = T.Q5_K
        qs.i_ffn_down += 1
    elif category == "attn_output":
        if not falcon:
            if qs.n_expert == 8:
                if ftype in (F.MOSTLY_Q2_K, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M):
                    new_type = T.Q5_K
            elif ftype == F.MOSTLY_Q2_K:
                new_type = T.Q3_K
            elif ftype == F.MOSTLY_Q3_K_M:
                new_type = T.Q4_K
            elif ftype == F.MOSTLY_Q3_K_L:
                new_type = T.Q5_K
        elif ftype == F.MOSTLY_Q3_K_L:
            new_type = T.Q4_K
    elif category == "ffn_gate":
        qs.i_ffn_gate += 1
    elif category == "ffn_up":
        qs.i_ffn_up += 1
    return new_type


def plan_tensor_types(g: GGUFFile, quant_type: str, pure: bool = False, leave_output_tensor: bool = False) -> list[TensorPlan]:
    """Every tensor of g in llama.cpp's output order with the type llama-quantize gives it."""
    ftype, default_type = QUANT_TYPES[quant_type]
    names = llama_tensor_order(g.tensors)
    qs = _MixState(g.metadata, names)
    plans = []
    for name in names:
        info = g.tensors[name]
        plan = TensorPlan(name, tuple(info.shape), info.ggml_type, info.ggml_type)
        if _allows_quantization(name, info.shape, leave_output_tensor):
            new_type = default_type
            if default_type not in PLAIN_TYPES:  # ggml_is_quantized(default_type)
                if not pure:
                    new_type = _mix_type(qs, new_type, name, info.shape[0], ftype, _category(name))
                if info.shape[0] % GGML_QUANT_SIZES[new_type][0]:
                    plan.fell_back = True
                    new_type = FALLBACK.get(new_type, T.F16)
                    if info.shape[0] % GGML_QUANT_SIZES[new_type][0]:
                        new_type = T.F16
            plan.dst_type = new_type
        plans.append(plan)
    return plans


@dataclass
class QuantizeResult:
    out_path: Path
    quant_type: str
    plans: list[TensorPlan]
    size_before: int  # bytes of tensor data in IN
    size_after: int  # bytes of tensor data in OUT
    n_elements: int
    seconds: float


# on_tensor(index, n_tensors, plan, bytes_before, bytes_after) after each tensor is done
ProgressCallback = Callable[[int, int, TensorPlan, int, int], None]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _convert(info, plan: TensorPlan, sha: "hashlib._Hash") -> np.ndarray:
    """The tensor's bytes in plan.dst_type (uint8, 1-D), hashed into sha as produced."""
    if not plan.converted:
        data = np.asarray(info.data())
        sha.update(data)
        return data
    n_per_row = info.shape[0]
    src_rows = info.rows()
    out = np.empty((info.n_rows, row_nbytes(plan.dst_type, n_per_row)), dtype=np.uint8)
    for start in range(0, info.n_rows, ROWS_PER_CHUNK):
        stop = min(info.n_rows, start + ROWS_PER_CHUNK)
        x = dequantize(src_rows[start:stop], plan.src_type, n_per_row)
        out[start:stop] = quantize(x, plan.dst_type)
    data = out.reshape(-1)
    sha.update(data)
    return data


def quantize_model(in_path, out_path, quant_type: str, *, allow_requantize: bool = False, pure: bool = False,
                   leave_output_tensor: bool = False, force: bool = False,
                   on_tensor: ProgressCallback | None = None) -> QuantizeResult:
    """Write OUT = IN converted to quant_type (a llama.cpp name, see QUANT_TYPES); see the
    module docstring. Raises UserError for anything the user can fix, before writing."""
    quant_type = parse_quant_type(quant_type)
    in_path, out_path = Path(in_path), Path(out_path)
    if _same_file(in_path, out_path):
        raise UserError(f"{out_path}: the output file is the input file; give another name for the output")
    if out_path.is_dir():
        raise UserError(f"{out_path}: is a directory; give the output file's name")
    if out_path.exists() and not force:
        raise UserError(f"{out_path}: already exists; pass --force to overwrite it")
    out_dir = out_path.parent
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: no such directory for the output file")
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"{out_dir}: cannot write there (permission denied)")

    t0 = time.perf_counter()
    with GGUFFile(in_path) as g:
        plans = plan_tensor_types(g, quant_type, pure=pure, leave_output_tensor=leave_output_tensor)
        for p in plans:
            if not p.converted:
                continue
            if p.src_type not in FORMATS:
                raise UserError(f"{in_path}: tensor {p.name} is {p.src_type.name}, which llamachat cannot convert")
            if p.src_type not in PLAIN_TYPES and not allow_requantize:
                raise UserError(f"{in_path}: tensor {p.name} is already quantized ({p.src_type.name}); requantizing "
                                f"loses quality, so it needs --allow-requantize")
        size_before = sum(g.tensors[p.name].nbytes for p in plans)
        sizes_after = [g.tensors[p.name].n_rows * row_nbytes(p.dst_type, p.shape[0]) for p in plans]
        size_after = sum(sizes_after)
        n_elements = sum(g.tensors[p.name].n_elements for p in plans)
        free = shutil.disk_usage(out_dir).free
        if size_after + (1 << 20) > free:
            raise UserError(f"{out_dir}: not enough free disk space for the output "
                            f"({size_after / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free)")

        ftype, _ = QUANT_TYPES[quant_type]
        metadata = dict(g.metadata)
        value_types = dict(g.value_types)
        metadata["general.quantization_version"] = GGML_QNT_VERSION
        value_types["general.quantization_version"] = GGUFValueType.UINT32
        metadata["general.file_type"] = int(ftype)
        value_types["general.file_type"] = GGUFValueType.UINT32
        for key in ("split.no", "split.count", "split.tensors.count"):  # the output is one file
            metadata.pop(key, None)

        hashes = {p.name: hashlib.sha256() for p in plans}

        def tensor_source(i: int, p: TensorPlan):
            def produce():
                data = _convert(g.tensors[p.name], p, hashes[p.name])
                if on_tensor is not None:
                    on_tensor(i, len(plans), p, g.tensors[p.name].nbytes, data.nbytes)
                return data
            return produce

        fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{out_path.name}.", suffix=".partial")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            try:
                from .writer import write_gguf

                write_gguf(tmp, metadata, ((p.name, p.shape, p.dst_type, tensor_source(i, p)) for i, p in enumerate(plans)),
                           value_types=value_types, alignment=g.alignment, array_types=g.array_types)
            except OSError as e:
                raise UserError(f"{out_path}: writing failed: {e.strerror or e}") from None
            _verify(tmp, out_path, plans, {k: h.hexdigest() for k, h in hashes.items()})
            os.replace(tmp, out_path)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
    return QuantizeResult(out_path, quant_type, plans, size_before, size_after, n_elements, time.perf_counter() - t0)


def _verify(tmp: Path, out_path: Path, plans: list[TensorPlan], hashes: dict[str, str]) -> None:
    """Read the written file back: valid GGUF, the planned tensors, the bytes we produced."""
    with GGUFFile(tmp) as w:
        if list(w.tensors) != [p.name for p in plans]:
            raise UserError(f"{out_path}: the written file's tensors differ from the plan; nothing was written")
        for p in plans:
            info = w.tensors[p.name]
            if info.ggml_type != p.dst_type or tuple(info.shape) != p.shape:
                raise UserError(f"{out_path}: tensor {p.name} was written wrongly; nothing was written")
            if hashlib.sha256(info.data()).hexdigest() != hashes[p.name]:
                raise UserError(f"{out_path}: tensor {p.name} did not read back as written; nothing was written")
