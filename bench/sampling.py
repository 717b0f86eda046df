"""Cost of llama.cpp's default sampler chain per token on a 49152-token vocabulary
(SmolLM2's), outside the forward pass. A benchmark, not a test: run it on a quiet machine.

    python bench/sampling.py [--tokens 200]
"""

import argparse
import time

import numpy as np

from llamachat.runtime.params import SamplingParams
from llamachat.runtime.generation.sampling import Sampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=49152)
    args = ap.parse_args()
    logits = np.random.default_rng(3).normal(0, 3, args.vocab).astype(np.float32)
    for name, params in {
        "default chain": SamplingParams(seed=1),
        "default + repeat_penalty 1.1": SamplingParams(seed=1, repeat_penalty=1.1),
        "greedy": SamplingParams(temp=0.0),
    }.items():
        s = Sampler(params, args.vocab)
        s.accept_many(range(64))
        s.sample(logits)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            s.accept(s.sample(logits))
        per_token = (time.perf_counter() - t0) / args.tokens
        print(f"{name:32s} {per_token * 1e6:8.1f} us/token")


if __name__ == "__main__":
    main()
