"""The tokenizer: text <-> token ids from a GGUF file's vocabulary, matching llama.cpp token for token.

Owns reading and validating the `tokenizer.ggml.*` metadata (a vocab-only GGUF is enough),
the special-token bookkeeping llama.cpp does at load (BOS/EOS/EOT ids, the end-of-generation
set, control and user-defined tokens), splitting text around special tokens, and detokenizing
(whole, or streamed without ever emitting half a UTF-8 character). The merging itself lives in
spm.py (SentencePiece vocabularies, `llama`), bpe.py + pretokenizer.py (`gpt2`) and wpm.py
(WordPiece, `bert`).

Reference: llama.cpp src/llama-vocab.cpp (load, tokenizer_st_partition, tokenize, token_to_piece).
"""

from __future__ import annotations

import codecs
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .bpe import BPEMerger, byte_encode, UNICODE_TO_BYTE
from ..errors import ModelError, UserError, shown, stat_regular_file
from ..params import suggestion
from .pretokenizer import PRE_TOKENIZERS, PreTokenizer
from .spm import SPMMerger

# Warnings (e.g. an unknown pre-tokenizer) go to Tokenizer.warnings for the caller to show;
# the logger stays silent unless the application configures logging (stderr would garble the TUI).
log = logging.getLogger("llamachat.tokenizer")
log.addHandler(logging.NullHandler())

# GGUF token types (tokenizer.ggml.token_type) and llama.cpp's token attributes
TYPE_UNDEFINED, TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = range(7)
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8
_TYPE_TO_ATTR = {
    TYPE_UNKNOWN: ATTR_UNKNOWN,
    TYPE_UNUSED: ATTR_UNUSED,
    TYPE_NORMAL: ATTR_NORMAL,
    TYPE_CONTROL: ATTR_CONTROL,
    TYPE_USER_DEFINED: ATTR_USER_DEFINED,
    TYPE_BYTE: ATTR_BYTE,
}
_HIDDEN = ATTR_UNKNOWN | ATTR_CONTROL  # pieces shown only when special=True
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_C_ISSPACE = " \t\n\v\f\r"
ESCAPED_SPACE = "\u2581"

# token texts llama.cpp recognises at load (llama_vocab::impl::load), in its order
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PRE_TEXTS = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>", "<|prefix|>")
_FIM_SUF_TEXTS = ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>")
_FIM_MID_TEXTS = ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>", "<|middle|>")
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
# attribute name -> the texts that give it when the metadata did not
_SPECIAL_ID_TEXTS = (("eot_id", _EOT_TEXTS), ("eom_id", _EOM_TEXTS), ("fim_pre_id", _FIM_PRE_TEXTS),
                     ("fim_suf_id", _FIM_SUF_TEXTS), ("fim_mid_id", _FIM_MID_TEXTS), ("fim_pad_id", _FIM_PAD_TEXTS),
                     ("fim_rep_id", _FIM_REP_TEXTS), ("fim_sep_id", _FIM_SEP_TEXTS))
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
))

# metadata key -> attribute name; bos/eos out of range is an error, the others are ignored
_SPECIAL_ID_KEYS = (
    ("tokenizer.ggml.bos_token_id", "bos_id"),
    ("tokenizer.ggml.eos_token_id", "eos_id"),
    ("tokenizer.ggml.eot_token_id", "eot_id"),
    ("tokenizer.ggml.eom_token_id", "eom_id"),
    ("tokenizer.ggml.unknown_token_id", "unk_id"),
    ("tokenizer.ggml.seperator_token_id", "sep_id"),
    ("tokenizer.ggml.padding_token_id", "pad_id"),
    ("tokenizer.ggml.mask_token_id", "mask_id"),
    ("tokenizer.ggml.fim_pre_token_id", "fim_pre_id"),
    ("tokenizer.ggml.fim_suf_token_id", "fim_suf_id"),
    ("tokenizer.ggml.fim_mid_token_id", "fim_mid_id"),
    ("tokenizer.ggml.fim_pad_token_id", "fim_pad_id"),
    ("tokenizer.ggml.fim_rep_token_id", "fim_rep_id"),
    ("tokenizer.ggml.fim_sep_token_id", "fim_sep_id"),
    ("tokenizer.ggml.prefix_token_id", "fim_pre_id"),
    ("tokenizer.ggml.suffix_token_id", "fim_suf_id"),
    ("tokenizer.ggml.middle_token_id", "fim_mid_id"),
)


def _as_list(value: Any) -> list | None:
    if value is None:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else None


def _all_numbers(raw: Any, values: list, integers: bool) -> bool:
    """Whether a per-token array holds only numbers (integers when asked), none of them NaN.
    `raw` is the metadata value as read (a numpy array from a GGUF file), `values` its list."""
    if hasattr(raw, "dtype"):
        kind = raw.dtype.kind
        if integers:
            return kind in "iu"
        return kind in "iu" or (kind == "f" and not np.isnan(raw).any())
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integers and not isinstance(v, int)) or v != v:
            return False
    return True


def _sanitize(text: str | bytes) -> str:
    """Text as llama.cpp sees it: bytes that are not UTF-8 become U+FFFD."""
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", "replace")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")  # bytes smuggled in by surrogateescape
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "surrogatepass")  # lone surrogates: not UTF-8 either
        return raw.decode("utf-8", "replace")


def decode_utf8(data: bytes, what: str) -> str:
    """Prompt bytes as text, or a UserError naming the first bad byte's offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason})") from None


# How much text a file given with -f may hold. A prompt: four times the text of the largest
# context (2**20 tokens at about 4 bytes each). A text to measure or tokenize: what the pure
# Python tokenizer gets through in minutes, not hours.
MAX_PROMPT_BYTES = 16 << 20
MAX_TEXT_BYTES = 64 << 20


def read_text_input(path, what: str, max_bytes: int = MAX_TEXT_BYTES, stream=None) -> bytes:
    """The bytes of a text input, or one UserError, promptly: a directory, device (/dev/zero,
    /dev/urandom), FIFO or socket is refused without reading (reading one may never end), a
    file or `stream` longer than `max_bytes` is refused after reading at most one byte past
    the bound, and NUL bytes mean it is not text. The caller decodes (decode_utf8)."""

    if stream is not None:
        data = stream.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise UserError(f"{what} holds more than {max_bytes} bytes, more than llamachat reads as text")
        _refuse_nul(data, what)
        return data
    p = Path(path)
    st = stat_regular_file(p, what)
    if st.st_size > max_bytes:
        raise UserError(f"{p} is {st.st_size} bytes long, more than the {max_bytes} bytes llamachat reads as {what}")
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
    except OSError as e:
        raise UserError(f"{p}: cannot read {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise UserError(f"{p} is more than {max_bytes} bytes long, more than llamachat reads as {what}")
    _refuse_nul(data, str(p))
    return data


def _refuse_nul(data: bytes, what: str) -> None:
    at = data.find(b"\0")
    if at >= 0:
        raise UserError(f"{what} holds a NUL byte at offset {at}: it is not a text file")


class Tokenizer:
    """A GGUF vocabulary with llama.cpp's encode/decode. Build with `Tokenizer.from_gguf(path)`."""

    def __init__(self, metadata: dict[str, Any], source: str = "<metadata>"):
        self.source = source
        self.warnings: list[str] = []
        md = metadata
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise ModelError(f"{source}: the file has no tokenizer (tokenizer.ggml.model is missing)")
        if not isinstance(model, str):
            raise ModelError(f"{source}: tokenizer.ggml.model should be text, not {shown(model)}")
        if model not in ("llama", "gpt2", "bert"):
            raise ModelError(f"{source}: tokenizer type {shown(model)} is not supported (supported: 'llama' SentencePiece, 'gpt2' BPE and 'bert' WordPiece vocabularies)")
        self.model = model
        self.vocab_type = {"llama": "spm", "gpt2": "bpe", "bert": "wpm"}[model]

        tokens = _as_list(md.get("tokenizer.ggml.tokens"))
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise ModelError(f"{source}: tokenizer.ggml.tokens is missing or is not a list of strings")
        n = len(tokens)
        scores = _as_list(md.get("tokenizer.ggml.scores"))
        types = _as_list(md.get("tokenizer.ggml.token_type"))
        for key, arr in (("tokenizer.ggml.scores", scores), ("tokenizer.ggml.token_type", types)):
            if md.get(key) is not None and arr is None:
                raise ModelError(f"{source}: {key} is not an array")
            if arr is not None and len(arr) != n:
                raise ModelError(f"{source}: the vocabulary arrays disagree in length: tokenizer.ggml.tokens has {n} entries but {key} has {len(arr)}")
        if scores is not None and not _all_numbers(md.get("tokenizer.ggml.scores"), scores, integers=False):
            raise ModelError(f"{source}: tokenizer.ggml.scores holds values that are not numbers (or are NaN); it needs one number per token")
        if types is not None and not _all_numbers(md.get("tokenizer.ggml.token_type"), types, integers=True):
            raise ModelError(f"{source}: tokenizer.ggml.token_type holds values that are not integers")
        self.n_vocab = n

        texts: list[str] = []
        token_to_id: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if not t:
                t = f"[EMPTY_{i}]"  # llama.cpp's name for an empty token text
            prev = token_to_id.setdefault(t, i)
            if prev != i:
                raise ModelError(f"{source}: duplicate token in the vocabulary: {t!r} has ids {prev} and {i}")
            texts.append(t)
        self._texts = texts
        self._token_to_id = token_to_id
        self._scores = [float(s) for s in scores] if scores is not None else [0.0] * n
        if types is not None:
            try:
                self._attrs = [_TYPE_TO_ATTR.get(int(t), 0) for t in types]
            except (TypeError, ValueError):
                raise ModelError(f"{source}: tokenizer.ggml.token_type holds values that are not integers") from None
        else:
            self._attrs = [ATTR_NORMAL] * n
        for i, a in enumerate(self._attrs):
            if a & ATTR_BYTE and not _BYTE_TOKEN.fullmatch(texts[i]):
                raise ModelError(f"{source}: token {i} is marked as a byte token but its text {texts[i]!r} is not of the form <0xXX>")

        # ---- flags and pre-tokenizer (llama_vocab::impl::load) ----
        self.pre = md.get("tokenizer.ggml.pre")
        if self.pre is not None and not isinstance(self.pre, str):
            raise ModelError(f"{source}: tokenizer.ggml.pre should be the name of a pre-tokenizer (text), not {shown(self.pre)}")
        for key in ("tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                    "tokenizer.ggml.normalizer.lowercase", "tokenizer.ggml.normalizer.strip_accents"):
            if key in md and not isinstance(md[key], bool):
                raise ModelError(f"{source}: {key} should be true or false, not {shown(md[key])}")
        ignore_merges = False
        if self.vocab_type == "bpe":
            self.add_bos, self.add_eos, self.add_space_prefix, self.clean_spaces = False, False, False, True
            info = PRE_TOKENIZERS.get(self.pre) if isinstance(self.pre, str) else None
            if info is None:
                what = ("has no pre-tokenizer type (tokenizer.ggml.pre)" if not self.pre else
                        f"has pre-tokenizer type {shown(self.pre)}, which is not known{suggestion(self.pre, PRE_TOKENIZERS)}")
                self._warn(f"{source}: the vocabulary {what}; using llama.cpp's 'default' pre-tokenizer, so tokens may differ from what the model was trained with")
                info = PRE_TOKENIZERS["default"]
            ignore_merges = info.ignore_merges
            self.clean_spaces = info.clean_spaces
            if info.add_bos is not None:
                self.add_bos = info.add_bos
            self._pre_tokenizer = PreTokenizer(info.regex_set)
            self.bos_id, self.eos_id, self.unk_id = 11, 11, None
        elif self.vocab_type == "wpm":
            self.add_bos, self.add_eos, self.add_space_prefix, self.clean_spaces = True, False, False, True
            self._pre_tokenizer = None
            self.bos_id, self.eos_id, self.unk_id = 101, None, 100  # [CLS], -, [UNK]
        else:
            self.add_bos, self.add_eos, self.add_space_prefix, self.clean_spaces = True, False, True, False
            self._pre_tokenizer = None
            self.bos_id, self.eos_id, self.unk_id = 1, 2, 0
        v = md.get("tokenizer.ggml.add_space_prefix")
        if isinstance(v, bool):
            self.add_space_prefix = v

        # ---- special token ids ----
        self.eot_id = self.eom_id = self.sep_id = self.pad_id = self.mask_id = None
        self.fim_pre_id = self.fim_suf_id = self.fim_mid_id = self.fim_pad_id = self.fim_rep_id = self.fim_sep_id = None
        if self.vocab_type == "wpm":
            self.sep_id, self.pad_id, self.mask_id = 102, 0, 103  # [SEP], [PAD], [MASK]
        for attr in ("bos_id", "eos_id", "unk_id", "sep_id", "pad_id", "mask_id"):
            d = getattr(self, attr)
            if d is not None and d >= n:
                setattr(self, attr, None)  # llama.cpp disables a default id outside the vocabulary
        for key, attr in _SPECIAL_ID_KEYS:
            if key not in md:
                continue
            v = md[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= n:
                msg = f"{source}: {key} = {shown(v)} is not a token id of this vocabulary ({n} tokens, ids 0..{n - 1})"
                if attr in ("bos_id", "eos_id"):
                    raise ModelError(msg)
                self._warn(msg + "; ignored")
                continue
            setattr(self, attr, v)
        for key, attr in (("tokenizer.ggml.add_bos_token", "add_bos"), ("tokenizer.ggml.add_eos_token", "add_eos")):
            v = md.get(key)
            if isinstance(v, bool):
                setattr(self, attr, v)
        if self.add_bos and self.bos_id is None:
            raise ModelError(f"{source}: tokenizer.ggml.add_bos_token is true, but the vocabulary has no BOS token id")
        if self.add_eos and self.eos_id is None:
            raise ModelError(f"{source}: tokenizer.ggml.add_eos_token is true, but the vocabulary has no EOS token id")

        self._detect_special_tokens(md)

        # ---- mergers ----
        if self.vocab_type == "bpe":
            merges = _as_list(md.get("tokenizer.ggml.merges"))
            if merges is None or not all(isinstance(m, str) for m in merges):
                raise ModelError(f"{source}: a BPE (gpt2) vocabulary needs tokenizer.ggml.merges, a list of strings")
            self._bpe = BPEMerger(token_to_id, merges, ignore_merges)
            self._word_cache: dict[str, tuple[int, ...]] = {}
        elif self.vocab_type == "wpm":
            from .wpm import WPMEncoder

            lowercase = md.get("tokenizer.ggml.normalizer.lowercase", True)
            strip = md.get("tokenizer.ggml.normalizer.strip_accents", lowercase)
            self._wpm = WPMEncoder(token_to_id, self.unk_id, bool(lowercase), bool(strip))
        else:
            byte_ids: list[int | None] = []
            for b in range(256):
                tid = token_to_id.get(f"<0x{b:02X}>")
                if tid is None and b < 0x80:
                    tid = token_to_id.get(chr(b))
                byte_ids.append(tid)
            self._spm = SPMMerger(token_to_id, self._scores, byte_ids, self.unk_id)
        self._pieces: list[bytes | None] = [None] * n

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf(cls, source) -> "Tokenizer":
        """From a path, an open GGUFFile (a vocab-only GGUF is enough), a metadata dict, or a
        loaded model (anything with a `.gguf` GGUFFile or a `.metadata` dict)."""
        from ..gguf.reader import GGUFFile

        if isinstance(source, GGUFFile):
            return cls(source.metadata, str(source.path))
        if isinstance(source, (str, os.PathLike)):
            with GGUFFile(source) as g:
                return cls(g.metadata, str(Path(source)))
        if isinstance(source, dict):
            return cls(source)
        g = getattr(source, "gguf", None)
        if isinstance(g, GGUFFile):
            return cls(g.metadata, str(g.path))
        md = getattr(source, "metadata", None)
        if isinstance(md, dict):
            return cls(md, str(getattr(source, "path", getattr(source, "model_path", "<model>"))))
        raise TypeError(f"Tokenizer.from_gguf needs a path, a GGUFFile or a model, not {type(source).__name__}")

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], source: str = "<metadata>") -> "Tokenizer":
        return cls(metadata, source)

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
        log.warning(msg)

    def _detect_special_tokens(self, md: dict[str, Any]) -> None:
        """EOT/EOM/FIM ids by token text, the end-of-generation set, the special-token cache."""
        texts, attrs, t2i = self._texts, self._attrs, self._token_to_id

        def find(candidates):
            for c in candidates:
                tid = t2i.get(c)
                if tid is not None:
                    attrs[tid] |= ATTR_CONTROL  # llama.cpp forces control type on these
                    return tid
            return None

        for attr, candidates in _SPECIAL_ID_TEXTS:
            if getattr(self, attr) is None:
                setattr(self, attr, find(candidates))

        eog = {t for t in (self.fim_pad_id, self.fim_rep_id, self.fim_sep_id) if t is not None}
        for text in _EOG_TEXTS:
            tid = t2i.get(text)
            if tid is not None:
                eog.add(tid)
                attrs[tid] |= ATTR_CONTROL
        for t in (self.eos_id, self.eot_id, self.eom_id):
            if t is not None:
                eog.add(t)
        # o200k_harmony / solar-open: "<|end|>" ends a message, not the generation
        eog_texts = {texts[t] for t in eog}
        end_id = t2i.get("<|end|>")
        if end_id in eog and (("<|return|>" in eog_texts and "<|call|>" in eog_texts) or ("<|calls|>" in eog_texts and "<|flush|>" in eog_texts)):
            eog.discard(end_id)
            attrs[end_id] = ATTR_USER_DEFINED
        s_id = t2i.get("</s>")
        if s_id in eog and "<|tool_response>" in eog_texts:
            eog.discard(s_id)
            attrs[s_id] = ATTR_NORMAL
        for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            tid = t2i.get(text)
            if tid is not None:
                attrs[tid] = ATTR_USER_DEFINED  # llama.cpp's gpt-oss rule: always rendered
        self.eog_ids = frozenset(eog)

        special = [i for i, a in enumerate(attrs) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
        special.sort(key=lambda i: -len(texts[i].encode("utf-8", "surrogateescape")))
        self._special_cache = special

        name = md.get("general.name")
        if isinstance(name, str) and ("phi-3" in name.lower() or "phi3" in name.lower()):
            for i in special:
                attrs[i] |= ATTR_RSTRIP
            for text, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                tid = t2i.get(text)
                if tid is not None:
                    attrs[tid] = attrs[tid] | ATTR_RSTRIP if on else attrs[tid] & ~ATTR_RSTRIP

    # ------------------------------------------------------------------ queries
    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def token_text(self, token_id: int) -> str:
        """The vocabulary's text for a token (byte-level or '▁'-escaped, as stored)."""
        return self._texts[token_id]

    def token_id(self, text: str) -> int | None:
        """The id of the token whose vocabulary text is exactly `text`, or None."""
        return self._token_to_id.get(text)

    def token_score(self, token_id: int) -> float:
        return self._scores[token_id]

    def is_control(self, token_id: int) -> bool:
        return bool(self._attrs[token_id] & ATTR_CONTROL)

    def is_special(self, token_id: int) -> bool:
        """Control, user-defined or unknown: the tokens parse_special can produce from text."""
        return bool(self._attrs[token_id] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))

    def __len__(self) -> int:
        return self.n_vocab

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str | bytes, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, like llama_tokenize: BOS/EOS per the metadata when add_special;
        control tokens written in the text become tokens only when parse_special."""
        return self.encode_segments([(text, parse_special)], add_special=add_special)

    def encode_segments(self, segments: Iterable[tuple[str | bytes, bool]], add_special: bool = False) -> list[int]:
        """Tokenize the concatenation of `segments`, each (text, parse_special).

        Special tokens are looked for inside each segment only (per its flag), but ordinary
        text that runs across segment boundaries is tokenized as one piece, so the ids are
        those of the whole text, except that a segment with parse_special False never yields
        a control token. Chat templates use this to keep user text literal.
        """
        fragments: list[str | int] = []
        for text, parse_special in segments:
            text = _sanitize(text)
            if not text:
                continue
            for frag in self._partition(text, parse_special):
                if isinstance(frag, str) and fragments and isinstance(fragments[-1], str):
                    fragments[-1] = fragments[-1] + frag
                else:
                    fragments.append(frag)
        out: list[int] = []
        if self.vocab_type == "wpm":
            # llama.cpp: [CLS] text [SEP] whenever add_special, whatever add_bos says
            if add_special and self.bos_id is not None:
                out.append(self.bos_id)
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._wpm.encode(frag, out)
            if add_special and self.sep_id is not None:
                out.append(self.sep_id)
            return out
        if add_special and self.add_bos:
            out.append(self.bos_id)
        if self.vocab_type == "spm":
            prev_special = True  # llama.cpp: the first text fragment gets the space prefix
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                out.extend(self._spm.encode(frag.replace(" ", ESCAPED_SPACE)))
                prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._encode_bpe(frag, out)
        if add_special and self.add_eos:
            out.append(self.eos_id)
        return out

    def _encode_bpe(self, text: str, out: list[int]) -> None:
        cache = self._word_cache
        encode_word = self._bpe.encode_word
        for word in self._pre_tokenizer.split(text):
            ids = cache.get(word)
            if ids is None:
                ids = encode_word(byte_encode(word))
                if len(cache) >= 200_000:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """llama.cpp's tokenizer_st_partition: cut out special tokens, longest text first.

        User-defined tokens are always cut out; control and unknown ones only when parse_special.
        """
        frags: list[str | int] = [text]
        texts, attrs = self._texts, self._attrs
        for tid in self._special_cache:
            attr = attrs[tid]
            if not parse_special and attr & (ATTR_CONTROL | ATTR_UNKNOWN):
                continue
            tt = texts[tid]
            if not any(isinstance(f, str) and tt in f for f in frags):
                continue
            new: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tt not in f:
                    new.append(f)
                    continue
                start, end = 0, len(f)
                while True:
                    m = f.find(tt, start, end)
                    if m < 0:
                        if start < end:
                            new.append(f[start:end])
                        break
                    left_end = m
                    if attr & ATTR_LSTRIP:
                        while left_end > start and f[left_end - 1] in _C_ISSPACE:
                            left_end -= 1
                    if left_end > start:
                        new.append(f[start:left_end])
                    new.append(tid)
                    start = m + len(tt)
                    if attr & ATTR_RSTRIP:
                        while start < end and f[start] in _C_ISSPACE:
                            start += 1
                    if start >= end:
                        break
            frags = new
        return frags

    # ------------------------------------------------------------------ decoding
    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes a token stands for (llama_token_to_piece). Control and unknown tokens give
        their text only when `special`; a byte token gives its single byte."""
        if not 0 <= token_id < self.n_vocab:
            raise UserError(f"token id {token_id} is out of range for this vocabulary ({self.n_vocab} tokens)")
        if not special and self._attrs[token_id] & _HIDDEN:
            return b""
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._make_piece(token_id)
        return piece

    def _make_piece(self, tid: int) -> bytes:
        attr, text = self._attrs[tid], self._texts[tid]
        if attr & (_HIDDEN | ATTR_USER_DEFINED):
            return text.encode("utf-8", "surrogateescape")
        if attr & ATTR_NORMAL:
            if self.vocab_type != "bpe":
                return text.replace(ESCAPED_SPACE, " ").encode("utf-8", "surrogateescape")
            out = bytearray()
            for ch in text:
                b = UNICODE_TO_BYTE.get(ch)
                if b is not None:
                    out.append(b)
                else:  # llama_decode_text's marker for a character outside the byte alphabet
                    enc = ch.encode("utf-8", "surrogateescape")
                    out += b"[UNK_BYTE_0x" + enc.hex().encode() + text.encode("utf-8", "surrogateescape") + b"]"
            return bytes(out)
        if attr & ATTR_BYTE:
            return bytes([int(text[3:5], 16)])
        return b""

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        return b"".join(self.token_to_piece(int(i), special) for i in ids)

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """The text of `ids`: the pieces joined (what streaming them prints), invalid UTF-8 as U+FFFD.
        Control tokens (BOS, <|im_end|>, ...) show only with special=True."""
        return self.decode_bytes(ids, special).decode("utf-8", "replace")

    def stream_decoder(self, special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, special)


class StreamDecoder:
    """Turns streamed token ids into text, holding back bytes of a character not yet complete."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self._tok = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        """The text that became complete with this token ('' while a character is partial)."""
        return self._utf8.decode(self._tok.token_to_piece(int(token_id), self._special))

    def flush(self) -> str:
        """Whatever is held back, with an incomplete character as U+FFFD; then start afresh."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out

    @property
    def pending(self) -> bool:
        return bool(self._utf8.getstate()[0])
