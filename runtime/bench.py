"""Speed measurement like llama.cpp's llama-bench: prompt processing (pp: n_prompt tokens in
one batch from an empty cache) and text generation (tg: n_gen single-token decodes from an
empty cache), each run once to warm up and then `reps` times; tokens/s per repetition,
reported as mean and sample standard deviation. Tokens are random ids, as in llama-bench.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class BenchResult:
    test: str  # "pp256" / "tg64"
    n_tokens: int
    samples: list[float]  # tokens/s of each repetition
    threads: int

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def stddev(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0


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
        res = BenchResult(f"{kind}{n}", n, samples, model.n_threads)
        results.append(res)
        if on_result:
            on_result(res)
    model.truncate(0)
    return results
