"""Vocabulary metadata for converted models, written the way llama.cpp's converters write it.

Owns the `tokenizer.*` keys of an imported GGUF:
- SentencePiece (`tokenizer.model`, Llama 1/2, Mistral, Meta checkpoints): model "llama",
  pre "default", pieces with their scores and types (normal, unknown, control, unused,
  byte), `added_tokens.json` and tokenizer_config.json's `added_tokens_decoder` applied,
  padded with `[PADi]` to the model's vocabulary size (convert_hf_to_gguf.py's
  `_create_vocab_sentencepiece`).
- Byte-level BPE (`tokenizer.json`): model "gpt2", the vocabulary with added tokens as
  control (special) or user-defined tokens, holes filled with `[PADi]` (unused), the merges,
  and a pre-tokenizer name. convert_hf_to_gguf.py names the pre-tokenizer by hashing what
  the Hugging Face tokenizer makes of a test string; without `tokenizers` installed we
  recognise the pre-tokenizer from its definition in tokenizer.json instead (Llama 3's split
  regex -> "llama-bpe", digits split one by one + byte level -> "smollm", plain byte level ->
  "gpt-2") and refuse others, as the converter does for an unknown hash.
- Special token ids, add_bos/add_eos and the chat template from tokenizer_config.json /
  tokenizer.json through gguf-py's own `SpecialVocab` (the converters' code for this).
"""

from __future__ import annotations

import json
from pathlib import Path

from gguf.constants import TokenType
from gguf.vocab import SpecialVocab

from llamachat.runtime.errors import UserError

# Llama 3's pre-tokenizer split pattern (tokenizer.json), which llama.cpp calls "llama-bpe"
LLAMA3_PATTERN = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
KNOWN_PRE_TOKENIZERS = ("llama-bpe (Llama 3)", "smollm", "gpt-2")


def read_json(path: Path) -> dict:
    from .conversion import read_json_file

    data = read_json_file(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object")
    return data


def _does_token_look_special(text: str) -> bool:
    # convert_hf_to_gguf.py's does_token_look_special: added tokens some models forget to mark
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _add_special_vocab(gw, folder: Path, n_vocab: int, load_merges: bool) -> SpecialVocab:
    """bos/eos/unk/sep/pad ids, add_bos/add_eos, merges and chat template, as gguf-py's
    SpecialVocab reads them and adds them (the converters call the same class)."""
    try:
        sv = SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
    except ValueError as err:
        raise UserError(f"{folder}: tokenizer files cannot be used: {err}") from None
    sv.add_to_gguf(gw, quiet=True)
    return sv


def sentencepiece_size(model_file: Path) -> int:
    return _load_spm(model_file).vocab_size()


def _load_spm(model_file: Path):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(model_file))
    except (OSError, RuntimeError) as err:
        raise UserError(
            f"{model_file}: not a SentencePiece model ({str(err).splitlines()[0] if str(err) else 'unreadable'}); "
            "Llama 3's tiktoken tokenizer.model cannot be read: import the Hugging Face version of the model instead"
        ) from None
    return sp


def add_sentencepiece_vocab(gw, folder: Path, vocab_size: int | None, model_file: Path | None = None) -> int:
    """Add the tokenizer.* keys for a SentencePiece tokenizer.model to `gw` (a gguf-py
    GGUFWriter used as a recorder); returns the vocabulary size: `vocab_size` when given
    (padded with [PADi]), else the tokenizer's own."""
    model_file = model_file or folder / "tokenizer.model"
    sp = _load_spm(model_file)
    n_sp = sp.vocab_size()
    added_file = folder / "added_tokens.json"
    added = read_json(added_file) if added_file.is_file() else {}
    if vocab_size is None:
        vocab_size = max([n_sp] + [int(i) + 1 for i in added.values()])
    if vocab_size < n_sp:
        raise UserError(f"{folder}: the model's vocabulary ({vocab_size}) is smaller than tokenizer.model's ({n_sp})")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i in range(n_sp):
        tokens[i] = sp.IdToPiece(i)
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = TokenType.UNKNOWN
        elif sp.IsControl(i):
            types[i] = TokenType.CONTROL
        elif sp.IsUnused(i):
            types[i] = TokenType.UNUSED
        elif sp.IsByte(i):
            types[i] = TokenType.BYTE
        else:
            types[i] = TokenType.NORMAL
    for text, tid in added.items():
        tid = int(tid)
        if 0 <= tid < vocab_size:
            tokens[tid], scores[tid], types[tid] = text, -1000.0, TokenType.USER_DEFINED
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        for tid, data in (read_json(config_file).get("added_tokens_decoder") or {}).items():
            tid, text = int(tid), data["content"]
            if not 0 <= tid < vocab_size:
                continue
            if data.get("special") or _does_token_look_special(text):
                types[tid] = TokenType.CONTROL
            else:
                text = text.replace("\u2581", " ")  # user-defined spaces pre-normalized, as convert does
                types[tid] = TokenType.USER_DEFINED
            tokens[tid], scores[tid] = text, -1000.0
    gw.add_tokenizer_model("llama")
    gw.add_tokenizer_pre("default")
    gw.add_token_list(tokens)
    gw.add_token_scores(scores)
    gw.add_token_types([int(t) for t in types])
    sv = _add_special_vocab(gw, folder, vocab_size, load_merges=False)
    if not sv.special_token_ids:
        # no tokenizer_config.json (a Meta checkpoint): state the ids llama.cpp would assume
        for add, tid in ((gw.add_bos_token_id, sp.bos_id()), (gw.add_eos_token_id, sp.eos_id()), (gw.add_unk_token_id, sp.unk_id())):
            if 0 <= tid < vocab_size:
                add(int(tid))
    return vocab_size


def bpe_pre_tokenizer(tokenizer_json: dict, path: Path) -> str:
    """llama.cpp's name for the pre-tokenizer tokenizer.json defines (see module docstring)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern == LLAMA3_PATTERN:
            return "llama-bpe"
    raise UserError(
        f"{path}: the BPE pre-tokenizer it defines ({json.dumps(pre)[:120]}) is not one llamachat knows "
        f"(known: {', '.join(KNOWN_PRE_TOKENIZERS)}); it cannot be converted"
    )


def add_bpe_vocab(gw, folder: Path, vocab_size: int | None) -> int:
    """Add the tokenizer.* keys for a byte-level BPE tokenizer.json to `gw`, as
    convert_hf_to_gguf.py's `_set_vocab_gpt2` writes them; returns the vocabulary size."""
    path = folder / "tokenizer.json"
    tj = read_json(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{path}: only byte-level BPE tokenizers (or a tokenizer.model) can be converted, this one is {model.get('type')!r}")
    if model.get("byte_fallback"):
        raise UserError(f"{path}: a SentencePiece-style BPE tokenizer; put its tokenizer.model beside it to convert it")
    tokpre = bpe_pre_tokenizer(tj, path)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens") or []}
    for text, t in added.items():
        vocab[text] = int(t["id"])
    if vocab_size is None:
        vocab_size = max(vocab.values()) + 1
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"{path}: token id {max(vocab.values())} does not fit the model's vocabulary of {vocab_size}")
    reverse = {tid: text for text, tid in vocab.items()}
    tokens: list[str] = []
    types = [0] * vocab_size
    for i in range(vocab_size):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types[i] = TokenType.UNUSED
            continue
        if text in added:
            if added[text].get("special") or _does_token_look_special(text):
                types[i] = TokenType.CONTROL
            else:
                text = text.replace("\u2581", " ")
                types[i] = TokenType.USER_DEFINED
        else:
            types[i] = TokenType.NORMAL
        tokens.append(text)
    gw.add_tokenizer_model("gpt2")
    gw.add_tokenizer_pre(tokpre)
    gw.add_token_list(tokens)
    gw.add_token_types([int(t) for t in types])
    sv = _add_special_vocab(gw, folder, vocab_size, load_merges=True)
    if not sv.merges:
        raise UserError(f"{path}: has no merges; a BPE vocabulary cannot work without them")
    return vocab_size
