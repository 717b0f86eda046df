"""Merging a PEFT LoRA adapter into the base weights before conversion / quantization.

An adapter folder holds adapter_config.json (r, lora_alpha, target_modules, optional
use_rslora) and adapter_model.safetensors (or adapter_model.bin) with, per adapted module,
`base_model.model.<HF module>.lora_A.weight` (r x in) and `.lora_B.weight` (out x r).
Merged weight, in float32 and Hugging Face's row order:

    W' = W + (lora_alpha / r) * (B @ A)          (alpha / sqrt(r) with use_rslora)

For q and k the delta is then permuted to llama.cpp's row order like the weights
themselves (conversion.permute_for_rope), so one merge serves Hugging Face, Meta and GGUF
bases alike. Every shape is checked before anything is written; an adapter tensor that
does not fit (or names a module the base lacks) is refused naming that tensor.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamachat.runtime.errors import UserError

from .conversion import Conversion, PlannedTensor, permute_for_rope
from .import_hf import GLOBAL_TENSORS, LAYER_TENSORS
from .pth_reader import PthFile
from .safetensors_reader import SafetensorsFile

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


@dataclass
class LoraPair:
    module: str  # Hugging Face module, e.g. model.layers.0.self_attn.q_proj
    target: str  # GGUF tensor name, e.g. blk.0.attn_q.weight
    a: object  # CheckpointTensor, r x in
    b: object  # CheckpointTensor, out x r
    scale: float

    def delta(self) -> np.ndarray:
        """scale * (B @ A) in float32, Hugging Face row order."""
        return np.float32(self.scale) * (self.b.to_f32() @ self.a.to_f32())


@dataclass
class Adapter:
    folder: Path
    r: int
    alpha: float
    scale: float
    pairs: list[LoraPair]


def _target_name(module: str) -> str | None:
    hf = module + ".weight"
    if hf in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf]
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", hf)
    if m and m.group(2) in LAYER_TENSORS:
        return f"blk.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}"
    return None


def load_adapter(folder) -> Adapter:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; --lora takes a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    cfg_path = folder / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder}: no adapter_config.json; --lora takes a PEFT adapter folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{cfg_path}: cannot be read as JSON ({err})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise UserError(f"{cfg_path}: r must be a positive whole number and lora_alpha a number")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError(f"{cfg_path}: per-module rank_pattern / alpha_pattern are not supported")
    if cfg.get("modules_to_save"):
        raise UserError(f"{cfg_path}: modules_to_save ({', '.join(cfg['modules_to_save'])}) replace whole base tensors; such adapters are not supported")
    if cfg.get("fan_in_fan_out"):
        raise UserError(f"{cfg_path}: fan_in_fan_out adapters (GPT-2 style Conv1D) do not apply to llama models")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    targets = cfg.get("target_modules") or []

    def targeted(module: str) -> bool:
        # PEFT: a string is a regex the full module name must match; a list names modules by suffix
        if isinstance(targets, str):
            return re.fullmatch(targets, module) is not None
        return not targets or module in targets or module.rsplit(".", 1)[-1] in targets

    weights_path = next((p for p in (folder / "adapter_model.safetensors", folder / "adapter_model.bin") if p.is_file()), None)
    if weights_path is None:
        raise UserError(f"{folder}: no adapter_model.safetensors (or adapter_model.bin)")
    weights = SafetensorsFile(weights_path) if weights_path.suffix == ".safetensors" else PthFile(weights_path)

    found: dict[str, dict[str, object]] = {}
    for key in weights.names:
        if "lora_embedding_" in key:
            raise UserError(f"{weights_path}: {key} is an embedding LoRA; only linear layers can be merged")
        m = _KEY.match(key)
        if not m:
            raise UserError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight of a PEFT adapter")
        found.setdefault(m.group("module"), {})[m.group("ab")] = weights.tensor(key)
    pairs = []
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise UserError(f"{weights_path}: base_model.model.{module}.lora_{missing}.weight is missing")
        if not targeted(module):
            continue  # PEFT only applies the targeted modules
        target = _target_name(module)
        if target is None:
            raise UserError(f"{weights_path}: adapter tensor base_model.model.{module}.lora_A.weight targets {module}, which a llama model does not have")
        a, b = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
            raise UserError(
                f"{weights_path}: base_model.model.{module}.lora_A/B have shapes {list(a.shape)} and {list(b.shape)}, "
                f"not [r, in] and [out, r] with r = {r} from adapter_config.json"
            )
        pairs.append(LoraPair(module, target, a, b, scale))
    if not pairs:
        raise UserError(f"{weights_path}: holds no LoRA weights for the target modules {targets}")
    return Adapter(folder, r, float(alpha), scale, pairs)


def apply_adapter(conv: Conversion, adapter: Adapter) -> int:
    """Wrap the loaders of the adapted tensors of `conv`; shapes checked now. Returns how
    many tensors the adapter changes."""
    by_name = {t.name: (i, t) for i, t in enumerate(conv.tensors)}
    for pair in adapter.pairs:
        hit = by_name.get(pair.target)
        out_in = (pair.b.shape[0], pair.a.shape[1])
        if hit is None:
            raise UserError(f"{adapter.folder}: base_model.model.{pair.module}.lora_A.weight adapts {pair.target}, which the base model does not have")
        i, base = hit
        if tuple(base.shape) != out_in:
            raise UserError(
                f"{adapter.folder}: base_model.model.{pair.module}.lora_B.weight x lora_A.weight is {list(out_in)} "
                f"but the base tensor {pair.target} is {list(base.shape)}; the adapter was made for another model"
            )
        heads = conv.n_head if pair.target.endswith("attn_q.weight") else conv.n_head_kv if pair.target.endswith("attn_k.weight") else None
        conv.tensors[i] = PlannedTensor(base.name, base.shape, base.source_dtype + "+LoRA", _merged(base.load, pair, heads))
    return len(adapter.pairs)


def _merged(load, pair: LoraPair, heads: int | None):
    def merged() -> np.ndarray:
        delta = pair.delta()
        if heads:
            delta = permute_for_rope(delta, heads)
        return load() + delta

    return merged
