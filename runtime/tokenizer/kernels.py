"""numba kernel for the tokenizer's long words: BPE and SentencePiece merging on symbol ids.

One algorithm serves both (llama.cpp's priority queue of adjacent pairs): the pair table maps
(left id * base + right id) to (priority << 32 | merged token id), where priority is the merge
rank for BPE and the dense rank of the merged token's score (highest first) for SentencePiece;
ties go to the leftmost pair. A queued pair is acted on only if, when it comes out, both of its
symbols are alive, still adjacent, and still concatenate to the same token: start and split
point fixed and the same token text mean the same two symbols, which is llama.cpp's staleness
test (BPE compares texts, SPM sizes). The queue is a binary heap in flat arrays.
Imported only when a word of hundreds of characters shows up, so ordinary text never loads numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.typed import Dict

_LOW32 = 0xFFFFFFFF


@njit(cache=True)
def build_pair_table(keys, vals):
    """(left id * base + right id) -> value; the first value of a repeated key wins."""
    d = Dict.empty(key_type=types.int64, value_type=types.int64)
    for i in range(keys.shape[0]):
        if keys[i] not in d:
            d[keys[i]] = vals[i]
    return d


@njit(cache=True, inline="always")
def _sift_down(hk, hr, ht, size, i):
    while True:
        c = 2 * i + 1
        if c >= size:
            return
        if c + 1 < size and hk[c + 1] < hk[c]:
            c += 1
        if hk[i] <= hk[c]:
            return
        hk[i], hk[c] = hk[c], hk[i]
        hr[i], hr[c] = hr[c], hr[i]
        ht[i], ht[c] = ht[c], ht[i]
        i = c


@njit(cache=True, inline="always")
def _push(hk, hr, ht, size, key, r, t):
    i = size
    hk[i] = key
    hr[i] = r
    ht[i] = t
    while i > 0:
        p = (i - 1) // 2
        if hk[p] <= hk[i]:
            break
        hk[i], hk[p] = hk[p], hk[i]
        hr[i], hr[p] = hr[p], hr[i]
        ht[i], ht[p] = ht[p], ht[i]
        i = p
    return size + 1


@njit(cache=True)
def merge_symbols(ids, table, base):
    """Merge a word given as symbol ids; returns (final ids, their start positions)."""
    m = ids.shape[0]
    sym = ids.astype(np.int64)
    nxt = np.arange(1, m + 1)
    nxt[m - 1] = -1
    prv = np.arange(-1, m - 1)
    cap = 3 * m + 1
    hk = np.empty(cap, np.int64)  # priority << 32 | left position
    hr = np.empty(cap, np.int64)  # right position
    ht = np.empty(cap, np.int64)  # merged token id
    size = 0
    for i in range(m - 1):
        key = sym[i] * base + sym[i + 1]
        if key in table:
            v = table[key]
            hk[size] = (v >> 32) << 32 | i
            hr[size] = i + 1
            ht[size] = v & _LOW32
            size += 1
    for i in range(size // 2 - 1, -1, -1):
        _sift_down(hk, hr, ht, size, i)
    while size > 0:
        key0, right, t = hk[0], hr[0], ht[0]
        size -= 1
        hk[0], hr[0], ht[0] = hk[size], hr[size], ht[size]
        _sift_down(hk, hr, ht, size, 0)
        left = key0 & _LOW32
        if sym[left] < 0 or sym[right] < 0 or nxt[left] != right:
            continue
        pair = sym[left] * base + sym[right]
        if pair not in table or (table[pair] & _LOW32) != t:
            continue
        sym[left] = t
        sym[right] = -1
        after = nxt[right]
        nxt[left] = after
        if after >= 0:
            prv[after] = left
        before = prv[left]
        if before >= 0:
            key = sym[before] * base + t
            if key in table:
                v = table[key]
                size = _push(hk, hr, ht, size, (v >> 32) << 32 | before, left, v & _LOW32)
        if after >= 0:
            key = t * base + sym[after]
            if key in table:
                v = table[key]
                size = _push(hk, hr, ht, size, (v >> 32) << 32 | left, after, v & _LOW32)
    count = 0
    i = 0
    while i != -1:
        count += 1
        i = nxt[i]
    out = np.empty(count, np.int64)
    pos = np.empty(count, np.int64)
    i = 0
    k = 0
    while i != -1:
        out[k] = sym[i]
        pos[k] = i
        k += 1
        i = nxt[i]
    return out, pos
