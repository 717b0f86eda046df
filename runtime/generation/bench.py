"""Speed measurement like llama.cpp's llama-bench: prompt processing (pp: n_prompt tokens in
one batch from an empty cache) and text generation (tg: n_gen single-token decodes from an
empty cache), each run once to warm up and then `reps` times; tokens/s per repetition,
reported as mean and sample standard deviation. Tokens are random ids, as in llama-bench.

Generation of a model larger than the CPU's caches is bound by memory: each token reads every
weight once (the token embedding only one row). `measure_bandwidth` measures how fast this
machine reads memory (a parallel sum over a 1 GiB array, with the threads numba has), and
`BenchResult.bound_percent` says how close a tg run came to reading the weights at that speed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numba
import numpy as np

# the array measure_bandwidth reads: far larger than any CPU cache, small enough to allocate
BANDWIDTH_BYTES = 1 << 30


@dataclass
class BenchResult:
    test: str  # "pp256" / "tg64"
    n_tokens: int
    samples: list[float]  # tokens/s of each repetition
    threads: int
    weight_bytes: int | None = None  # tg: bytes of weights one token reads (weight_bytes_per_token)

    def bound_percent(self, bandwidth: float) -> float | None:
        """tg: the weights read per second at the measured rate, as a percentage of the memory
        read bandwidth (bytes/s): 100 would be generation as fast as memory allows."""
        if not self.weight_bytes or not bandwidth:
            return None
        return 100.0 * self.mean * self.weight_bytes / bandwidth

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def stddev(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0


@numba.njit(parallel=True, cache=True, nogil=True)
def _sum_words(a):
    total = np.uint64(0)
    for i in numba.prange(a.shape[0]):
        total += a[i]
    return total


def measure_bandwidth(n_bytes: int | None = None, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s: the fastest of `repeats` parallel sums over an array of
    n_bytes (default BANDWIDTH_BYTES), with numba's current thread count (the model's). About
    half a second for 1 GiB, most of it writing the array once so its pages exist."""
    n_words = (n_bytes or BANDWIDTH_BYTES) // 8
    words = np.empty(n_words, dtype=np.uint64)
    words.fill(1)
    _sum_words(words[:1024])  # compiled (or loaded from the cache) outside the timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        total = _sum_words(words)
        best = min(best, time.perf_counter() - t0)
        if total != n_words:  # the sum is used, so the reads cannot be left out
            raise RuntimeError(f"bandwidth probe: sum {total} != {n_words}")
    return n_words * 8 / best


def weight_bytes_per_token(gguf) -> int:
    """Bytes of weights one decoded token reads, from the file's tensors: all of them, but of
    the token embedding only one row, unless it doubles as the output matrix (tied)."""
    tensors = gguf.tensors
    total = sum(t.nbytes for t in tensors.values())
    embd = tensors.get("token_embd.weight")
    if embd is not None and "output.weight" in tensors:
        total -= embd.nbytes - embd.row_nbytes
    return total


def _pp(model, tokens) -> float:
    model.truncate(0)
    t0 = time.perf_counter()
    model.eval(tokens)
    return time.perf_counter() - t0


def _tg(model, tokens) -> float:
    model.truncate(0)
    t0 = time.perf_counter()
    for t in tokens:
        model.eval([t])
    return time.perf_counter() - t0


def bench(model, n_prompt: int = 256, n_gen: int = 64, reps: int = 3, seed: int = 0, on_result=None) -> list[BenchResult]:
    """Run the pp and tg tests (a count of 0 skips one). The model's context must hold
    max(n_prompt, n_gen) tokens."""
    rng = np.random.default_rng(seed)
    results = []
    for kind, n, run in (("pp", n_prompt, _pp), ("tg", n_gen, _tg)):
        if n <= 0:
            continue
        tokens = rng.integers(0, model.config.n_vocab, size=n).tolist()
        run(model, tokens[:min(n, 16)] if kind == "tg" else tokens)  # warm-up
        samples = [n / run(model, tokens) for _ in range(reps)]
        res = BenchResult(f"{kind}{n}", n, samples, model.n_threads,
                          weight_bytes_per_token(model.gguf) if kind == "tg" else None)
        results.append(res)
        if on_result:
            on_result(res)
    model.truncate(0)
    return results
