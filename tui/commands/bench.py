"""`llamachat bench -m MODEL [-p 256] [-n 64] [-t 2] [-r 3] [--json]`, like llama-bench.

Prints a table (model, size, params, threads, test, t/s as mean ± stddev) or, with --json, a
JSON list of objects with keys model, test, tokens_per_second, stddev, threads (and
n_tokens, samples, model_size, model_type). With a generation test, the memory read bandwidth
is measured once (about half a second) and each tg result says what percentage of the bound
it reached, the bound being the bytes of weights a token reads over that bandwidth (JSON:
bandwidth_bytes_per_second, weight_bytes_per_token, bound_percent).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llamachat.runtime.errors import UserError


def configure(parser) -> None:
    parser.add_argument("-m", "--model", help="library model name or path to a .gguf file (default: the library's default model)")
    parser.add_argument("-p", "--n-prompt", dest="n_prompt", type=int, default=256, help="prompt tokens processed in one batch (0 = skip; default 256)")
    parser.add_argument("-n", "--n-gen", dest="n_gen", type=int, default=64, help="tokens generated one at a time (0 = skip; default 64)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("-r", "--repetitions", dest="reps", type=int, default=3, help="repetitions of each test after a warm-up (default 3)")
    parser.add_argument("-b", "--batch-size", dest="n_batch", type=int, default=2048, help="tokens per evaluation call (default 2048)")
    parser.add_argument("--isa", choices=("avx512vnni", "avx2", "portable"), default=None,
                        help="run the kernels built for this instruction set (default: the best this CPU has; "
                             "avx2 measures what an AVX2-only CPU runs)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def run(args) -> int:
    from llamachat.model_store.library import Library, file_type_name
    from llamachat.runtime.generation.bench import bench, measure_bandwidth
    from llamachat.runtime.model.model import load_model

    for flag, value, low in (("-p", args.n_prompt, 0), ("-n", args.n_gen, 0), ("-r", args.reps, 1), ("-b", args.n_batch, 1)):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, not {value}")
    if args.n_prompt == 0 and args.n_gen == 0:
        raise UserError("nothing to measure: -p and -n are both 0")
    path = Path(Library.load().resolve(args.model).path)
    model = load_model(path, n_ctx=max(args.n_prompt, args.n_gen, 1), n_threads=args.threads, n_batch=args.n_batch,
                       isa=args.isa)
    from llamachat.runtime.quants.simd import HOST_ISA

    isa = args.isa or HOST_ISA.name  # the kernels' instruction set
    name = model.metadata.get("general.name") or path.stem
    size_gib = path.stat().st_size / 2**30
    n_params = sum(t.n_elements for t in model.gguf.tensors.values())
    # as llama-bench labels it: general.file_type's name (Q4_K_M), else the commonest tensor type
    ftype = file_type_name(model.metadata.get("general.file_type"), [t.ggml_type for t in model.gguf.tensors.values()]) or "?"
    rows = []
    # columns as wide as their widest entry, so a long model name keeps the table aligned
    wn, wt = max(24, len(name)), max(6, len(ftype))

    def show(res):
        if not args.json:
            rate = f"{res.mean:.2f} ± {res.stddev:.2f}"
            print(f"| {name:<{wn}} | {size_gib * 1024:8.2f} MiB | {n_params / 1e6:7.2f} M | {ftype:<{wt}} | {res.threads:7d} | "
                  f"{res.test:>6} | {rate:>15} |", flush=True)

    if not args.json:
        print(f"| {'model':<{wn}} | {'size':>12} | {'params':>9} | {'type':<{wt}} | threads | {'test':>6} | {'t/s':>15} |")
        print(f"| {'-' * wn} | {'-' * 12}:| {'-' * 9}:| {'-' * wt} | {'-' * 6}: | {'-' * 6}:| {'-' * 15}:|")
    # once per run, with the model's threads: the bound generation is measured against
    bandwidth = measure_bandwidth() if args.n_gen > 0 else None
    notes = []
    for res in bench(model, args.n_prompt, args.n_gen, args.reps, on_result=show):
        row = {"model": name, "model_path": str(path), "model_size": path.stat().st_size, "model_type": ftype,
               "test": res.test, "n_tokens": res.n_tokens, "tokens_per_second": round(res.mean, 3),
               "stddev": round(res.stddev, 3), "samples": [round(s, 3) for s in res.samples], "threads": res.threads,
               "isa": isa}
        pct = res.bound_percent(bandwidth) if bandwidth else None
        if pct is not None:
            row.update(bandwidth_bytes_per_second=round(bandwidth), weight_bytes_per_token=res.weight_bytes,
                       bound_percent=round(pct, 1))
            notes.append(f"{res.test}: {res.weight_bytes / 1e6:.1f} MB of weights a token; memory read bandwidth "
                         f"{bandwidth / 1e9:.1f} GB/s ({res.threads} thread{'s' if res.threads != 1 else ''}, measured "
                         f"now), a bound of {bandwidth / res.weight_bytes:.1f} t/s: {pct:.0f}% reached")
        rows.append(row)
    if notes and not args.json:
        print()
        print("\n".join(notes))
    if not args.json:
        print(f"kernels: {isa}" + (" (--isa)" if args.isa else " (the best this CPU has)"))
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    return 0
