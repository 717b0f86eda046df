"""Byte-level BPE merging (GPT-2 style vocabularies, `tokenizer.ggml.model = gpt2`), as llama.cpp does it.

A pre-tokenized word is first byte-encoded: its UTF-8 bytes become the printable stand-ins of
GPT-2's byte-to-unicode table ('Ġ' for a space, ...), the alphabet the vocabulary and the merges
are written in. Then adjacent symbols are merged, lowest merge rank first (ties: leftmost),
by `merge_loop` (the loop SentencePiece and the numba kernel share): a heap of candidate pairs over a linked list
of symbols, so a word of n characters costs O(n log n); a candidate whose two symbols changed
since it was queued is skipped, as in llama.cpp (llm_tokenizer_bpe_session). A final symbol that is not a token falls back to its
single-character tokens, where they exist. Words repeat a lot in real text: results are cached.
A very long word (a run of 10 MB without a space, say) is merged by a numba kernel on token ids
instead, same algorithm and same order, so even pathological input takes seconds, not minutes.
"""

from __future__ import annotations

import heapq


def _bytes_to_unicode() -> list[str]:
    """GPT-2's table: printable bytes map to themselves, the rest to U+0100 and up, in order."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = [""] * 256
    for b in keep:
        table[b] = chr(b)
    n = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE: list[str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {ch: b for b, ch in enumerate(BYTE_TO_UNICODE)}


class _ByteEncodeTable(dict):
    """str.translate table: a code point -> the stand-ins of its UTF-8 bytes."""

    def __missing__(self, cp: int) -> str:
        enc = "".join(BYTE_TO_UNICODE[b] for b in chr(cp).encode("utf-8", "surrogatepass"))
        self[cp] = enc
        return enc


_BYTE_ENCODE = _ByteEncodeTable()


def byte_encode(word: str) -> str:
    return word.translate(_BYTE_ENCODE)


def byte_decode(text: str) -> bytes | None:
    """A byte-level token text back to its bytes; None if a character is not a byte stand-in."""
    try:
        return bytes(UNICODE_TO_BYTE[ch] for ch in text)
    except KeyError:
        return None


_CACHE_LIMIT = 200_000
_CACHEABLE = 1_000  # longer words are not worth keeping
LONG_WORD = 256  # from this length on, merge with the numba kernel (when the vocabulary allows)


class BPEMerger:
    """Merges byte-encoded words into token ids with a vocabulary and its ranked merges."""

    def __init__(self, token_to_id: dict[str, int], merges: list[str], ignore_merges: bool = False):
        self.token_to_id = token_to_id
        # llama.cpp keys ranks by the pair split at the first space after position 0; a pair
        # of space-free symbols joined with one space is exactly that string, so the merge
        # line itself is the key. The first occurrence of a duplicate line wins (emplace).
        n = len(merges)
        self.ranks: dict[str, int] = dict(zip(reversed(merges), range(n - 1, -1, -1)))
        self.ignore_merges = ignore_merges
        self._cache: dict[str, tuple[int, ...]] = {}
        self._fast = None  # (alphabet -> id, pair table, key base), False if unusable; built on first need

    def encode_word(self, word: str) -> tuple[int, ...]:
        """Token ids of one byte-encoded word."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ids = self._merge_long(word) if len(word) >= LONG_WORD else None
        if ids is None:
            ids = self._merge(word)
        if len(word) <= _CACHEABLE:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[word] = ids
        return ids

    def _merge_long(self, word: str) -> tuple[int, ...] | None:
        """The numba path; None when the vocabulary or the word does not allow it."""
        if self.ignore_merges and word in self.token_to_id:
            return (self.token_to_id[word],)
        if self._fast is None:
            self._fast = self._build_fast_tables()
        if not self._fast:
            return None
        import numpy as np

        alphabet, table, base, n_vocab = self._fast
        cps = np.frombuffer(word.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if int(cps.max()) >= len(alphabet):
            return None
        ids = alphabet[cps]
        if (ids < 0).any():
            return None
        out, _ = _merge_kernel(ids, table, base)
        return tuple(t for t in out.tolist() if t < n_vocab)

    def _build_fast_tables(self):
        """Merges as integers: (left id * base + right id) -> (rank << 32 | merged id). Byte
        stand-ins that are no token get ids from n_vocab on (the text path drops them at the
        end, and so do we). Usable only when every applicable merge yields a token, so that
        every other symbol is a token and merging on ids is merging on texts."""
        import numpy as np

        vocab = self.token_to_id
        n = max(vocab.values()) + 1
        alphabet = np.full(max(ord(c) for c in BYTE_TO_UNICODE) + 1, -1, dtype=np.int64)
        pseudo: dict[str, int] = {}
        for ch in BYTE_TO_UNICODE:
            tid = vocab.get(ch)
            if tid is None:
                tid = pseudo[ch] = n + len(pseudo)
            alphabet[ord(ch)] = tid
        keys, vals = [], []
        for line, rank in self.ranks.items():
            pos = line.find(" ", 1)
            if pos < 0:
                continue
            a, b = line[:pos], line[pos + 1 :]
            ia = vocab.get(a, pseudo.get(a))
            ib = vocab.get(b, pseudo.get(b))
            if ia is None or ib is None:
                continue  # never applies: every symbol is a token or a byte stand-in
            ic = vocab.get(a + b)
            if ic is None:
                return False
            keys.append(ia * (n + 256) + ib)
            vals.append((rank << 32) | ic)
        table = _build_pair_table(np.array(keys, dtype=np.int64), np.array(vals, dtype=np.int64))
        return alphabet, table, n + 256, n

    def _merge(self, word: str) -> tuple[int, ...]:
        vocab = self.token_to_id
        if self.ignore_merges or len(word) == 1:
            tid = vocab.get(word)
            if tid is not None:
                return (tid,)
        syms = list(word)
        out: list[int] = []
        for s in (syms[p] for p in merge_loop(syms, self.ranks, _ranked_pair, "")):
            tid = vocab.get(s)
            if tid is not None:
                out.append(tid)
            else:
                # llama.cpp looks up each UTF-8 byte of the symbol as a one-byte token text;
                # only ASCII stand-ins can be such a text
                for ch in s:
                    if ch < "\x80":
                        t = vocab.get(ch)
                        if t is not None:
                            out.append(t)
        return tuple(out)


def merge_loop(syms, table, pair, dead):
    """The merge loop of llama.cpp's BPE and SentencePiece tokenizers: keep joining the adjacent
    pair of symbols of lowest priority (ties: the leftmost pair), using a heap of candidates
    over a linked list of symbols. pair(table, a, b) -> (priority, joined symbol), the symbol
    `dead` if a and b do not join. A
    candidate is joined only if, when it comes out, its two places still hold the symbols it
    was queued with (else one side was joined since: stale; a place's symbol only grows or
    dies, so this is llama.cpp's test of the joined text or size). syms (a list or an array, n > 0)
    is used up: a joined pair's symbol goes to its left place, `dead` to its right one. Returns
    the places of the final symbols, in order.

    Written once for both kinds of symbol: texts (bpe/spm `_merge`, in Python) and token ids
    (runtime.tokenizer.kernels compiles this with numba for long words)."""
    n = len(syms)
    nxt = list(range(1, n + 1))
    nxt[n - 1] = -1
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        r, joined = pair(table, syms[i], syms[i + 1])
        if joined != dead:
            heap.append((r, i, i + 1, joined, syms[i], syms[i + 1]))
    heapq.heapify(heap)
    while len(heap) > 0:
        _, left, right, joined, ls, rs = heapq.heappop(heap)
        if syms[left] != ls or syms[right] != rs:
            continue  # stale
        syms[left] = joined
        syms[right] = dead
        after = nxt[right]
        nxt[left] = after
        if after >= 0:
            prv[after] = left
        before = prv[left]
        if before >= 0:
            r, j = pair(table, syms[before], joined)
            if j != dead:
                heapq.heappush(heap, (r, before, left, j, syms[before], joined))
        if after >= 0:
            r, j = pair(table, joined, syms[after])
            if j != dead:
                heapq.heappush(heap, (r, left, after, j, joined, syms[after]))
    places = []
    i = 0
    while i != -1:
        places.append(i)
        i = nxt[i]
    return places


def _ranked_pair(ranks, a, b):
    """merge_loop's pair for BPE on texts: the merge's rank (None: no merge)."""
    r = ranks.get(a + " " + b)
    return (0, "") if r is None else (r, a + b)


def _merge_kernel(ids, table, base):
    from .kernels import merge_symbols  # numba is imported only when a long word needs it

    return merge_symbols(ids, table, base)


def _build_pair_table(keys, vals):
    from .kernels import build_pair_table

    return build_pair_table(keys, vals)
