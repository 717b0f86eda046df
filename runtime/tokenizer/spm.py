"""SentencePiece-style merging (`tokenizer.ggml.model = llama`), as llama.cpp's llm_tokenizer_spm does it.

The text arrives with spaces already escaped to '▁'. Start from single characters and keep
merging the adjacent pair whose concatenation is the vocabulary token with the highest score
(ties: leftmost): bpe.merge_loop, the loop both tokenizers share. A final symbol that is not a token is emitted
byte by byte as `<0xXX>` byte tokens (byte fallback).

Speed without changing the result: when no token contains '▁' right after another character,
no merge can ever join the text before a word-initial '▁' run with what follows, so each run
"▁*[^▁]*" is merged on its own and cached (words repeat). Vocabularies where that does not hold
are merged whole, exactly as llama.cpp does. A very long segment (no spaces for megabytes) is
merged by a numba kernel on symbol ids (kernels.merge_symbols), same order, same result.
"""

from __future__ import annotations

import re

from .bpe import merge_loop

_SEGMENT = re.compile("\u2581+[^\u2581]*|[^\u2581]+")
_CACHE_LIMIT = 200_000
_CACHEABLE = 1_000
LONG_SEGMENT = 256


def _scored_pair(vocab_scores, a, b):
    """merge_loop's pair for SentencePiece on texts: the joined token's score, highest first."""
    vocab, scores = vocab_scores
    joined = a + b
    tid = vocab.get(joined)
    return (0.0, "") if tid is None else (-scores[tid], joined)


class SPMMerger:
    def __init__(self, token_to_id: dict[str, int], scores: list[float], byte_ids: list[int | None], unk_id: int | None):
        self.token_to_id = token_to_id
        self.scores = scores
        self.byte_ids = byte_ids  # byte value -> token id (<0xXX>, else the one-byte text), or None
        self.unk_id = unk_id
        self.can_split = not any(
            "\u2581" in t[1:] and any(t[i] == "\u2581" and t[i - 1] != "\u2581" for i in range(1, len(t)))
            for t in token_to_id
        )
        self._cache: dict[str, tuple[int, ...]] = {}
        self._fast = None  # (char -> symbol id, pair table, scores, base), built on first need

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        if not self.can_split:
            return list(self._merge_any(text))
        out: list[int] = []
        cache = self._cache
        for seg in _SEGMENT.findall(text):
            ids = cache.get(seg)
            if ids is None:
                ids = self._merge_any(seg)
                if len(seg) <= _CACHEABLE:
                    if len(cache) >= _CACHE_LIMIT:
                        cache.clear()
                    cache[seg] = ids
            out.extend(ids)
        return out

    def _merge_any(self, text: str) -> tuple[int, ...]:
        if len(text) >= LONG_SEGMENT:
            ids = self._merge_long(text)
            if ids is not None:
                return ids
        return self._merge(text)

    def _merge_long(self, text: str) -> tuple[int, ...] | None:
        import numpy as np

        from .kernels import merge_symbols

        if self._fast is None:
            self._fast = self._build_fast_tables()
        char_ids, table, base = self._fast
        try:
            cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError:
            return None
        uniq, inverse = np.unique(cps, return_inverse=True)
        never = base - 1  # a character that is no token and no part of one: never pairs
        mapped = np.array([char_ids.get(chr(c), never) for c in uniq.tolist()], dtype=np.int64)
        ids, positions = merge_symbols(mapped[inverse], table, base)
        n = len(self.scores)
        out: list[int] = []
        for v, p in zip(ids.tolist(), positions.tolist()):
            if v < n:
                out.append(v)
            else:  # a character that is no token (never merged): its bytes
                out.extend(self._byte_fallback(text[p]))
        return tuple(out)

    def _build_fast_tables(self):
        """Every way to cut a token in two whose halves can be symbols (tokens, or single
        characters that are not tokens, which get ids from n_vocab on):
        (left * base + right) -> (score rank << 32 | token)."""
        import numpy as np

        from .kernels import build_pair_table

        vocab = self.token_to_id
        n = len(self.scores)
        char_ids: dict[str, int] = {t: i for t, i in vocab.items() if len(t) == 1}
        triples = []
        for t, tid in vocab.items():
            for k in range(1, len(t)):
                a, b = t[:k], t[k:]
                ia, ib = vocab.get(a), vocab.get(b)
                if ia is None:
                    if len(a) != 1:
                        continue
                    ia = char_ids.setdefault(a, n + len(char_ids))
                if ib is None:
                    if len(b) != 1:
                        continue
                    ib = char_ids.setdefault(b, n + len(char_ids))
                triples.append((ia, ib, tid))
        base = n + len(char_ids) + 1
        # priority: dense rank of the merged token's score, highest score first
        distinct = sorted(set(self.scores), reverse=True)
        score_rank = {s: r for r, s in enumerate(distinct)}
        keys = np.array([a * base + b for a, b, _ in triples], dtype=np.int64)
        vals = np.array([(score_rank[self.scores[t]] << 32) | t for _, _, t in triples], dtype=np.int64)
        return char_ids, build_pair_table(keys, vals), base

    def _byte_fallback(self, s: str) -> list[int]:
        out = []
        for b in s.encode("utf-8", "surrogateescape"):
            bid = self.byte_ids[b]
            if bid is None:
                bid = self.unk_id
            if bid is not None:
                out.append(bid)
        return out

    def _merge(self, text: str) -> tuple[int, ...]:
        vocab = self.token_to_id
        syms = list(text)
        out: list[int] = []
        for s in (syms[p] for p in merge_loop(syms, (vocab, self.scores), _scored_pair, "")):
            tid = vocab.get(s)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._byte_fallback(s))
        return tuple(out)
