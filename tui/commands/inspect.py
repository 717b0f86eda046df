"""`llamachat inspect FILE [--json]`: describe a GGUF file, or refuse a broken one.

Opening the file validates it completely (runtime.gguf.reader), so a malformed file ends in
`llamachat: FILE: not a valid GGUF file: REASON` and exit 2, never a traceback. The summary
is what a user wants before running a model: architecture, size, quantization, shapes,
tokenizer. `--json` prints the same facts as one stable JSON object (keys in `describe`).

Imports only rich and the GGUF reader: no Textual, no numba.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from llamachat.runtime.gguf.constants import LlamaFileType

from llamachat.runtime.gguf.reader import GGUFFile

# tokenizer.ggml.model -> llama.cpp's vocabulary type (llama_vocab_type)
VOCAB_TYPES = {"llama": "SPM", "gpt2": "BPE", "bert": "WPM", "t5": "UGM", "rwkv": "RWKV", "plamo2": "PLaMo2", "no_vocab": "none"}
_DEFAULT_ROPE_BASE = 10000.0  # llama.cpp's default when {arch}.rope.freq_base is absent


def configure(parser) -> None:
    parser.add_argument("file", metavar="MODEL", help="path to a .gguf file, or a library model's name")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")


def file_type_name(file_type: int | None) -> str | None:
    """general.file_type as llama-quantize names it ("Q4_1", "Q4_K_M", "F16", "F32")."""
    if file_type is None:
        return None
    try:
        ft = LlamaFileType(int(file_type))
    except (TypeError, ValueError):
        return f"unknown ({_plain(file_type)})"
    return ft.name.removeprefix("MOSTLY_").removeprefix("ALL_")


MAX_JSON_CHARS = 1024  # --json cuts longer texts from the file, saying their length (the table shortens its own)


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_JSON_CHARS:
        return value[:MAX_JSON_CHARS] + f"... ({len(value)} characters)"
    return value


def _plain(value: Any) -> Any:
    """Metadata values as JSON-friendly Python values (per-layer arrays become lists; bytes
    that were not UTF-8, kept by the reader as surrogates, shown as U+FFFD)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def describe(g: GGUFFile) -> dict[str, Any]:
    """The facts `inspect` shows, as a stable dict (the --json output)."""
    md = g.metadata
    arch = md.get("general.architecture")
    pre = f"{arch}." if arch else "\0"  # no architecture: no per-architecture keys match

    types = Counter(t.ggml_type.name for t in g.tensors.values())
    file_type_id = md.get("general.file_type")
    file_type = file_type_name(file_type_id)
    guessed = file_type is None and bool(types)
    if guessed:
        # as llama.cpp's loader does without general.file_type: the most common tensor type
        file_type = types.most_common(1)[0][0]
    tokens = md.get("tokenizer.ggml.tokens")
    tok_model = md.get("tokenizer.ggml.model")
    heads = md.get(pre + "attention.head_count")
    kv_heads = md.get(pre + "attention.head_count_kv", heads)  # llama.cpp: absent = no GQA
    rope_base = md.get(pre + "rope.freq_base")
    vocab_size = len(tokens) if isinstance(tokens, list) else md.get(pre + "vocab_size")
    return {
        "path": _plain(str(g.path)),
        "file_size": g.file_size,
        "gguf_version": g.version,
        "architecture": _plain(arch),
        "name": _plain(md.get("general.name")),
        "parameters": sum(t.n_elements for t in g.tensors.values()),
        "file_type": file_type,
        "file_type_id": _plain(file_type_id),
        "file_type_guessed": guessed,
        "tensor_count": len(g.tensors),
        "tensor_types": dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
        "context_length": _plain(md.get(pre + "context_length")),
        "embedding_length": _plain(md.get(pre + "embedding_length")),
        "block_count": _plain(md.get(pre + "block_count")),
        "head_count": _plain(heads),
        "head_count_kv": _plain(kv_heads),
        "rope_freq_base": float(rope_base) if isinstance(rope_base, (int, float)) else _plain(rope_base),
        "vocab_type": _plain(VOCAB_TYPES.get(tok_model, tok_model)) if tok_model is not None else None,
        "tokenizer_model": _plain(tok_model),
        "vocab_size": _plain(vocab_size),
        "chat_template": isinstance(md.get("tokenizer.chat_template"), str),
        "metadata_keys": len(md),
    }


def human_size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # not reached


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


CLIP_CHARS = 120  # a string from the file is shown up to this long (the file may hold megabytes)


def _clip(text: str) -> str:
    return text if len(text) <= CLIP_CHARS else f"{text[:CLIP_CHARS]}... ({len(text)} characters)"


def _shown(value: Any, missing: str = "not set") -> str:
    return missing if value is None else _clip(str(value))


def _rows(d: dict[str, Any]) -> list[tuple[str, str]]:
    ft = d["file_type"] or "not recorded"
    if d["file_type_guessed"]:
        ft += " (guessed from the tensors: general.file_type is not set)"
    elif d["file_type_id"] is not None:
        ft += f" (general.file_type {d['file_type_id']})"
    types = ", ".join(f"{name} {count}" for name, count in d["tensor_types"].items()) or "none"
    vocab = _shown(d["vocab_type"])
    if d["tokenizer_model"] is not None and d["tokenizer_model"] != d["vocab_type"]:
        vocab += f" (tokenizer.ggml.model {_clip(repr(d['tokenizer_model']))})"
    rope = d["rope_freq_base"]
    rope = f"not set (llama.cpp uses {_DEFAULT_ROPE_BASE:g})" if rope is None else f"{rope:g}" if isinstance(rope, float) else str(rope)
    return [
        ("file", d["path"]),
        ("file size", human_size(d["file_size"]) + (f" ({d['file_size']:,} bytes)" if d["file_size"] >= 1024 else "")),
        ("GGUF version", str(d["gguf_version"])),
        ("architecture", _shown(d["architecture"])),
        ("model name", _shown(d["name"])),
        ("parameters", human_count(d["parameters"]) + (f" ({d['parameters']:,})" if d["parameters"] >= 1000 else "")),
        ("file type", ft),
        ("tensors", f"{d['tensor_count']}: {types}"),
        ("context length", _shown(d["context_length"])),
        ("embedding size", _shown(d["embedding_length"])),
        ("layers", _shown(d["block_count"])),
        ("heads", _shown(d["head_count"])),
        ("KV heads", _shown(d["head_count_kv"])),
        ("rope base", rope),
        ("vocabulary", f"{vocab}, " + (f"{d['vocab_size']} tokens" if d["vocab_size"] is not None else "size unknown")),
        ("chat template", "yes" if d["chat_template"] else "no"),
        ("metadata keys", str(d["metadata_keys"])),
    ]


def run(args) -> int:
    path = args.file
    if not os.path.exists(path):  # not a file here: a library name (the library says if it is neither)
        from llamachat.model_store.paths import model_file

        path = str(model_file(path))
    with GGUFFile(path) as g:
        d = describe(g)
    if args.json:
        print(json.dumps({k: _cut(v) for k, v in d.items()}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Text(), not markup: names and paths come from the file and may hold "[...]"
    table = Table(title=Text(f"GGUF model: {_shown(d['name']) if d['name'] else d['path']}"), show_header=False, box=None, title_justify="left")
    table.add_column("field", style="bold cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for field, value in _rows(d):
        table.add_row(field, Text(value))
    Console(highlight=False).print(table)
    return 0
