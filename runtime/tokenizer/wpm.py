"""WordPiece (`tokenizer.ggml.model = bert`), as llama.cpp's llm_tokenizer_wpm does it.

BERT-style vocabularies converted by llama.cpp mark word starts with '▁' (instead of marking
continuations with '##'). Text is split into words on whitespace and around punctuation,
ASCII symbols and CJK ideographs, after dropping control characters and, when the vocabulary
asks for it (the default), lowercasing and stripping accents (each character's first NFD code
point; combining marks dropped). Each word, with '▁' in front, is covered by the longest
vocabulary tokens from the left; a word that cannot be covered becomes the unknown token.
"""

from __future__ import annotations

import unicodedata

from .pretokenizer import WHITESPACE


def _is_chinese(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _simple_lower(ch: str) -> str:
    low = ch.lower()
    if len(low) == 1:
        return low
    return "i" if ch == "\u0130" else ch  # UnicodeData's simple mapping (İ -> i); others keep


class WPMEncoder:
    def __init__(self, token_to_id: dict[str, int], unk_id: int | None, lowercase: bool = True, strip_accents: bool = True):
        self.token_to_id = token_to_id
        self.unk_id = unk_id
        self.lowercase = lowercase
        self.strip_accents = strip_accents
        self.max_token_bytes = max((len(t.encode("utf-8", "surrogateescape")) for t in token_to_id), default=0)

    def words(self, text: str) -> list[str]:
        words = [""]
        for ch in text:
            if self.strip_accents:
                ch = unicodedata.normalize("NFD", ch)[0]
            cp = ord(ch)
            if cp in WHITESPACE:
                if words[-1]:
                    words.append("")
                continue
            cat = unicodedata.category(ch)
            if cp == 0 or cp == 0xFFFD or cat[0] == "C" and cat != "Cn":
                continue
            if self.strip_accents and cat[0] == "M":
                continue
            s = _simple_lower(ch) if self.lowercase else ch
            if cat[0] == "P" or (cp < 0x7F and cat[0] == "S") or _is_chinese(cp):
                if words[-1]:
                    words.append("")
                words[-1] = s
                words.append("")
            else:
                words[-1] += s
        if not words[-1]:
            words.pop()
        return words

    def encode(self, text: str, out: list[int]) -> None:
        vocab = self.token_to_id
        for word in self.words(text):
            if not word:
                continue
            w = "\u2581" + word
            n = len(w)
            start = len(out)
            i = 0
            while i < n:
                # longest token starting at i (a token is at most max_token_bytes long)
                j = n
                while j > i and len(w[i:j].encode("utf-8")) > self.max_token_bytes:
                    j -= 1
                while j > i:
                    tid = vocab.get(w[i:j])
                    if tid is not None:
                        out.append(tid)
                        break
                    j -= 1
                if j == i:  # nothing matches here: the whole word is unknown
                    del out[start:]
                    break
                i = j
            if len(out) == start and self.unk_id is not None:
                out.append(self.unk_id)
