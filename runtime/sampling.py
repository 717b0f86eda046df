"""llama.cpp's samplers (src/llama-sampling.cpp) and its `common_sampler` chain, in numpy.

Owns: the candidate list a sampler works on, each sampler llama.cpp's `llama-cli` uses (logit
bias, repetition/frequency/presence penalties, top-k, typical, top-p, min-p, temperature,
the seeded draw, mirostat 1 and 2), the random number generator, and `Sampler`, the chain
built from `runtime.params.SamplingParams` in llama.cpp's order:

    logit bias (+ -inf on end-of-generation tokens with ignore_eos)
    -> penalties -> top-k -> typical -> top-p -> min-p -> temperature -> dist(seed)

or, with mirostat 1/2, `logit bias -> temperature -> mirostat` (llama.cpp drops the rest of
the chain then, penalties included).

The arithmetic follows llama.cpp's: float32 logits and probabilities, the draw's running sum in
double, and the same random stream: std::mt19937 seeded with the seed, and libstdc++'s
`generate_canonical<double, 53>` (two 32-bit draws per number). With equal logits, a seed
therefore picks the same tokens llama.cpp would pick; with ours, a seed always gives the same
text. Everything on the full vocabulary is one vectorised numpy pass; the sort is partial
(`argpartition`), so the default chain costs a fraction of a millisecond per token.
"""

from __future__ import annotations

import math
import os
from collections import Counter, deque
from typing import Iterable, Sequence

import numpy as np

from .params import SamplingParams

F32 = np.float32
LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's "pick a random seed"


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


def _descending(logits: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """Positions sorted by descending logit; equal logits keep ascending position, so the
    order is deterministic (llama.cpp's std::sort leaves ties in no particular order)."""
    if positions is None:
        return np.argsort(-logits, kind="stable")
    positions = np.sort(positions)
    return positions[np.argsort(-logits[positions], kind="stable")]


def _top_positions(logits: np.ndarray, k: int) -> np.ndarray:
    """The positions of the k largest logits, sorted by descending logit (a partial sort)."""
    n = len(logits)
    if k >= n:
        return _descending(logits)
    if n >= 4096 and k <= n // 64:
        # Cheaper than a partition of the whole vocabulary: a threshold from every 16th logit
        # that about 2k logits pass, then the partition runs on those. If fewer than k pass,
        # fall through to the full partition, so the answer is the same either way.
        sample = logits[::16]
        j = -(-k // 8)
        threshold = np.partition(sample, len(sample) - j)[len(sample) - j]
        passed = np.flatnonzero(logits >= threshold)
        if len(passed) >= k:
            if len(passed) > k:
                passed = passed[np.argpartition(logits[passed], len(passed) - k)[len(passed) - k:]]
            return _descending(logits, passed)
    return _descending(logits, np.argpartition(logits, n - k)[n - k:])


def _sort(cur: Candidates) -> None:
    if not cur.sorted:
        cur.take(_descending(cur.logits), sorted=True)


def _seq_sum_f32(x: np.ndarray) -> F32:
    """Left-to-right float32 sum, as a C `float` accumulator adds (np.sum is pairwise)."""
    return np.cumsum(x, dtype=F32)[-1] if len(x) else F32(0)


# --- the samplers (llama.cpp names and semantics) ---------------------------------------------


def softmax(cur: Candidates, sort: bool) -> None:
    """llama_sampler_softmax_impl: p = exp(logit - max) / sum, optionally sorting first."""
    if sort:
        _sort(cur)
    max_l = cur.logits[0] if cur.sorted else cur.logits.max()
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(cur.logits - max_l).astype(F32, copy=False)
    cur.p = p / _seq_sum_f32(p)


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
        cur.take(_top_positions(cur.logits, k), sorted=True)
    cur.truncate(k)


def top_p(cur: Candidates, p: float, min_keep: int = 0) -> None:
    """Nucleus: the smallest most-likely prefix whose probability reaches p."""
    if p >= 1.0:
        return
    softmax(cur, sort=False)
    p32 = F32(p)
    if not cur.sorted:
        # llama.cpp's adaptive partial sort: try the top 256 first, the whole list if needed
        n = len(cur)
        order = _top_positions(cur.logits, 256) if n > 1024 else _descending(cur.logits)
        cum = np.cumsum(cur.p[order], dtype=F32)
        if len(order) < n and not (cum >= p32).any():
            order = _descending(cur.logits)
            cum = np.cumsum(cur.p[order], dtype=F32)
        cur.take(order, sorted=True)
    else:
        cum = np.cumsum(cur.p, dtype=F32)
    # the running sum never falls, so the first position reaching p is a binary search away
    first = int(np.searchsorted(cum, p32, side="left"))
    cur.truncate(max(first, min_keep - 1) + 1 if first < len(cum) else len(cur))


def min_p(cur: Candidates, p: float, min_keep: int = 0) -> None:
    """Drop tokens whose probability is below p times the top token's."""
    if p <= 0.0 or len(cur) == 0:
        return
    log_p = F32(math.log(p))
    if not cur.sorted:
        min_logit = cur.logits.max() + log_p
        keep = np.flatnonzero(cur.logits >= min_logit)
        if len(keep) and len(keep) >= min_keep:
            cur.take(keep, sorted=False)
            return
        _sort(cur)
    min_logit = cur.logits[0] + log_p
    # sorted: the tokens at or above min_logit are a prefix; the first token always stays
    first_below = int(np.count_nonzero(cur.logits >= min_logit))
    cur.truncate(min(max(first_below, 1, min_keep), len(cur)))


def typical(cur: Candidates, p: float, min_keep: int = 0) -> None:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy."""
    if p >= 1.0:
        return
    softmax(cur, sort=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(cur.p).astype(F32, copy=False)
        terms = np.where(cur.p > 0, -cur.p * logp, F32(0)).astype(F32, copy=False)
        entropy = _seq_sum_f32(terms)
        shifted = np.abs(-logp - entropy)
    order = np.argsort(shifted, kind="stable")
    cum = np.cumsum(cur.p[order], dtype=F32)
    hit = cum > F32(p)
    if min_keep > 0:
        hit &= np.arange(len(cum)) >= min_keep - 1
    last = int(np.argmax(hit)) + 1 if hit.any() else len(cur)
    cur.take(order[:last], sorted=False)


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
    if n == 1:  # llama.cpp draws anyway (its backend sampler draws once per token): keep in step
        rng.canonical()
        cur.p = np.ones(1, F32)
        return 0
    max_l = cur.logits[0] if cur.sorted else cur.logits.max()
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(cur.logits - max_l).astype(F32, copy=False)
    running = np.cumsum(p, dtype=np.float64)  # llama.cpp sums in double
    total = running[-1]
    target = total * rng.canonical()
    index = int(np.searchsorted(running, target, side="left"))
    cur.p = (p / total).astype(F32)
    return min(index, n - 1)


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
        # llama.cpp sorts the whole list; only the top m and the top k are ever read, so a
        # partial sort of those gives the same candidates without sorting 50k logits
        softmax(cur, sort=False)
        head = _top_positions(cur.logits, self.m) if not cur.sorted else np.arange(min(self.m, len(cur)))
        p = cur.p[head]
        n = min(self.m - 1, len(cur) - 1)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            i = np.arange(n, dtype=F32)
            t = np.log((i + F32(2)) / (i + F32(1))).astype(F32)
            b = np.log(p[:n] / p[1 : n + 1]).astype(F32)
            s_hat = _seq_sum_f32(t * b) / _seq_sum_f32(t * t)
            eps = s_hat - F32(1)
            k = np.power((eps * np.power(F32(2), self.mu)) / (F32(1) - np.power(F32(self.n_vocab), -eps)), F32(1) / s_hat)
        k = min(max(_int_of_float(float(k)), 1), len(cur))
        order = head[:k] if k <= len(head) else _top_positions(cur.logits, k)
        cur.take(order, sorted=True)
        softmax(cur, sort=True)
        index = discrete(cur.p, self.rng)
        self._update(cur.p[index])
        return index

    def _update(self, p: F32) -> None:
        with np.errstate(divide="ignore"):
            surprise = -np.log2(F32(p))
        self.mu = F32(self.mu - self.eta * (surprise - self.tau))


class MirostatV2(Mirostat):
    """Mirostat 2.0: drop the tokens whose surprise exceeds mu, sample, adjust mu."""

    def __init__(self, rng: Rng, tau: float, eta: float):
        super().__init__(0, rng, tau, eta)

    def apply(self, cur: Candidates) -> int:
        softmax(cur, sort=False)
        with np.errstate(divide="ignore"):
            keep = np.flatnonzero(-np.log2(cur.p) <= self.mu)
        if len(keep) == 0:
            keep = np.array([int(np.argmax(cur.logits))])
        # surprise falls as p rises, so the kept set is a most-likely prefix: sort just it
        cur.take(_descending(cur.logits, keep), sorted=True)
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
