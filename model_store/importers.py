"""`import_model`: bring a model into the library from a GGUF file, a Hugging Face folder or
a Meta checkpoint, optionally merging a LoRA adapter and quantizing, then register it.

Owns the import's sequence and its promises:
1. everything that can be checked is checked before a byte is written: the source kind,
   the quant type, the name (free in the library, a free file name in the data dir), every
   tensor's shape, the adapter's shapes, and the free disk space;
2. all work happens in a private temporary folder inside the library's models dir (same
   file system, so the final step is a rename): the F16 GGUF is written there (one tensor
   at a time, never the whole model in memory), validated by opening it, quantized by
   runtime.gguf.quantize_model if asked, validated again;
3. the result is linked into place without ever replacing an existing file, then added to
   the library; if that fails the file is removed again. On any failure (full disk,
   Ctrl-C, bad input) the temporary folder is deleted: nothing half-written remains and
   neither the source nor the library is touched.

The sources' readers live in import_hf.py, import_meta.py (with safetensors_reader.py,
pth_reader.py, vocab_convert.py), ggml_reader.py (llama.cpp's files from before GGUF) and
lora.py; conversion.py writes the F16 file.
"""

from __future__ import annotations

import errno
import os
from importlib import resources
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from llamachat.runtime.gguf.constants import GGMLQuantizationType

from llamachat.runtime.errors import GGUFError, ModelError, UserError

from . import paths
from .conversion import Conversion, PlannedTensor, Progress, free_bytes, new_recorder, write_float
from .library import Library, ModelEntry, check_name, name_from_path

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


@dataclass
class ImportResult:
    entry: ModelEntry
    kind: str  # "GGUF", "Hugging Face", "Meta", "ggml" (llama.cpp's files before GGUF)
    path: Path
    size: int  # bytes of the stored file
    f16_size: int | None = None  # bytes of the F16 conversion (before quantizing), if made
    source_size: int | None = None  # bytes of a GGUF source
    notes: list[str] = field(default_factory=list)
    report: dict | None = None  # --report: quality_report's figures


def source_kind(source: Path) -> str:
    if source.is_file():
        from .ggml_reader import is_ggml

        try:
            with open(source, "rb") as f:
                if f.read(4) == b"GGUF":
                    return "GGUF"
        except OSError as err:
            raise UserError(f"{source}: cannot read ({err.strerror})") from None
        if is_ggml(source):
            return "ggml"
        raise UserError(f"{source}: not a GGUF file; import takes a .gguf file, a Hugging Face model folder (config.json), a Meta checkpoint folder (params.json) or one of llama.cpp's older ggml/ggmf/ggjt .bin files")
    if source.is_dir():
        if (source / "config.json").is_file():
            return "Hugging Face"
        if (source / "params.json").is_file():
            return "Meta"
        raise UserError(f"{source}: neither config.json (Hugging Face) nor params.json (Meta) is in this folder")
    if source.exists():  # /dev/zero, a FIFO, a socket: nothing an import reads
        raise UserError(f"{source}: not a regular file or a folder; import takes a .gguf file, a Hugging Face model folder, a Meta checkpoint folder or one of llama.cpp's older ggml/ggmf/ggjt .bin files")
    raise UserError(f"{source}: no such file or folder")


def check_quant_type(quant: str | None) -> str | None:
    """The canonical quant type name, or UserError listing the valid ones."""
    if quant is None:
        return None
    from llamachat.runtime.gguf.quantize_model import parse_quant_type

    return parse_quant_type(str(quant))


def default_name(source: Path, quant: str | None) -> str:
    folder = source.resolve()
    if source.is_file():
        base = name_from_path(source)
    elif re.fullmatch(r"\d+(\.\d+)?[bm]", folder.name.lower()) and folder.parent.name:
        base = name_from_path(Path(f"{folder.parent.name}-{folder.name}"))  # Meta's llama/7B -> llama-7b
    else:
        base = name_from_path(Path(folder.name))
    if quant and quant.lower() not in base:
        base = f"{base}-{quant.lower()}"
    return base[:80]


def plan_gguf(path: Path, name: str) -> Conversion:
    """A float GGUF as a Conversion (used to merge a LoRA into it): its metadata is kept,
    its tensors are re-read as float32."""
    from llamachat.runtime.gguf.reader import GGUFFile
    from llamachat.runtime.quants import dequantize

    g = GGUFFile(path)
    conv = Conversion(source=path, kind="GGUF", recorder=new_recorder(name))
    gw = conv.recorder
    skip = {"general.architecture", "general.type", "general.name", "general.file_type", "general.quantization_version", "general.alignment"}
    from llamachat.runtime.gguf.constants import GGUFValueType

    for key, value in g.metadata.items():
        if key in skip:
            continue
        vtype = g.value_types[key]
        if vtype == GGUFValueType.ARRAY:
            gw.add_key_value(key, list(value) if not isinstance(value, np.ndarray) else value, vtype)
        else:
            gw.add_key_value(key, value, vtype)
    conv.array_types = {k: v for k, v in g.array_types.items() if k not in skip}
    conv.n_head = int(g.get("llama.attention.head_count", 0))
    conv.n_head_kv = int(g.get("llama.attention.head_count_kv", conv.n_head))
    for info in g.tensors.values():
        if info.ggml_type not in FLOAT_TYPES:
            raise UserError(f"{path}: tensor {info.name} is {info.ggml_type.name}; a LoRA can only be merged into an F32/F16/BF16 model (import the unquantized model)")
        shape = tuple(reversed(info.shape))

        def load(info=info, shape=shape):
            return dequantize(info.data(), info.ggml_type, info.shape[0]).reshape(shape)

        conv.tensors.append(PlannedTensor(info.name, shape, info.ggml_type.name, load))
    return conv


def _check_gguf_source(path: Path, quant: str | None, lora) -> tuple[int, bool]:
    """Validate a GGUF source (architecture, types); returns (size, is_float)."""
    from llamachat.runtime.gguf.reader import GGUFFile

    with GGUFFile(path) as g:
        arch = g.get("general.architecture")
        if arch != "llama":
            raise ModelError(f"{path}: architecture {arch!r} is not supported (llama only)")
        quantized = sorted({t.ggml_type.name for t in g.tensors.values() if t.ggml_type not in FLOAT_TYPES})
        if quantized and quant:
            raise UserError(f"{path} is already quantized ({', '.join(quantized)}); importing it with --quant would quantize it twice: use `llamachat quantize --allow-requantize` if you mean it")
        return g.file_size, not quantized


def _space_error(folder: Path, what: str, need: int | None = None) -> UserError:
    if need is not None:
        return UserError(f"not enough space on the disk holding {folder} for {what} (about {need / 1e6:.1f} MB needed, "
                         f"{free_bytes(folder) / 1e6:.1f} MB free); nothing was imported")
    return UserError(f"no space left on the disk holding {folder} while {what}; nothing was imported")


class ImportCancelled(UserError):
    """The import was cancelled through its `cancel` event; nothing was imported."""


def run_import(source, name: str | None = None, quant: str | None = None, lora=None,
               progress: Progress | None = None, report: bool = False,
               cancel: threading.Event | None = None) -> ImportResult:
    """The whole import (see the module docstring); `progress(stage, done, total, what)`.
    Setting `cancel` stops it at the next tensor with ImportCancelled, leaving nothing."""
    source = Path(source).expanduser()
    if cancel is not None:
        progress = _cancellable(progress, cancel, source)
    kind = source_kind(source)
    quant = check_quant_type(quant)
    float_type = GGMLQuantizationType.F16
    if quant in ("F16", "BF16", "F32") and kind not in ("GGUF", "ggml"):
        float_type, quant = GGMLQuantizationType[quant], None  # written directly by the conversion
    name = check_name(name if name is not None else default_name(source, quant or (float_type.name if float_type != GGMLQuantizationType.F16 else None)))
    library = Library.load()
    if library.read_only:
        raise UserError(f"the library cannot be changed: {library.read_only_reason}")
    if name in library.models:
        raise UserError(f"a model named {name!r} is already in the library; choose another with --name")
    models_dir = paths.models_dir()
    dest = models_dir / f"{name}.gguf"
    if dest.exists():
        raise UserError(f"{dest} already exists; choose another name with --name (nothing was changed)")
    if report and not quant:
        raise UserError("--report compares a quantized result with its F16 source: give --quant with a quantized type (Q4_K_M, Q8_0, ...)")
    adapter = None
    if lora is not None:
        from .lora import load_adapter

        adapter = load_adapter(lora)

    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{models_dir}: cannot create the models folder ({err.strerror})") from None
    notes: list[str] = []
    conv = None
    old = None
    if kind == "ggml":  # checked whole now; converted to GGUF in the work folder below
        from .ggml_reader import read_ggml

        old = read_ggml(source)
        if quant and any(t.ggml_type not in FLOAT_TYPES for t in old.tensors):
            raise UserError(f"{source} is already quantized; importing it with --quant would quantize it twice: import it as it is, then use `llamachat quantize --allow-requantize` if you mean it")
        if adapter is not None:
            raise UserError(f"{source}: a LoRA is merged while converting float weights: import the {old.label} file first, then import the library's GGUF with --lora")
        source_size = old.file_size
        need = source_size if quant is None else source_size * 3 // 2
    elif kind == "GGUF":
        source_size, is_float = _check_gguf_source(source, quant, adapter)
        if adapter is not None:
            conv = plan_gguf(source, name)
    elif kind == "Hugging Face":
        from .import_hf import plan_hf

        conv = plan_hf(source, name)
    else:
        from .import_meta import plan_meta

        conv = plan_meta(source, name)
    if conv is not None:
        notes += conv.notes
        if adapter is not None:
            from .lora import apply_adapter

            n = apply_adapter(conv, adapter)
            notes.append(f"merged LoRA {adapter.folder.name} (r {adapter.r}, alpha {adapter.alpha:g}) into {n} tensors")
        for t in conv.tensors:
            t.float_type = float_type
        need = conv.out_nbytes + (conv.out_nbytes // 2 if quant else 0)
        source_size = None
    elif old is None:
        need = source_size if quant is None else source_size // 2
    if free_bytes(models_dir) < need + (16 << 20):
        raise _space_error(models_dir, name, need)

    try:
        work = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".import-{name}-"))
    except OSError as err:
        raise UserError(f"{models_dir}: cannot write there ({err.strerror}); nothing was imported") from None
    try:
        f16_size = None
        try:
            if conv is not None:
                f16 = write_float(conv, work / f"{float_type.name}.gguf", progress, float_type)
                _validate(f16)
                f16_size = f16.stat().st_size
                current = f16
            elif old is not None:
                from .ggml_reader import convert_ggml

                current, old_notes, _ = convert_ggml(source, work / "converted.gguf", name, progress)
                notes += old_notes
                _validate(current)
            else:
                current = _bring_gguf(source, work / "source.gguf", progress)
            result = current
            if quant:
                result = work / f"{quant}.gguf"
                _quantize(current, result, quant, progress)
                _validate(result)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _space_error(models_dir, f"writing {name}") from None
            raise UserError(f"{err.filename or models_dir}: {err.strerror or err}; nothing was imported") from None
        rep = None
        if report:
            rep = quality_report(current, result, progress)
        _place(result, dest)
        try:
            entry = Library.load().add(dest, name=name, description=f"imported from {source.name} ({kind}{', ' + quant if quant else ''})",
                                       quality=quality_entry(rep, _float_type_of(current)) if rep else None)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ImportResult(entry=entry, kind=kind, path=dest, size=dest.stat().st_size, f16_size=f16_size,
                        source_size=source_size, notes=notes, report=rep)


def _float_type_of(path: Path) -> str:
    """F16, BF16 or F32: the type of a float source's matrices, for the report."""
    from llamachat.runtime.gguf.reader import GGUFFile

    with GGUFFile(path) as g:
        types = {t.ggml_type.name for t in g.tensors.values() if len(t.shape) == 2}
    return "F32" if types == {"F32"} else "BF16" if "BF16" in types else "F16"


def _place(result: Path, dest: Path) -> None:
    """Move the finished file to `dest` without ever replacing a file that is there: a hard
    link where the file system has them, else an exclusively created placeholder replaced."""
    try:
        os.link(result, dest)
        return
    except FileExistsError:
        raise UserError(f"{dest} appeared while importing; nothing was changed (choose another --name)") from None
    except OSError:
        pass  # no hard links here (some network or FAT file systems)
    try:
        os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise UserError(f"{dest} appeared while importing; nothing was changed (choose another --name)") from None
    os.replace(result, dest)


def _quantize(src: Path, dst: Path, quant: str, progress: Progress | None):
    """runtime.gguf.quantize_model (llama-quantize's choices and bytes), its per-tensor callback
    turned into our progress lines."""
    from llamachat.runtime.gguf.quantize_model import quantize_model

    def on_tensor(i, n, plan, before, after):
        if progress:
            progress("quantize", i, n, f"{plan.name} {plan.src_type.name} -> {plan.dst_type.name} "
                                       f"{before / 1e6:.2f} MB -> {after / 1e6:.2f} MB")

    return quantize_model(src, dst, quant, allow_requantize=False, on_tensor=on_tensor)


def import_model(source, name: str | None = None, quant: str | None = None, lora=None,
                 progress: Progress | None = None, cancel: threading.Event | None = None) -> ModelEntry:
    """Import and register a model; returns its library entry. For the app's worker:
    `progress(stage, done, total, what)` is called from the calling thread; setting `cancel`
    (from any thread) ends the import at the next tensor with ImportCancelled."""
    return run_import(source, name=name, quant=quant, lora=lora, progress=progress, cancel=cancel).entry


def _cancellable(progress: Progress | None, cancel: threading.Event, source: Path) -> Progress:
    def checked(stage: str, done: int, total: int, what: str = "") -> None:
        if cancel.is_set():
            raise ImportCancelled(f"the import of {source} was cancelled; nothing was imported")
        if progress:
            progress(stage, done, total, what)

    return checked


def _validate(path: Path) -> None:
    from llamachat.runtime.gguf.reader import GGUFFile

    try:
        with GGUFFile(path):
            pass
    except GGUFError as err:  # our own output is broken: a bug, but say it plainly
        raise UserError(f"the converted file failed validation ({err.reason}); nothing was imported") from None


def _bring_gguf(source: Path, target: Path, progress: Progress | None) -> Path:
    """A GGUF source into the work folder: hard-linked when on the same disk (no copy, and
    the library's file survives the original's deletion), else copied."""
    try:
        os.link(source, target)
        return target
    except OSError:
        pass
    total = source.stat().st_size
    done = 0
    with open(source, "rb") as src, open(target, "wb") as out:
        while chunk := src.read(8 << 20):
            out.write(chunk)
            done += len(chunk)
            if progress:
                progress("copy", done, total, source.name)
        out.flush()
        os.fsync(out.fileno())
    _validate(target)
    return target


# --report -----------------------------------------------------------------------------

# Prose of several kinds (history, a recipe, a letter, questions and answers, a story with
# dialogue, advice, numbers), written for llamachat and shipped as package data: a few
# thousand tokens for any vocabulary, enough for a steady mean KL divergence, few enough
# that measuring a small model takes seconds.
REPORT_TEXT = resources.files("llamachat.model_store").joinpath("quality_text.txt").read_text(encoding="utf-8")
REPORT_MAX_CTX = 128
REPORT_MAX_CHUNKS = 24  # a small vocabulary makes many tokens of the text: at most this many chunks


def _report_tokens(g, text: str) -> tuple[list[int], int, int | None]:
    """(tokens of `text`, n_ctx, bos id or None) for the model in GGUFFile `g`: the largest
    even context up to REPORT_MAX_CTX (and the training context) that still gives the two
    chunks llama-perplexity's method needs."""
    from llamachat.runtime.tokenizer.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(g)
    tokens = tok.encode(text, add_special=True)
    n_ctx = min(REPORT_MAX_CTX, len(tokens) // 2, int(g.get("llama.context_length", REPORT_MAX_CTX))) // 2 * 2
    if n_ctx < 4:
        raise UserError(f"{g.path}: the built-in text is too short for this vocabulary to measure perplexity")
    return tokens, n_ctx, tok.bos_id if tok.add_bos else None


def quality_report(f16_path: Path, result_path: Path, progress: Progress | None = None, text: str = REPORT_TEXT) -> dict:
    """The result measured against its float source on `text`, as llama-perplexity
    --kl-divergence does: both perplexities, the mean KL divergence (nats per token, with its
    standard error) and how often the two models' top tokens agree, over the same scored
    tokens; with both sizes. `progress("report", chunk, chunks, what)` after each chunk."""
    from llamachat.runtime.gguf.reader import GGUFFile
    from llamachat.runtime.model.model import load_model
    from llamachat.runtime.generation.perplexity import kl_divergence, scored_log_probs

    with GGUFFile(f16_path) as g:
        tokens, n_ctx, bos = _report_tokens(g, text)
    n_chunks = min(len(tokens) // n_ctx, REPORT_MAX_CHUNKS)
    runs = []
    for step, path in enumerate((f16_path, result_path)):
        label = "the float source" if step == 0 else path.stem

        def on_chunk(i, n, step=step, label=label):
            if progress:
                progress("report", step * n_chunks + i, 2 * n_chunks, f"{label}: chunk {i}/{n}")

        if progress:
            progress("report", step * n_chunks, 2 * n_chunks, f"{label}: chunk 0/{n_chunks}")
        with GGUFFile(path) as g:
            model = load_model(g, n_ctx=n_ctx)
            try:
                runs.append(scored_log_probs(model, tokens, n_ctx, n_chunks=n_chunks, bos_id=bos, on_chunk=on_chunk))
            finally:
                model.close()
    kl = kl_divergence(*runs)
    return {"tokens": kl.count, "n_ctx": n_ctx, "f16": kl.base_ppl, "result": kl.ppl, "kl": kl.kl_mean,
            "kl_stderr": kl.kl_stderr, "top_agree": kl.top_agree,
            "f16_size": f16_path.stat().st_size, "result_size": result_path.stat().st_size}


def quality_entry(report: dict, source_type: str = "F16") -> dict:
    """What the library keeps of a report (models.toml `quality`, shown by `models list`)."""
    return {"ppl": round(report["result"], 4), "source_ppl": round(report["f16"], 4), "kl": round(report["kl"], 6),
            "top_agree": round(report["top_agree"], 4), "tokens": int(report["tokens"]), "source": source_type}
