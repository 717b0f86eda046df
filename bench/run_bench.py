#!/usr/bin/env python3
"""Our speed figures, optionally side by side with llama.cpp's llama-bench.

    python bench/run_bench.py [-m MODEL]... [-p 256] [-n 64] [-t 2] [-r 3] [--llama-bench PATH]
    python bench/run_bench.py --synthetic 1b --cache DIR [--quant Q4_K_M]... [-p 128 -n 32 ...]

--synthetic 1b writes (once, into DIR) a 1.1B llama in TinyLlama's shape with random weights
(speed does not depend on the values) and SmolLM2's vocabulary: an F16 file, then its --quant
variants made by `llamachat quantize`'s code; those files are then measured as the -m models.
3b and 7b do the same in Llama-3.2-3B's and Llama-2-7B's shapes.

For each model (library name or .gguf path; default: the library's default model):
- pp/tg tokens/s as `llamachat bench` measures them (mean ± stddev over -r repetitions);
- decode bytes per token (every weight matrix is read once per generated token) against this
  machine's memory read bandwidth with the same threads (numpy sums over 256 MB), i.e. the
  tg bound;
- cold start to first token: a fresh `python` process with an empty numba cache directory
  (every kernel compiled, as on the first-ever run) that imports the engine, loads the model
  and evaluates one token; warm start: the same with the kernels cached on disk;
- peak RSS of a fresh process that runs the pp and tg tests, against the budget
  model file size + KV cache + 250 MB;
- with --llama-bench, llama-bench's figures for the same file and the ratio ours/theirs.
Run it on a quiet machine: the 2 cores are shared, and figures from a busy one mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import sys
import time
from pathlib import Path

# before numpy: the engine's thread settings (OpenMP spin, OpenBLAS's worker timeout) apply only
# to libraries not loaded yet, as when the llamachat command runs (the subprocesses inherit them)
from llamachat.runtime import apply_thread_env  # noqa: E402

apply_thread_env()
import numpy as np  # noqa: E402


def memory_bandwidth(threads: int, nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes/s read by `threads` threads each summing its own part of 256 MB (numpy's sum
    releases the GIL): what generation with that many threads can stream at best."""
    from concurrent.futures import ThreadPoolExecutor

    parts = np.array_split(np.ones(nbytes // 8, dtype=np.float64), threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t0)
    return nbytes / best


def machine() -> str:
    """CPU model and core count, e.g. 'AMD EPYC 7B13, 2 cores'."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def start_to_first_token(path: Path, threads: int, cache_dir: str | None = None) -> float:
    """Seconds from a fresh interpreter's start to the first token's logits (the interpreter's
    own start-up included); cache_dir: a NUMBA_CACHE_DIR to use (an empty one: cold start)."""
    code = ("from llamachat.runtime.model.model import load_model;"
            f"m = load_model({str(path)!r}, n_ctx=64, n_threads={threads}); m.eval([1]); print('ok')")
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    total = time.perf_counter() - t0
    return total if out.stdout.strip() == "ok" else float("nan")


def peak_rss(path: Path, args) -> tuple[float, float]:
    """(peak RSS, budget) in MiB of a fresh process running pp then tg; budget = file size +
    KV cache + 250 MiB."""
    code = ("import resource, json, os;"
            "from llamachat.runtime.model.model import load_model;"
            "from llamachat.runtime.generation.bench import bench;"
            f"m = load_model({str(path)!r}, n_ctx={max(args.n_prompt, args.n_gen, 1)}, n_threads={args.threads});"
            f"bench(m, {args.n_prompt}, {args.n_gen}, 1);"
            # VmHWM, not ru_maxrss: the latter keeps the forking parent's peak across exec
            "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')];"
            "print(json.dumps([(hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,"
            f" (os.path.getsize({str(path)!r}) + m.cache.nbytes) / 2**20 + 250]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        rss, budget = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan"), float("nan")
    return rss, budget


# apply_thread_env (above) set OMP_WAIT_POLICY, GOMP_SPINCOUNT and OPENBLAS_THREAD_TIMEOUT (for numba's OpenMP
# threads) unless the user set them; llama.cpp's OpenMP threads would inherit them (with PASSIVE
# it generated at half speed), so llama-bench gets the environment as the user had it


def llama_bench(exe: str, path: Path, args) -> dict[str, float]:
    cmd = [exe, "-m", str(path), "-p", str(args.n_prompt), "-n", str(args.n_gen), "-t", str(args.threads),
           "-r", str(args.reps), "-o", "json"]
    from llamachat.runtime import USER_OMP_ENV

    env = dict(os.environ)
    for name, value in USER_OMP_ENV.items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    figures = {}
    for row in json.loads(out):
        test = f"pp{row['n_prompt']}" if row.get("n_prompt") else f"tg{row['n_gen']}"
        figures[test] = float(row["avg_ts"])
    return figures


# Published models' shapes (the vocabulary and tokenizer are SmolLM2's, read from the library's
# file, or --vocab-from's): TinyLlama-1.1B (head size 64, 8 query heads per KV head), Llama-3.2-3B
# (head size 128, 3 per KV head), Llama-2-7B (head size 128, no grouping); and Llama-3.2-1B
# (head size 64, 4 per KV head), whose 128256-token vocabulary (SmolLM2's padded with control
# tokens no text produces) makes the output product, tied to the embedding, a fifth of the weights
SYNTHETIC_SHAPES = {
    "1b": dict(n_embd=2048, n_layer=22, n_head=32, n_head_kv=4, n_ff=5632),
    "3b": dict(n_embd=3072, n_layer=28, n_head=24, n_head_kv=8, n_ff=8192),
    "7b": dict(n_embd=4096, n_layer=32, n_head=32, n_head_kv=32, n_ff=11008),
    "llama3-1b": dict(n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192, n_vocab=128256, tied=True),
}
CONTROL_TOKEN = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL
SYNTHETIC_QUANTS = ["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]


def synthetic_model(size: str, folder: Path, quants: list[str], tokenizer_file: Path) -> list[Path]:
    """The quantized files of a random-weights llama of the given SYNTHETIC_SHAPES size in
    `folder` (written if missing; the F16 file beside them is the quantizer's input)."""
    import numpy as np
    from gguf.constants import GGMLQuantizationType as T

    from llamachat.runtime.gguf.reader import GGUFFile
    from llamachat.runtime.gguf.writer import write_gguf
    from llamachat.runtime.gguf.quantize_model import quantize_model

    shape = SYNTHETIC_SHAPES[size]
    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / f"synthetic-{size}-F16.gguf"
    if not f16.exists():
        with GGUFFile(tokenizer_file) as g:
            meta = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.")}
            vtypes = {k: v for k, v in g.value_types.items() if k in meta}
            atypes = {k: v for k, v in g.array_types.items() if k in meta}
        n_vocab = len(meta["tokenizer.ggml.tokens"])
        if shape.get("n_vocab", n_vocab) > n_vocab:  # pad every per-token array to the shape's vocabulary
            pad = shape["n_vocab"] - n_vocab
            meta["tokenizer.ggml.tokens"] = list(meta["tokenizer.ggml.tokens"]) + [f"<|reserved_{i}|>" for i in range(pad)]
            if "tokenizer.ggml.token_type" in meta:
                meta["tokenizer.ggml.token_type"] = list(meta["tokenizer.ggml.token_type"]) + [CONTROL_TOKEN] * pad
            if "tokenizer.ggml.scores" in meta:
                meta["tokenizer.ggml.scores"] = list(meta["tokenizer.ggml.scores"]) + [0.0] * pad
            n_vocab = shape["n_vocab"]
        d, n_ff, n_head, n_kv = shape["n_embd"], shape["n_ff"], shape["n_head"], shape["n_head_kv"]
        kv = n_kv * (d // n_head)
        meta.update({
            "general.architecture": "llama", "general.name": f"synthetic {size} (random weights)",
            "general.file_type": 1, "llama.block_count": shape["n_layer"], "llama.context_length": 2048,
            "llama.embedding_length": d, "llama.feed_forward_length": n_ff,
            "llama.attention.head_count": n_head, "llama.attention.head_count_kv": n_kv,
            "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.rope.dimension_count": d // n_head, "llama.vocab_size": n_vocab,
        })
        rng = np.random.default_rng(0)

        def normal(rows, cols):  # called only when the tensor is written: one tensor in memory
            return lambda: (rng.standard_normal((rows, cols), np.float32) * np.float32(cols ** -0.5)).astype(np.float16)

        def ones(n):
            return lambda: np.ones(n, np.float32)

        tensors = [("token_embd.weight", (d, n_vocab), T.F16, normal(n_vocab, d))]
        for i in range(shape["n_layer"]):
            for name, rows, cols in (("attn_q", d, d), ("attn_k", kv, d), ("attn_v", kv, d), ("attn_output", d, d),
                                     ("ffn_gate", n_ff, d), ("ffn_up", n_ff, d), ("ffn_down", d, n_ff)):
                tensors.append((f"blk.{i}.{name}.weight", (cols, rows), T.F16, normal(rows, cols)))
            tensors += [(f"blk.{i}.attn_norm.weight", (d,), T.F32, ones(d)), (f"blk.{i}.ffn_norm.weight", (d,), T.F32, ones(d))]
        tensors.append(("output_norm.weight", (d,), T.F32, ones(d)))
        if not shape.get("tied"):
            tensors.append(("output.weight", (d, n_vocab), T.F16, normal(n_vocab, d)))
        print(f"writing {f16} ...", flush=True)
        write_gguf(f16, meta, tensors, value_types=vtypes, array_types=atypes)
    out = []
    for q in quants:
        path = folder / f"synthetic-{size}-{q}.gguf"
        if not path.exists():
            print(f"quantizing {path} ...", flush=True)
            quantize_model(f16, path, q)
        out.append(path)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", action="append", help="library name or .gguf path (repeatable)")
    ap.add_argument("-p", "--n-prompt", dest="n_prompt", type=int, default=256)
    ap.add_argument("-n", "--n-gen", dest="n_gen", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--repetitions", dest="reps", type=int, default=3)
    ap.add_argument("--llama-bench", dest="llama_bench", help="path to a llama-bench binary for side-by-side ratios")
    ap.add_argument("--synthetic", choices=sorted(SYNTHETIC_SHAPES),
                    help="measure a random-weights llama of this size (TinyLlama's shape for 1b, Llama-3.2's for 3b "
                         "and llama3-1b, Llama-2's for 7b), written into --cache")
    ap.add_argument("--cache", type=Path, help="folder holding the --synthetic files (written there once)")
    ap.add_argument("--vocab-from", dest="vocab_from", type=Path,
                    help="--synthetic's tokenizer source (.gguf; default: the library's default model, SmolLM2)")
    ap.add_argument("--quant", action="append", help=f"--synthetic's formats (repeatable; default {' '.join(SYNTHETIC_QUANTS)})")
    args = ap.parse_args()
    if args.synthetic and args.cache is None:
        print("error: --synthetic needs --cache DIR: the folder to keep the generated model files in", file=sys.stderr)
        return 2

    from llamachat.model_store.library import Library
    from llamachat.runtime.errors import UserError
    from llamachat.runtime.generation.bench import bench
    from llamachat.runtime.model.model import load_model

    print(f"machine: {machine()}; load average at start: {load_average()}")
    bw = memory_bandwidth(args.threads)
    print(f"memory read bandwidth ({args.threads} threads, numpy sums of 256 MB): {bw / 1e9:.1f} GB/s")
    lib = Library.load()
    names = list(args.model or [])
    if args.synthetic:
        try:
            smollm2 = args.vocab_from or Path(lib.resolve(None).path)
            names += [str(p) for p in synthetic_model(args.synthetic, args.cache, args.quant or SYNTHETIC_QUANTS, smollm2)]
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    for name in names or [None]:
        try:
            path = Path(lib.resolve(name).path) if name is None or not name.endswith(".gguf") else Path(name)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
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
        with tempfile.TemporaryDirectory(prefix="llamachat-numba-") as empty:
            cold = start_to_first_token(path, args.threads, empty)
        start_to_first_token(path, args.threads)  # make sure the usual cache holds every kernel
        warm = start_to_first_token(path, args.threads)
        print(f"  start to first token (fresh process): cold (kernels compiled) {cold:.1f} s, warm {warm:.2f} s")
        rss, budget = peak_rss(path, args)
        print(f"  peak RSS running pp+tg: {rss:.0f} MiB (budget: file + KV cache + 250 MiB = {budget:.0f} MiB)")
    print(f"\nload average at end: {load_average()} (figures from a busy machine mean little)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
