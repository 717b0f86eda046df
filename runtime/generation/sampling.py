"""llama.cpp's samplers (src/llama-sampler.cpp) and its `common_sampler` chain.

Owns: the candidate list a sampler works on, each sampler llama.cpp's `llama-cli` uses (logit
bias, repetition/frequency/presence penalties, top-k, typical, top-p, min-p, temperature,
the seeded draw, mirostat 1 and 2), the random number generator, and `Sampler`, the chain
built from `runtime.params.SamplingParams` in llama.cpp's order:

    logit bias (+ -inf on end-of-generation tokens with ignore_eos)
    -> penalties -> top-k -> typical -> top-p -> min-p -> temperature -> dist(seed)

or, with mirostat 1/2, `logit bias -> temperature -> mirostat` (llama.cpp drops the rest of
the chain then, penalties included).

Everything a draw depends on is done as llama.cpp (commit 0c1e570) built with GCC does it, so a
seed picks the tokens llama.cpp picks from the same logits:
- the arithmetic: float32 logits and probabilities summed left to right, the draw's running
  sum in double, and expf/logf/log2f/powf from the C library (numba's math calls are libm's;
  numpy's float32 exp and log differ from them in the last bits for a third of all inputs);
- the order of equal logits: llama.cpp sorts with libstdc++'s std::partial_sort (a heap) and
  std::sort (introsort), inside its own 128-bucket partial sort; neither is stable, and where two
  kept tokens have the same logit (about one step in a hundred on SmolLM2) their order decides
  which one a draw lands on. Those algorithms are replayed here step for step (numba kernels);
- the random stream: std::mt19937 seeded with the seed, read as libstdc++'s
  `generate_canonical<double, 53>` (two 32-bit words per number); the dist sampler draws a
  number for every token, even when one candidate is left.
"""

from __future__ import annotations

import math
import os
from collections import Counter, deque
from typing import Iterable, Sequence

import numpy as np
from numba import njit

from ..params import SamplingParams

F32 = np.float32
LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's "pick a random seed"

# numba kernels; error_model="numpy": a float division by zero gives inf or NaN, as in C (numba's
# default raises ZeroDivisionError, as Python does)
_kernel = njit(cache=True, error_model="numpy")


# --- the candidate list ------------------------------------------------------------------


class Candidates:
    """llama.cpp's `llama_token_data_array`: parallel arrays of token ids, logits and
    probabilities, and whether they are sorted by descending logit.

    `identity` means the arrays still hold the whole vocabulary in id order (position == id),
    which lets the samplers at the head of the chain index by token id directly."""

    __slots__ = ("ids", "logits", "p", "sorted", "identity")

    def __init__(self, ids: np.ndarray, logits: np.ndarray, p: np.ndarray | None = None,
                 sorted: bool = False, identity: bool = False):
        self.ids = ids
        self.logits = logits
        self.p = np.zeros(len(ids), F32) if p is None else p  # set by softmax / dist
        self.sorted = sorted
        self.identity = identity

    @classmethod
    def from_logits(cls, logits: np.ndarray, buffer: np.ndarray | None = None) -> "Candidates":
        """A working copy of `logits` (into `buffer` if given: a fresh 200 kB array per token
        costs more in page faults than the whole default chain)."""
        logits = np.asarray(logits, dtype=F32).ravel()
        if buffer is not None and buffer.shape == logits.shape:
            np.copyto(buffer, logits)
            logits = buffer
        else:
            logits = logits.copy()
        return cls(_arange(len(logits)), logits, _EMPTY_P, identity=True)

    @classmethod
    def from_probs(cls, probs: Sequence[float]) -> "Candidates":
        """As llama.cpp's tests build them: logit = logf(p), p kept."""
        p = np.asarray(probs, dtype=F32)
        with np.errstate(divide="ignore"):
            logits = np.log(p).astype(F32)
        return cls(np.arange(len(p), dtype=np.int32), logits, p.copy(), identity=True)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, order: np.ndarray, sorted: bool) -> None:
        """Keep the candidates at positions `order`, in that order."""
        self.ids = self.ids[order]
        self.logits = self.logits[order]
        self.p = self.p[order] if len(self.p) else self.p
        self.sorted = sorted
        self.identity = False

    def truncate(self, n: int) -> None:
        if n < len(self.ids):
            self.ids = self.ids[:n]
            self.logits = self.logits[:n]
            self.p = self.p[:n] if len(self.p) else self.p
            self.identity = False


_ARANGES: dict[int, np.ndarray] = {}
_EMPTY_P = np.zeros(0, F32)


def _arange(n: int) -> np.ndarray:
    """0..n-1 as int32, shared (read-only): the ids of a fresh full-vocabulary list."""
    ids = _ARANGES.get(n)
    if ids is None:
        ids = _ARANGES[n] = np.arange(n, dtype=np.int32)
        ids.flags.writeable = False
    return ids


# --- libstdc++'s sorting, replayed (bits/stl_heap.h, bits/stl_algo.h) ----------------------------
#
# Each kernel sorts parallel arrays (key, val) in place by descending key, the comparator
# llama.cpp passes (a.logit > b.logit); `val` carries the positions along. Index arithmetic
# follows the C++ (whose (hole - 1) / 2 is never evaluated at hole 0 where it would differ).


@_kernel
def _adjust_heap(key, val, first, hole, length, vkey, vval):
    top = hole
    second = hole
    while second < (length - 1) // 2:
        second = 2 * (second + 1)
        if key[first + second] > key[first + second - 1]:
            second -= 1
        key[first + hole] = key[first + second]
        val[first + hole] = val[first + second]
        hole = second
    if (length & 1) == 0 and second == (length - 2) // 2:
        second = 2 * (second + 1)
        key[first + hole] = key[first + second - 1]
        val[first + hole] = val[first + second - 1]
        hole = second - 1
    parent = (hole - 1) // 2
    while hole > top and key[first + parent] > vkey:  # __push_heap
        key[first + hole] = key[first + parent]
        val[first + hole] = val[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    key[first + hole] = vkey
    val[first + hole] = vval


@_kernel
def _pop_heap(key, val, first, last, result):
    vkey, vval = key[result], val[result]
    key[result] = key[first]
    val[result] = val[first]
    _adjust_heap(key, val, first, np.int64(0), last - first, vkey, vval)


@_kernel
def _partial_sort(key, val, first, middle, last):
    """std::partial_sort: __heap_select (make_heap, then sift in every smaller element), __sort_heap."""
    length = middle - first
    if length >= 2:
        parent = (length - 2) // 2
        while True:
            _adjust_heap(key, val, first, parent, length, key[first + parent], val[first + parent])
            if parent == 0:
                break
            parent -= 1
    for i in range(middle, last):
        if key[i] > key[first]:
            _pop_heap(key, val, first, middle, i)
    while middle - first > 1:
        middle -= 1
        _pop_heap(key, val, first, middle, middle)


@_kernel
def _swap(key, val, a, b):
    key[a], key[b] = key[b], key[a]
    val[a], val[b] = val[b], val[a]


@_kernel
def _linear_insert(key, val, last):
    vkey, vval = key[last], val[last]
    nxt = last - 1
    while vkey > key[nxt]:
        key[last] = key[nxt]
        val[last] = val[nxt]
        last = nxt
        nxt -= 1
    key[last] = vkey
    val[last] = vval


@_kernel
def _insertion_sort(key, val, first, last):
    if first == last:
        return
    for i in range(first + 1, last):
        if key[i] > key[first]:
            vkey, vval = key[i], val[i]
            for j in range(i, first, -1):
                key[j] = key[j - 1]
                val[j] = val[j - 1]
            key[first] = vkey
            val[first] = vval
        else:
            _linear_insert(key, val, i)


@_kernel
def _std_sort(key, val, first, last):
    """std::sort: introsort (median-of-three pivot, heapsort past 2*log2(n) levels) down to runs of
    16, then one insertion sort. Ranges left for later sit on a stack instead of the C++ recursion:
    they are disjoint, so the order they are sorted in changes nothing."""
    n = last - first
    if n <= 0:
        return
    lg = 0
    while (n >> (lg + 1)) > 0:
        lg += 1
    stack = [(first, last, 2 * lg)]
    while len(stack):
        f, l, depth = stack.pop()
        while l - f > 16:
            if depth == 0:
                _partial_sort(key, val, f, l, l)
                break
            depth -= 1
            a, b, c = f + 1, f + (l - f) // 2, l - 1  # __move_median_to_first
            if key[a] > key[b]:
                if key[b] > key[c]:
                    _swap(key, val, f, b)
                elif key[a] > key[c]:
                    _swap(key, val, f, c)
                else:
                    _swap(key, val, f, a)
            elif key[a] > key[c]:
                _swap(key, val, f, a)
            elif key[b] > key[c]:
                _swap(key, val, f, c)
            else:
                _swap(key, val, f, b)
            lo, hi = f + 1, l  # __unguarded_partition around the pivot at f
            while True:
                while key[lo] > key[f]:
                    lo += 1
                hi -= 1
                while key[f] > key[hi]:
                    hi -= 1
                if not lo < hi:
                    break
                _swap(key, val, lo, hi)
                lo += 1
            stack.append((lo, l, depth))
            l = lo
    if n > 16:  # __final_insertion_sort
        _insertion_sort(key, val, first, first + 16)
        for i in range(first + 16, last):
            _linear_insert(key, val, i)
    else:
        _insertion_sort(key, val, first, last)


@_kernel
def _bucket_sort(logits, npartial):
    """llama_token_data_array_partial_sort: the positions of the npartial largest logits, in the
    order it leaves them: 128 buckets over [-10, 10) (float arithmetic, C's truncating int
    conversion, whose out-of-range result INT_MIN clamps to bucket 0), filled in input order from
    the top; every full bucket std::sort-ed, the last one std::partial_sort-ed."""
    n = len(logits)
    scale = np.float32(128) / np.float32(20.0)
    inter = np.float32(10.0) * scale
    bucket = np.empty(n, np.int32)
    histo = np.zeros(128, np.int64)
    for i in range(n):
        x = scale * logits[i] + inter
        b = int(x) if -2147483648.0 < x < 2147483648.0 else 0
        b = max(0, min(127, b))
        bucket[i] = b
        histo[b] += 1
    nhave = 0
    ib = 127
    while ib >= 0:
        nhave += histo[ib]
        if nhave >= npartial:
            break
        ib -= 1
    start = np.zeros(128, np.int64)
    at = np.int64(0)
    for j in range(127, ib - 1, -1):
        start[j] = at
        at += histo[j]
    key = np.empty(nhave, np.float32)
    val = np.empty(nhave, np.int32)
    for i in range(n):
        j = bucket[i]
        if j >= ib:
            key[start[j]] = logits[i]
            val[start[j]] = i
            start[j] += 1
    at = np.int64(0)  # (a literal 0 would compile the sort kernels a second time for it)
    for j in range(127, ib, -1):
        _std_sort(key, val, at, at + histo[j])
        at += histo[j]
    _partial_sort(key, val, at, npartial, at + histo[ib])
    return val[:npartial].copy()


def _sorted_head(logits, npartial):
    """llama_token_data_array_partial_sort_inplace: the positions of the npartial largest logits
    in llama.cpp's order (std::partial_sort over the whole list up to 128, the buckets above).
    Chosen in Python: in a kernel numba would compile both sorts (2-3 s) on a first run, where
    the default chain (top-k 40) needs only the heap."""
    if npartial > 128:
        return _bucket_sort(logits, npartial)
    return _heap_partial_sort(logits, npartial)


@_kernel
def _heap_partial_sort(logits, npartial):
    """std::partial_sort(first, first + npartial, last) without copying the list: __heap_select
    pops the heap's top into position i, which the loop never reads again, so only the heap
    itself needs to be a copy."""
    key = logits[:npartial].copy()
    val = np.arange(npartial).astype(np.int32)
    length = npartial
    if length >= 2:
        parent = (length - 2) // 2
        while True:
            _adjust_heap(key, val, np.int64(0), parent, length, key[parent], val[parent])
            if parent == 0:
                break
            parent -= 1
    for i in range(npartial, len(logits)):
        if logits[i] > key[0]:
            _adjust_heap(key, val, np.int64(0), np.int64(0), length, logits[i], np.int32(i))
    while length > 1:
        length -= 1
        _pop_heap(key, val, np.int64(0), length, length)
    return val


@_kernel
def _ascending_order(x):
    """The positions of x in std::sort's order for the comparator x[a] < x[b] (typical's)."""
    key = -x  # a < b exactly when -a > -b, NaN included (every comparison with it is false)
    val = np.arange(len(x)).astype(np.int32)
    _std_sort(key, val, np.int64(0), len(x))
    return val


def _sort(cur: Candidates, npartial: int | None = None) -> None:
    """Sort cur (keeping npartial candidates; default all) as llama.cpp's in-place partial sort does."""
    n = len(cur) if npartial is None else npartial
    cur.take(_sorted_head(cur.logits, n), sorted=True)


# --- the C library's float functions and llama.cpp's float loops -------------------------------


@_kernel
def _logf(x):
    return math.log(x)


@_kernel
def _log2f(x):
    return math.log2(x)


@_kernel
def _softmax_p(logits, max_l):
    """llama_sampler_softmax_impl's arithmetic: p = expf(logit - max), a float running sum, p /= sum."""
    n = len(logits)
    p = np.empty(n, np.float32)
    total = np.float32(0.0)
    for i in range(n):
        e = math.exp(logits[i] - max_l)
        p[i] = e
        total += e
    for i in range(n):
        p[i] /= total
    return p


@_kernel
def _dist_draw(logits, max_l, rnd):
    """llama_sampler_dist_apply's arithmetic: expf in float, sums in double, the first position
    whose running sum reaches sum * rnd (the last one if none does), p normalised in double."""
    n = len(logits)
    p = np.empty(n, np.float32)
    sum_cum = 0.0
    for i in range(n):
        e = math.exp(logits[i] - max_l)
        p[i] = e
        sum_cum += e
    target = sum_cum * rnd
    run = 0.0
    selected = n - 1
    found = False
    for i in range(n):
        if not found:
            run += p[i]
            if run >= target:
                selected = i
                found = True
        p[i] = p[i] / sum_cum
    return selected, p


@_kernel
def _typical_keep(p, typ_p, min_keep):
    """llama_sampler_typical_apply: entropy (a float sum of -p*logf(p), NaN if some p is 0, as
    there), |-logf(p) - entropy| std::sort-ed ascending, the shortest prefix whose p sum exceeds
    typ_p: the positions kept, in that order."""
    n = len(p)
    logp = np.empty(n, np.float32)
    entropy = np.float32(0.0)
    for i in range(n):
        logp[i] = math.log(p[i])
        entropy += -p[i] * logp[i]
    shifted = np.empty(n, np.float32)
    for i in range(n):
        shifted[i] = abs(-logp[i] - entropy)
    order = _ascending_order(shifted)
    cum = np.float32(0.0)
    last = n
    for i in range(n):
        cum += p[order[i]]
        if cum > typ_p and (min_keep == 0 or i >= min_keep - 1):
            last = i + 1
            break
    return order[:last].copy()


@_kernel
def _mirostat_k(p, m, n_vocab, mu):
    """llama_sampler_mirostat_apply's k: s_hat from the top m probabilities, then the k that
    makes the expected surprise mu (all in float, libm's logf and powf)."""
    sum_ti_bi = np.float32(0.0)
    sum_ti_sq = np.float32(0.0)
    i = 0
    while i < m - 1 and i < len(p) - 1:
        t_i = math.log(np.float32(i + 2) / np.float32(i + 1))
        b_i = math.log(p[i] / p[i + 1])
        sum_ti_bi += t_i * b_i
        sum_ti_sq += t_i * t_i
        i += 1
    s_hat = sum_ti_bi / sum_ti_sq
    eps = s_hat - np.float32(1.0)
    num = eps * math.pow(np.float32(2.0), mu)
    den = np.float32(1.0) - math.pow(np.float32(n_vocab), -eps)
    return math.pow(num / den, np.float32(1.0) / s_hat)


def _max_logit(cur: Candidates) -> F32:
    return cur.logits[0] if cur.sorted else cur.logits.max()


# --- the samplers (llama.cpp names and semantics) ---------------------------------------------


def softmax(cur: Candidates, sort: bool) -> None:
    """llama_sampler_softmax_impl: p = exp(logit - max) / sum, optionally sorting first."""
    if sort and not cur.sorted:
        _sort(cur)
    cur.p = _softmax_p(cur.logits, F32(_max_logit(cur)))


def logit_bias(cur: Candidates, biases: Sequence[tuple[int, float]]) -> None:
    """Add each bias to its token's logit (-inf bans the token)."""
    if not biases:
        return
    tokens = np.fromiter((t for t, _ in biases), dtype=np.int64, count=len(biases))
    values = np.fromiter((b for _, b in biases), dtype=F32, count=len(biases))
    if cur.identity:
        ok = (tokens >= 0) & (tokens < len(cur))
        np.add.at(cur.logits, tokens[ok], values[ok])
        return
    for token, bias in zip(tokens, values):
        hits = np.flatnonzero(cur.ids == token)
        if len(hits):
            cur.logits[hits[0]] += bias


def top_k(cur: Candidates, k: int) -> None:
    """Keep the k most likely tokens (k <= 0: all), leaving them sorted."""
    if k <= 0:
        return
    k = min(k, len(cur))
    if not cur.sorted:
        _sort(cur, k)
    cur.truncate(k)


def _first_reaching(cum: np.ndarray, p32: F32, min_i: int) -> int:
    """The first i >= min_i with cum[i] >= p32 (cum never falls), or -1."""
    i = max(int(np.searchsorted(cum, p32, side="left")), min_i)
    return i if i < len(cum) else -1


def top_p(cur: Candidates, p: float, min_keep: int = 0) -> None:
    """Nucleus: the smallest most-likely prefix whose probability reaches p (float running sum)."""
    if p >= 1.0:
        return
    softmax(cur, sort=False)
    p32 = F32(p)
    n = len(cur)
    min_i = max(min_keep - 1, 0)
    if cur.sorted or n <= 1024:
        if not cur.sorted:
            _sort(cur)
        i = _first_reaching(np.cumsum(cur.p, dtype=F32), p32, min_i)
        cur.truncate(i + 1 if i >= 0 else n)
        return
    # llama.cpp's adaptive partial sort: the top 256 first; past them, the whole list sorted,
    # the running sum carrying on from the 256 already added
    head = _bucket_sort(cur.logits, 256)
    cum = np.cumsum(cur.p[head], dtype=F32)
    i = _first_reaching(cum, p32, min_i)
    if i >= 0:
        cur.take(head[:i + 1], sorted=True)
        return
    order = _bucket_sort(cur.logits, n)
    rest = np.cumsum(np.concatenate(([cum[-1]], cur.p[order[256:]])), dtype=F32)[1:]
    i = _first_reaching(rest, p32, min_i - 256)
    cur.take(order[:256 + i + 1] if i >= 0 else order, sorted=True)


def min_p(cur: Candidates, p: float, min_keep: int = 0) -> None:
    """Drop tokens whose probability is below p times the top token's."""
    if p <= 0.0 or len(cur) == 0:
        return
    log_p = _logf(F32(p))
    if not cur.sorted:
        keep = np.flatnonzero(cur.logits >= cur.logits.max() + log_p)  # in list order, as there
        if len(keep) and len(keep) >= min_keep:
            cur.take(keep, sorted=False)
            return
        _sort(cur)
    # sorted: the tokens at or above min_logit are a prefix; the first token always stays
    first_below = int(np.count_nonzero(cur.logits >= cur.logits[0] + log_p))
    cur.truncate(min(max(first_below, 1, min_keep), len(cur)))


def typical(cur: Candidates, p: float, min_keep: int = 0) -> None:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy."""
    if p >= 1.0:
        return
    softmax(cur, sort=True)
    cur.take(_typical_keep(cur.p, F32(p), int(min_keep)), sorted=False)


def temperature(cur: Candidates, temp: float) -> None:
    """Divide the logits by temp; temp <= 0 keeps only the (first) largest logit."""
    if temp <= 0.0:
        best = int(np.argmax(cur.logits))
        logits = np.full(len(cur), -np.inf, dtype=F32)
        logits[best] = cur.logits[best]
        cur.logits = logits
        return
    cur.logits = (cur.logits / F32(temp)).astype(F32, copy=False)


class Penalties:
    """Repetition, frequency and presence penalties over the last `last_n` accepted tokens."""

    def __init__(self, last_n: int, repeat: float, freq: float, present: float):
        self.last_n = max(int(last_n), 0)
        self.repeat = F32(repeat)
        self.freq = F32(freq)
        self.present = F32(present)
        self.window: deque[int] = deque(maxlen=self.last_n or 1)
        self.counts: Counter[int] = Counter()

    @property
    def active(self) -> bool:
        return self.last_n > 0 and not (self.repeat == 1.0 and self.freq == 0.0 and self.present == 0.0)

    def accept(self, token: int) -> None:
        if self.last_n == 0:
            return
        if len(self.window) == self.last_n:
            old = self.window[0]
            self.counts[old] -= 1
            if self.counts[old] == 0:
                del self.counts[old]
        self.window.append(token)
        self.counts[token] += 1

    def reset(self) -> None:
        self.window.clear()
        self.counts.clear()

    def apply(self, cur: Candidates) -> None:
        if not self.active or not self.counts:
            return
        tokens = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
        counts = np.fromiter(self.counts.values(), dtype=np.int64, count=len(self.counts))
        if cur.identity:
            ok = (tokens >= 0) & (tokens < len(cur))
            pos, counts = tokens[ok], counts[ok]
        else:
            order = np.argsort(tokens)
            tokens, counts = tokens[order], counts[order]
            at = np.searchsorted(tokens, cur.ids)
            at_ok = at < len(tokens)
            match = np.zeros(len(cur), bool)
            match[at_ok] = tokens[at[at_ok]] == cur.ids[at_ok]
            pos = np.flatnonzero(match)
            counts = counts[at[pos]]
        logits = cur.logits[pos]
        # dividing a negative logit would make the token *more* likely: multiply those instead
        logits = np.where(logits <= 0, logits * self.repeat, logits / self.repeat).astype(F32)
        c = counts.astype(F32)
        logits -= c * self.freq + (c > 0).astype(F32) * self.present
        cur.logits[pos] = logits
        cur.sorted = False


# --- randomness ---------------------------------------------------------------------------------


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


class Rng:
    """std::mt19937 (numpy's MT19937 with the same init_genrand seeding) read the way
    libstdc++ reads it for a double in [0, 1): two 32-bit words, (lo + hi * 2^32) / 2^64."""

    def __init__(self, seed: int):
        self.seed = seed & 0xFFFFFFFF
        self._bits = np.random.MT19937()
        self._bits._legacy_seeding(self.seed)

    def canonical(self) -> float:
        lo, hi = (float(v) for v in self._bits.random_raw(2))
        value = (lo + hi * 4294967296.0) / 18446744073709551616.0
        return value if value < 1.0 else math.nextafter(1.0, 0.0)


def dist(cur: Candidates, rng: Rng) -> int:
    """llama_sampler_dist: softmax, then draw a position in proportion to p."""
    n = len(cur)
    if n == 0:
        raise ValueError("no candidate tokens left to sample from")
    rnd = rng.canonical()  # drawn even for one candidate, as llama.cpp does (see the module doc)
    if n == 1:
        cur.p = np.ones(1, F32)
        return 0
    index, cur.p = _dist_draw(cur.logits, F32(_max_logit(cur)), rnd)
    return int(index)


def discrete(p: np.ndarray, rng: Rng) -> int:
    """std::discrete_distribution<int> over weights p, as libstdc++ draws from it."""
    if len(p) < 2:  # libstdc++ keeps no table for < 2 weights and answers 0 without drawing
        return 0
    w = p.astype(np.float64)
    cp = np.cumsum(w / np.cumsum(w)[-1])  # std::accumulate adds left to right (np.sum is pairwise)
    cp[-1] = 1.0
    return int(np.searchsorted(cp, rng.canonical(), side="left"))


def _int_of_float(x: float) -> int:
    """C's (int)x on x86: NaN and out-of-range values become INT_MIN."""
    if not math.isfinite(x) or not -2147483648.0 <= x < 2147483648.0:
        return -2147483648
    return int(x)


@_kernel
def _n_unsurprising(p, mu):
    """How many leading candidates have -log2f(p) <= mu (mirostat 2's std::find_if)."""
    for i in range(len(p)):
        if -math.log2(p[i]) > mu:
            return i
    return len(p)


class Mirostat:
    """Mirostat 1.0: estimate the Zipf exponent from the top m tokens, pick k to hit the
    target surprise tau, sample from the top k, and adjust mu by eta."""

    def __init__(self, n_vocab: int, rng: Rng, tau: float, eta: float, m: int = 100):
        self.n_vocab, self.rng, self.m = n_vocab, rng, m
        self.tau, self.eta = F32(tau), F32(eta)
        self.mu = F32(2.0) * self.tau

    def reset(self) -> None:
        self.mu = F32(2.0) * self.tau

    def apply(self, cur: Candidates) -> int:
        softmax(cur, sort=True)  # the whole list: the softmax's float sum runs in sorted order
        k = _mirostat_k(cur.p, self.m, self.n_vocab, self.mu)
        top_k(cur, max(_int_of_float(k), 1))
        softmax(cur, sort=True)
        index = discrete(cur.p, self.rng)
        self._update(cur.p[index])
        return index

    def _update(self, p: F32) -> None:
        surprise = F32(-_log2f(F32(p)))
        self.mu = F32(self.mu - self.eta * (surprise - self.tau))


class MirostatV2(Mirostat):
    """Mirostat 2.0: drop the tokens whose surprise exceeds mu, sample, adjust mu."""

    def __init__(self, rng: Rng, tau: float, eta: float):
        super().__init__(0, rng, tau, eta)

    def apply(self, cur: Candidates) -> int:
        softmax(cur, sort=True)
        cur.truncate(max(_n_unsurprising(cur.p, self.mu), 1))
        softmax(cur, sort=True)
        index = discrete(cur.p, self.rng)
        self._update(cur.p[index])
        return index


# --- the chain ------------------------------------------------------------------------------------


class Sampler:
    """llama.cpp's `common_sampler` for one conversation: call `sample(logits)` for the next
    token and `accept(token)` for every token that enters the context (prompt tokens too, so
    the penalties see them, as llama-cli does)."""

    def __init__(self, params: SamplingParams, n_vocab: int, eog_ids: Iterable[int] = (), n_ctx: int | None = None,
                 rng: "Rng | None" = None):
        """`rng`: a random stream to continue (llama.cpp seeds once per session, so a fixed seed
        gives each reply of a chat the next part of one stream, not the same draws again)."""
        self.params = params
        self.n_vocab = n_vocab
        biases = [(int(t), float(b)) for t, b in params.logit_bias]
        if params.ignore_eos:
            biases += [(int(t), -math.inf) for t in sorted(eog_ids)]
        self.biases = biases
        last_n = params.repeat_last_n
        if last_n == -1:  # -1 = the whole context
            last_n = n_ctx if n_ctx else n_vocab
        self.penalties = Penalties(last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty)
        fixed = params.seed not in (-1, LLAMA_DEFAULT_SEED)
        if fixed and rng is not None and rng.seed == params.seed & 0xFFFFFFFF:
            self.seed, self.rng = rng.seed, rng
        else:
            self.seed = params.seed if fixed else random_seed()
            self.rng = Rng(self.seed)
        if params.mirostat == 1:
            self.mirostat: Mirostat | None = Mirostat(n_vocab, self.rng, params.mirostat_tau, params.mirostat_eta, 100)
        elif params.mirostat == 2:
            self.mirostat = MirostatV2(self.rng, params.mirostat_tau, params.mirostat_eta)
        else:
            self.mirostat = None
        self._buffer: np.ndarray | None = None

    def accept(self, token: int) -> None:
        self.penalties.accept(token)

    def accept_many(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            self.penalties.accept(t)

    def reset(self) -> None:
        """Forget the accepted tokens and restart the random stream from the seed."""
        self.penalties.reset()
        self.rng = Rng(self.seed)
        if self.mirostat is not None:
            self.mirostat.rng = self.rng
            self.mirostat.reset()

    def sample(self, logits: np.ndarray) -> int:
        """The next token id for these logits (llama_sampler_sample over the chain)."""
        if self.biases or self.penalties.active:  # these change logits in place: work on a copy
            if self._buffer is None or self._buffer.shape != np.shape(logits):
                self._buffer = np.empty(np.shape(logits), F32)
            cur = Candidates.from_logits(logits, self._buffer)
        else:  # every later step makes new arrays: the caller's logits are only read
            flat = np.asarray(logits, dtype=F32).ravel()
            cur = Candidates(_arange(len(flat)), flat, _EMPTY_P, identity=True)
        index = self.apply(cur)  # replaces cur.ids: read them only afterwards
        return int(cur.ids[index])

    def apply(self, cur: Candidates) -> int:
        """Run the chain on `cur`; the position of the chosen candidate."""
        sp = self.params
        logit_bias(cur, self.biases)
        if self.mirostat is not None:
            temperature(cur, sp.temp)
            return self.mirostat.apply(cur)
        self.penalties.apply(cur)
        top_k(cur, sp.top_k)
        typical(cur, sp.typical_p)
        top_p(cur, sp.top_p)
        min_p(cur, sp.min_p)
        temperature(cur, sp.temp)
        return dist(cur, self.rng)
