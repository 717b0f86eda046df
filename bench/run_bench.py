#!/usr/bin/env python3
"""Our speed figures, optionally side by side with llama.cpp's llama-bench.

    python bench/run_bench.py [-m MODEL]... [-p 256] [-n 64] [-t 2] [-r 3] [--llama-bench PATH]

For each model (library name or .gguf path; default: the library's default model):
- pp/tg tokens/s as `llamachat bench` measures them (mean ± stddev over -r repetitions);
- decode bytes per token (every weight matrix is read once per generated token) against this
  machine's single-thread memory read bandwidth (numpy sum over 256 MB), i.e. the tg bound;
- warm start to first token: a fresh `python` process that imports the engine, loads the
  model and evaluates one token (numba kernels from the on-disk cache);
- with --llama-bench, llama-bench's figures for the same file and the ratio ours/theirs.
Run it on a quiet machine: the 2 cores are shared, and figures from a busy one mean little.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def memory_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    a = np.ones(nbytes // 8, dtype=np.float64)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def warm_start_seconds(path: Path, threads: int) -> float:
    code = ("import time; t0 = time.perf_counter();"
            "from llamachat.runtime.model import load_model;"
            f"m = load_model({str(path)!r}, n_ctx=64, n_threads={threads}); m.eval([1]);"
            "print(time.perf_counter() - t0)")
    subprocess.run([sys.executable, "-c", code], capture_output=True)  # make sure kernels are cached
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    total = time.perf_counter() - t0
    return total if out.stdout.strip() else float("nan")


def llama_bench(exe: str, path: Path, args) -> dict[str, float]:
    cmd = [exe, "-m", str(path), "-p", str(args.n_prompt), "-n", str(args.n_gen), "-t", str(args.threads),
           "-r", str(args.reps), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    figures = {}
    for row in json.loads(out):
        test = f"pp{row['n_prompt']}" if row.get("n_prompt") else f"tg{row['n_gen']}"
        figures[test] = float(row["avg_ts"])
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", help="library name or .gguf path (repeatable)")
    ap.add_argument("-p", "--n-prompt", dest="n_prompt", type=int, default=256)
    ap.add_argument("-n", "--n-gen", dest="n_gen", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--repetitions", dest="reps", type=int, default=3)
    ap.add_argument("--llama-bench", dest="llama_bench", help="path to a llama-bench binary for side-by-side ratios")
    args = ap.parse_args()

    from llamachat.model_store.library import Library
    from llamachat.runtime.bench import bench
    from llamachat.runtime.model import load_model

    bw = memory_bandwidth()
    print(f"memory read bandwidth (1 thread, numpy sum of 256 MB): {bw / 1e9:.1f} GB/s")
    lib = Library.load()
    for name in args.model or [None]:
        path = Path(lib.resolve(name).path)
        m = load_model(path, n_ctx=max(args.n_prompt, args.n_gen), n_threads=args.threads)
        weight_bytes = m.weights.nbytes
        print(f"\n{path.name}: {weight_bytes / 2**20:.1f} MiB of weights read per generated token; "
              f"bandwidth bound {bw / weight_bytes:.0f} tokens/s")
        ours = {r.test: r for r in bench(m, args.n_prompt, args.n_gen, args.reps)}
        theirs = llama_bench(args.llama_bench, path, args) if args.llama_bench else {}
        for test, r in ours.items():
            line = f"  {test:>6}: {r.mean:8.1f} ± {r.stddev:5.1f} tokens/s"
            if test.startswith("tg"):
                line += f"  ({r.mean * weight_bytes / 1e9:.1f} GB/s of weights, {100 * r.mean * weight_bytes / bw:.0f}% of the bound)"
            if test in theirs:
                line += f"  llama.cpp {theirs[test]:8.1f}  ratio {r.mean / theirs[test]:.2f}"
            print(line)
        m.close()
        print(f"  warm start to first token: {warm_start_seconds(path, args.threads):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
