"""numba kernel for the tokenizer's long words: BPE and SentencePiece merging on symbol ids.

The loop is bpe.merge_loop (llama.cpp's priority queue of adjacent pairs), compiled on ids: the
pair table maps (left id * base + right id) to (priority << 32 | merged token id), where
priority is the merge rank for BPE and the dense rank of the merged token's score (highest
first) for SentencePiece; ties go to the leftmost pair. A queued pair is acted on only if, when
it comes out, both of its symbols are alive and still join to the same token: start and split
point fixed and the same token mean the same two symbols, which is llama.cpp's staleness test
(BPE compares texts, SPM sizes).
Imported only when a word of hundreds of characters shows up, so ordinary text never loads numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.typed import Dict

from .bpe import merge_loop

_LOW32 = 0xFFFFFFFF


@njit(cache=True)
def build_pair_table(keys, vals):
    """(left id * base + right id) -> value; the first value of a repeated key wins."""
    d = Dict.empty(key_type=types.int64, value_type=types.int64)
    for i in range(keys.shape[0]):
        if keys[i] not in d:
            d[keys[i]] = vals[i]
    return d


_merge_loop = njit(inline="always")(merge_loop)


@njit(inline="always")
def _table_pair(table_base, a, b):
    """merge_loop's pair on ids: (left id * base + right id) in the table."""
    table, base = table_base
    v = table.get(a * base + b, -1)
    return (v >> 32, v & _LOW32) if v >= 0 else (0, -1)


@njit(cache=True)
def merge_symbols(ids, table, base):
    """Merge a word given as symbol ids (bpe.merge_loop); returns (final ids, their start
    positions)."""
    sym = ids.astype(np.int64)
    places = _merge_loop(sym, (table, base), _table_pair, -1)
    out = np.empty(len(places), np.int64)
    pos = np.empty(len(places), np.int64)
    for k in range(len(places)):
        pos[k] = places[k]
        out[k] = sym[places[k]]
    return out, pos
