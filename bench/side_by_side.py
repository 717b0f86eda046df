#!/usr/bin/env python3
"""The README's side-by-side speed table: llamachat against llama.cpp's llama-bench, interleaved.

    python bench/side_by_side.py [--llama-bench PATH] [--out FILE]
        [--small FILE]... [--large FILE]... [--threads 1 2] [--rounds 2] [--reps N]
        [--only SUBSTRING] [--no-start] [--timeout SECONDS]

For each file and thread count it runs `llamachat bench --json` and `llama-bench -o json` on
the same file, ours then theirs, twice (two rounds: ours, theirs, ours, theirs), so that a
change in the machine's load falls on both. --small files (default: SmolLM2-135M in seven
formats) are measured at pp256 / tg64 with -r 2, --large ones (default: the 1.1B files in
TinyLlama's shape that `bench/run_bench.py --synthetic 1b --cache /tmp/s8/syn` writes) at
pp128 / tg32 with -r 1: their single repetition after a warm-up lasts seconds, and -r 2 there
would take the default run past 25 minutes on a 2-core machine. Then the start of the app,
`llamachat -m FILE -p "What is the capital of France?" -n 4 --ignore-eos -s 1 --no-tui` (four
tokens decoded, always), from a fresh empty LLAMACHAT_HOME and NUMBA_CACHE_DIR: cold (every
kernel compiled), a second format's first use with that cache, and warm.

It prints, and writes to --out, one markdown block for the README: the CPU and its instruction
sets, llama-bench's build, the load average at start and end, the table (tokens/s of each
round, the ratio ours / llama.cpp of the rounds' means, the percentage of the memory bound
generation reached) and the start times. Progress goes to stderr; a run that fails leaves its
cell "failed" and says why on stderr. Run it on a quiet machine: figures from a busy one mean
little (the load average is printed beside them for that reason).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HOME = Path.home()
DEFAULT_SMALL = [
    str(HOME / ".cache/llamachat/models/SmolLM2-135M-Instruct.Q4_1.gguf"),  # the library's default model
    "/tmp/arith/Q4_0.gguf", "/tmp/arith/Q8_0.gguf", "/tmp/arith/Q4_K_M.gguf",
    "/tmp/s8/smol/Q5_K_M.gguf", "/tmp/s8/smol/Q6_K.gguf", "/tmp/arith/f16.gguf",
]
DEFAULT_LARGE = [f"/tmp/s8/syn/synthetic-1b-{q}.gguf" for q in ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")]
DEFAULT_LLAMA_BENCH = "/work/llamacpp/llama.cpp/build/bin/llama-bench"
PROMPT = "What is the capital of France?"
# --ignore-eos: the model may end this raw prompt at once, and then no single-token decode (nor
# its kernels' compilation) would be in the time; the seed keeps the reply the same run to run
START_FLAGS = ["-p", PROMPT, "-n", "4", "--ignore-eos", "-s", "1", "--no-tui"]
START_MARK = "<!-- side_by_side.py table -->"
END_MARK = "<!-- end of side_by_side.py table -->"


# ---------------------------------------------------------------- parsing the two tools' output

def _json_list(text: str, tool: str) -> list:
    """The JSON list a tool printed on stdout (anything printed before it skipped)."""
    start = text.find("[")
    if start < 0:
        raise ValueError(f"{tool} printed no JSON list")
    rows = json.loads(text[start:])
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{tool} printed an empty result")
    return rows


def parse_ours(text: str) -> dict:
    """`llamachat bench --json` output -> {"pp", "tg": tokens/s (mean of the repetitions),
    "bandwidth": bytes/s it measured, "weight_bytes": bytes a token reads, "bound_percent",
    "type"}; the keys of a test it did not run are missing."""
    out: dict = {}
    for row in _json_list(text, "llamachat bench"):
        test = str(row["test"])
        kind = test[:2]
        if kind not in ("pp", "tg"):
            continue
        out[kind] = float(row["tokens_per_second"])
        out.setdefault("type", row.get("model_type"))
        if kind == "tg":
            for key, name in (("bandwidth_bytes_per_second", "bandwidth"), ("weight_bytes_per_token", "weight_bytes"),
                              ("bound_percent", "bound_percent")):
                if row.get(key) is not None:
                    out[name] = float(row[key])
    if "pp" not in out and "tg" not in out:
        raise ValueError("llamachat bench printed neither a pp nor a tg result")
    return out


def parse_llama_bench(text: str) -> dict:
    """`llama-bench -o json` output -> {"pp", "tg": tokens/s (avg_ts), "build": "commit (number)",
    "cpu": its cpu_info}."""
    out: dict = {}
    for row in _json_list(text, "llama-bench"):
        if row.get("n_prompt") and not row.get("n_gen"):
            out["pp"] = float(row["avg_ts"])
        elif row.get("n_gen") and not row.get("n_prompt"):
            out["tg"] = float(row["avg_ts"])
        out.setdefault("build", f"{row.get('build_commit', '?')} ({row.get('build_number', '?')})")
        out.setdefault("cpu", row.get("cpu_info"))
    if "pp" not in out and "tg" not in out:
        raise ValueError("llama-bench printed neither a pp nor a tg result")
    return out


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """/proc/cpuinfo -> (model name, the flags that matter for these kernels, as the CPU lists them)."""
    name, flags = "unknown CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == "unknown CPU":
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi", "avx512_bf16",
              "avx_vnni", "amx_tile", "amx_int8", "asimd", "asimddp"]
    return name, [f for f in wanted if f in flags]


# ---------------------------------------------------------------- what is measured

@dataclass
class Target:
    path: Path
    label: str  # "SmolLM2-135M Q4_1"
    n_prompt: int
    n_gen: int
    reps: int
    params: int = 0  # for the time estimate


@dataclass
class Cell:
    """One file at one thread count: each round's figures of both tools (None: that run failed)."""
    target: Target
    threads: int
    ours: list = field(default_factory=list)
    theirs: list = field(default_factory=list)


def describe(path: Path, group: str) -> tuple[str, int]:
    """(label, parameter count) from the file's header: "<group> <file type>"."""
    try:
        from llamachat.model_store.library import file_type_name
        from llamachat.runtime.gguf.reader import GGUFFile

        with GGUFFile(path) as g:
            tensors = list(g.tensors.values())
            ftype = file_type_name(g.metadata.get("general.file_type"), [t.ggml_type for t in tensors])
            return f"{group} {ftype or path.stem}", sum(t.n_elements for t in tensors)
    except Exception as e:  # noqa: BLE001 - the run itself will say what is wrong with the file
        print(f"note: could not read {path}'s header ({e}); labelled by its name", file=sys.stderr)
        return f"{group} {path.stem}", path.stat().st_size * 2


# rough rates of a quiet 2-core Intel Xeon with 2 threads, for the estimate printed up front only
def run_seconds(t: Target, threads: int, tool: str) -> float:
    size = t.path.stat().st_size
    slow = 2.0 / threads  # one thread: about half the speed
    pp_tok = (2 * t.params / 1.6e11 + 2.3e-3) * slow
    tg_tok = size / 14e9 * (1.75 if threads == 1 else 1.0) + 1e-3
    work = (1 + t.reps) * (t.n_prompt * pp_tok + t.n_gen * tg_tok)  # a warm-up run, then -r
    if tool == "ours":
        return 3.0 + size / 0.5e9 + work  # interpreter, imports, load (repacking), bandwidth probe
    return 0.5 + size / 2e9 + work * 0.8


START_SECONDS = 50 + 30 + 2  # cold Q4_1, then Q4_K_M's kernels, then warm (quiet Xeon, numba cache empty)


# ---------------------------------------------------------------- running

class Progress:
    def __init__(self, estimate: float):
        self.t0 = time.monotonic()
        self.estimate = estimate
        self.done_estimate = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        e = self.elapsed()
        # scale what is left by how the runs so far compared with their estimate
        scale = e / self.done_estimate if self.done_estimate > 30 else 1.0
        left = max(0.0, self.estimate - self.done_estimate) * scale
        print(f"[{e / 60:5.1f} min elapsed, about {left / 60:.0f} min left] {text}", file=sys.stderr, flush=True)


def llama_bench_env() -> dict:
    """The environment as the user had it: if our own thread settings (OpenMP spinning,
    OpenBLAS timeout) were applied in this process, llama.cpp's OpenMP threads must not inherit them."""
    env = dict(os.environ)
    try:
        if "llamachat.runtime" in sys.modules:
            from llamachat.runtime import USER_OMP_ENV

            for name, value in USER_OMP_ENV.items():
                env.pop(name, None)
                if value is not None:
                    env[name] = value
    except ImportError:
        pass
    return env


def run_tool(cmd: list[str], parse, timeout: float, env=None) -> tuple[dict | None, str]:
    """(parsed figures, "") or (None, why it failed)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"no result within {timeout:.0f} s (--timeout)"
    except OSError as e:
        return None, f"could not start {cmd[0]}: {e}"
    if out.returncode != 0:
        tail = " | ".join((out.stderr or out.stdout).strip().splitlines()[-3:])
        return None, f"exit status {out.returncode}: {tail}"
    try:
        return parse(out.stdout), ""
    except (ValueError, KeyError, TypeError) as e:
        return None, f"unreadable output ({e}): {out.stdout[:200]!r}"


def ours_cmd(llamachat: list[str], t: Target, threads: int, isa: str | None = None) -> list[str]:
    return [*llamachat, "bench", "-m", str(t.path), "-p", str(t.n_prompt), "-n", str(t.n_gen),
            "-t", str(threads), "-r", str(t.reps), "--json", *(["--isa", isa] if isa else [])]


def theirs_cmd(exe: str, t: Target, threads: int) -> list[str]:
    return [exe, "-m", str(t.path), "-p", str(t.n_prompt), "-n", str(t.n_gen), "-t", str(threads),
            "-r", str(t.reps), "-o", "json"]


HELPER_MODULE = "llamachat.tui.compile_ahead"


def helpers_running() -> list[int]:
    """Process ids of cold-start helpers (tui/compile_ahead) still running: one a short run
    released at its exit finishes its compile in the background (Linux's /proc; elsewhere none)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if HELPER_MODULE.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def _run_timed(cmd: list[str], env: dict, timeout: float) -> tuple[str, str, float | None, float]:
    """Run cmd; (why it failed or "", its stdout, seconds to its first stdout byte, seconds to exit)."""
    t0 = time.monotonic()
    first = None
    chunks = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    except OSError as e:
        return f"could not start {cmd[0]}: {e}", "", None, 0.0
    err = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    while True:
        if time.monotonic() - t0 > timeout:
            proc.kill()
            proc.wait()
            return f"no answer within {timeout:.0f} s (--timeout)", b"".join(chunks).decode(errors="replace"), first, time.monotonic() - t0
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if not ready:
            continue
        data = os.read(proc.stdout.fileno(), 65536)
        if not data:
            break
        if first is None and data.strip():
            first = time.monotonic() - t0
        chunks.append(data)
    proc.wait()
    wall = time.monotonic() - t0
    reader.join(5)
    stderr = (err[0] if err else b"").decode(errors="replace")
    why = "" if proc.returncode == 0 else f"exit status {proc.returncode}: " + " | ".join(stderr.strip().splitlines()[-3:])
    return why, b"".join(chunks).decode(errors="replace"), first, wall


def measure_start(llamachat: list[str], first: Path, second: Path, timeout: float, progress: Progress) -> list[dict]:
    """Seconds to the app's one-shot answer's first token and to its exit, its CPU, and when a
    helper it released finished in the background: cold, a new format, warm (each run after the
    previous one's helper has ended)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="side-by-side-start-") as tmp:
        env = dict(os.environ)
        env.pop("LLAMACHAT_CACHE_DIR", None)
        # an installed llamachat has its modules' bytecode compiled (pip does it); with this set,
        # an editable install's would be compiled from source at every start
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["LLAMACHAT_HOME"] = str(Path(tmp) / "home")
        # set as well: numba's cache must be empty even where the user set NUMBA_CACHE_DIR (theirs would win)
        env["NUMBA_CACHE_DIR"] = str(Path(tmp) / "numba")
        for what, path in (("cold: empty numba cache", first), (f"first use of a new format (the cache holds {first.name}'s kernels)", second),
                           ("warm", first)):
            progress.say(f"start, {what}: llamachat -m {path} {' '.join(START_FLAGS[2:])}")
            cmd = [*llamachat, "-m", str(path), *START_FLAGS]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.monotonic()
            why, out, first_token, wall = _run_timed(cmd, env, timeout)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            background = None
            while helpers_running() and time.monotonic() - t0 < timeout:  # (the next run must not meet it)
                time.sleep(0.2)
                background = time.monotonic() - t0
            reply = " ".join(out.split())
            if why:
                print(f"  failed: {why}", file=sys.stderr, flush=True)
            else:
                print(f"  first token {first_token or 0:.1f} s, exit {wall:.1f} s, {cpu:.1f} s CPU"
                      f"{'' if background is None else f', background compile until {background:.1f} s'}: {reply!r}",
                      file=sys.stderr, flush=True)
            rows.append(dict(what=what, file=path, first=None if why else first_token, wall=None if why else wall,
                             cpu=None if why else cpu, background=background, reply=reply))
    return rows


# ---------------------------------------------------------------- the markdown block

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _rounds(results: list, key: str) -> str:
    vals = [r.get(key) if r else None for r in results]
    if not vals or all(v is None for v in vals):
        return "failed" if results else "-"
    return ", ".join("failed" if v is None else f"{v:.1f}" for v in vals)


def _ratio(ours: list, theirs: list, key: str) -> str:
    a = _mean([r.get(key) if r else None for r in ours])
    b = _mean([r.get(key) if r else None for r in theirs])
    if a is None or not b:
        return "-"
    text = f"{a / b:.2f}"
    return f"**{text}**" if round(a / b, 2) < 1 else text  # behind llama.cpp: in bold


def _bound(ours: list, theirs: list) -> str:
    """Generation's share of the memory bound, ours / llama.cpp's, with the bandwidth our run
    measured in the same round."""
    mine, other = [], []
    for o, t in zip(ours, theirs + [None] * len(ours)):
        if not o or not o.get("bandwidth") or not o.get("weight_bytes"):
            continue
        if o.get("tg") is not None:
            mine.append(100 * o["tg"] * o["weight_bytes"] / o["bandwidth"])
        if t and t.get("tg") is not None:
            other.append(100 * t["tg"] * o["weight_bytes"] / o["bandwidth"])
    a, b = _mean(mine), _mean(other)
    return "-" if a is None else f"{a:.0f} / {b:.0f}" if b is not None else f"{a:.0f} / -"


def render(cells: list[Cell], header: dict, start: list[dict] | None, rounds: int) -> str:
    lines = [START_MARK, ""]
    lines.append(f"Measured by `python bench/side_by_side.py` on {header['date']} ({header['duration']}).")
    lines.append(f"CPU: {header['cpu']}, {header['cores']} cores; instruction sets (/proc/cpuinfo): "
                 f"{header['flags']}; llamachat's kernels: {header['isa']}.")
    lines.append(f"llama.cpp: `{header['llama_bench']}`, build {header['build']}; {header['ggml']}.")
    lines.append(f"Load average (1, 5, 15 min): {header['load_start']} at the start, {header['load_end']} at the end.")
    lines.append("")
    reps = sorted({c.target.reps for c in cells})
    order = ", ".join(["ours, theirs"] * rounds)
    lines.append(f"Tokens/s. Per file and thread count: `llamachat bench`, then `llama-bench`, {rounds} round{'s' if rounds > 1 else ''} "
                 f"({order}); each figure is one round's mean of -r {'/'.join(map(str, reps))} repetitions "
                 "after a warm-up. Ratio: ours / llama.cpp of the rounds' means, **bold** where llamachat is behind. "
                 "Bandwidth: weights a generated token reads × tokens/s, as a percentage of the memory read bandwidth "
                 "`llamachat bench` measured in the same round (ours / llama.cpp's).")
    lines.append("")
    lines.append("| file | threads | prompt, ours | prompt, llama.cpp | ratio | generation, ours | generation, llama.cpp | ratio | bandwidth % |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for c in cells:
        t = c.target
        lines.append(f"| {t.label} (pp{t.n_prompt} / tg{t.n_gen}) | {c.threads} | {_rounds(c.ours, 'pp')} | {_rounds(c.theirs, 'pp')} | "
                     f"{_ratio(c.ours, c.theirs, 'pp')} | {_rounds(c.ours, 'tg')} | {_rounds(c.theirs, 'tg')} | "
                     f"{_ratio(c.ours, c.theirs, 'tg')} | {_bound(c.ours, c.theirs)} |")
    bw: dict[int, list[float]] = {}
    for c in cells:
        bw.setdefault(c.threads, []).extend(r["bandwidth"] for r in c.ours if r and r.get("bandwidth"))
    spans = {n: sorted({f"{min(v) / 1e9:.1f}", f"{max(v) / 1e9:.1f}"}, key=float) for n, v in bw.items() if v}
    parts = [f"{n} thread{'s' if n > 1 else ''} {'-'.join(span)} GB/s" for n, span in sorted(spans.items())]
    if parts:
        lines.append("")
        lines.append(f"Memory read bandwidth as `llamachat bench` measured it (a parallel sum over 1 GiB, each run): {', '.join(parts)}.")
    if start:
        lines.append("")
        shown = " ".join(f'"{a}"' if " " in a else a for a in START_FLAGS)
        lines.append(f"Start: `llamachat -m FILE {shown}`, seconds to the first token of the reply and to "
                     "the exit, with a fresh empty LLAMACHAT_HOME and NUMBA_CACHE_DIR, the three runs in this order "
                     "(the file itself already in the OS's page cache); CPU: the app's process (a helper it released "
                     "at its exit is not counted; background: when that helper ended, each run starting after it):")
        lines.append("")
        lines.append("| run | file | first token | exit | CPU | background | reply |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in start:
            def sec(v, missing="-"):
                return missing if v is None else f"{v:.1f} s"
            lines.append(f"| {r['what']} | {r['label']} | {sec(r.get('first'), 'failed' if r['wall'] is None else '-')} | "
                         f"{sec(r['wall'], 'failed')} | {sec(r['cpu'])} | {sec(r.get('background'))} | {r['reply'][:40]} |")
    lines.append("")
    lines.append(END_MARK)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the machine

def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def engine_isa(python: str) -> str:
    """The instruction set llamachat's kernels run with here (as the engine picks it)."""
    code = "from llamachat.runtime.quants.simd import host_isas; print(host_isas()[0])"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def ggml_features(llama_bench: str) -> str:
    """The instruction sets the llama-bench's ggml CPU library was built with (it says so itself)."""
    lib = Path(llama_bench).resolve().parent / "libggml-cpu.so"
    if not lib.exists():
        return "its ggml CPU features unknown (no libggml-cpu.so beside it)"
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); "
            "names = ['avx2', 'fma', 'f16c', 'avx512', 'avx512_vbmi', 'avx512_vnni', 'avx512_bf16', 'avx_vnni', 'amx_int8']; "
            "print(' '.join(n.upper() + '=' + str(getattr(lib, 'ggml_cpu_has_' + n)()) for n in names "
            "if hasattr(lib, 'ggml_cpu_has_' + n)))")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(lib)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "its ggml CPU features unknown"
    feats = out.stdout.split()
    if out.returncode != 0 or not feats:
        return "its ggml CPU features unknown"
    on = [f.split("=")[0] for f in feats if f.endswith("=1")]
    off = [f.split("=")[0] for f in feats if f.endswith("=0")]
    return f"ggml built with {', '.join(on) or 'none of them'}" + (f" (not {', '.join(off)})" if off else "")


def compiler_line(llama_bench: str) -> str:
    cli = Path(llama_bench).resolve().parent / "llama-cli"
    if not cli.exists():
        return ""
    try:
        out = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("built with"):
            return line.strip()
    return ""


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    doc = __doc__.splitlines()
    ap = argparse.ArgumentParser(description=doc[0], epilog="\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="append", metavar="FILE",
                    help="a small model file, measured at --small-pp / --small-tg (repeatable; files named with --small "
                         "or --large replace all the defaults: SmolLM2-135M Q4_1 from the library, Q4_0 Q8_0 Q4_K_M F16 "
                         "from /tmp/arith, Q5_K_M Q6_K from /tmp/s8/smol, and the --large ones)")
    ap.add_argument("--small-label", default="SmolLM2-135M")
    ap.add_argument("--small-pp", type=int, default=256)
    ap.add_argument("--small-tg", type=int, default=64)
    ap.add_argument("--small-reps", type=int, default=2)
    ap.add_argument("--large", action="append", metavar="FILE",
                    help="a large model file, measured at --large-pp / --large-tg (repeatable; default: "
                         "/tmp/s8/syn/synthetic-1b-{Q4_0,Q4_K_M,Q5_K_M,Q6_K,Q8_0}.gguf)")
    ap.add_argument("--large-label", default="1.1B")
    ap.add_argument("--large-pp", type=int, default=128)
    ap.add_argument("--large-tg", type=int, default=32)
    ap.add_argument("--large-reps", type=int, default=1)
    ap.add_argument("--reps", type=int, help="-r for every file (overrides --small-reps and --large-reps)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    ap.add_argument("--rounds", type=int, default=2, help="ours-then-theirs rounds per file and thread count (default 2)")
    ap.add_argument("--only", action="append", metavar="SUBSTRING",
                    help="measure only files whose path or label contains this (repeatable)")
    ap.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH", DEFAULT_LLAMA_BENCH),
                    help=f"llama.cpp's llama-bench (default: $LLAMA_BENCH or {DEFAULT_LLAMA_BENCH}; bench/build_llama_bench.sh builds one)")
    ap.add_argument("--isa", choices=("avx512vnni", "avx2", "portable"), default=None,
                    help="llamachat's kernels for this instruction set (`llamachat bench --isa`; default: the best "
                         "this CPU has); beside an llama-bench built for the same (build_llama_bench.sh DIR avx2)")
    ap.add_argument("--llamachat", default=None,
                    help="the llamachat command (default: the `llamachat` script beside this Python)")
    ap.add_argument("--start-model", default=DEFAULT_SMALL[0], help="the cold and warm start's file (default: the Q4_1 one)")
    ap.add_argument("--start-second", default="/tmp/arith/Q4_K_M.gguf",
                    help="the file started second, a new format's first use (default: SmolLM2 Q4_K_M)")
    ap.add_argument("--no-start", action="store_true", help="skip the cold and warm start measurement")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one run may take before it counts as failed (default 900)")
    ap.add_argument("--out", type=Path, help="also write the markdown block to this file")
    ap.add_argument("--dry-run", action="store_true", help="print the runs and the time estimate, run nothing")
    args = ap.parse_args(argv)

    for flag, value in (("--rounds", args.rounds), ("--small-reps", args.small_reps), ("--large-reps", args.large_reps),
                        ("--reps", args.reps if args.reps is not None else 1), ("--small-pp", args.small_pp),
                        ("--small-tg", args.small_tg), ("--large-pp", args.large_pp), ("--large-tg", args.large_tg),
                        *(("--threads", t) for t in args.threads)):
        if value < 1:
            print(f"error: {flag} must be at least 1, not {value}", file=sys.stderr)
            return 2
    exe = shutil.which(args.llama_bench) or args.llama_bench
    if not Path(exe).is_file() or not os.access(exe, os.X_OK):
        print(f"error: no llama-bench at {args.llama_bench}: build one with `bash bench/build_llama_bench.sh` "
              "and pass its path with --llama-bench", file=sys.stderr)
        return 2
    # the console script beside this Python (it sets the thread environment before numpy loads)
    script = Path(sys.executable).parent / "llamachat"
    llamachat = (args.llamachat.split() if args.llamachat else
                 [str(script)] if script.exists() else [sys.executable, "-m", "llamachat.tui.cli"])

    # files named on the command line replace both default lists
    named = bool(args.small or args.large)
    groups = [(args.small or ([] if named else DEFAULT_SMALL), args.small_label, args.small_pp, args.small_tg, args.small_reps),
              (args.large or ([] if named else DEFAULT_LARGE), args.large_label, args.large_pp, args.large_tg, args.large_reps)]
    wanted = [(Path(os.path.expanduser(f)), *rest) for files, *rest in groups for f in files]
    # a file --only leaves out may be missing (its label is not known then: matched by path)
    missing = [str(p) for p, *_ in wanted if not p.is_file() and (not args.only or any(x in str(p) for x in args.only))]
    wanted = [w for w in wanted if w[0].is_file()]
    start_files = [] if args.no_start else [Path(os.path.expanduser(args.start_model)), Path(os.path.expanduser(args.start_second))]
    missing += [str(p) for p in start_files if not p.is_file() and str(p) not in missing]
    if missing:
        print("error: missing model file(s): " + ", ".join(missing) + ". Make the SmolLM2 ones with "
              "`llamachat quantize /tmp/arith/f16.gguf OUT.gguf TYPE` and the 1.1B ones with "
              "`python bench/run_bench.py --synthetic 1b --cache /tmp/s8/syn`, or name other files with --small/--large "
              "(and --start-model/--start-second, or --no-start).", file=sys.stderr)
        return 2

    targets = []
    for path, group, pp, tg, reps in wanted:
        label, params = describe(path, group)
        if args.only and not any(s in str(path) or s in label for s in args.only):
            continue
        targets.append(Target(path, label, pp, tg, args.reps or reps, params))
    if not targets:
        print(f"error: no file matches --only {' '.join(args.only)}; the files are: "
              + ", ".join(str(p) for p, *_ in wanted), file=sys.stderr)
        return 2

    cells = [Cell(t, n) for t in targets for n in args.threads]
    per_cell = {id(c): sum(run_seconds(c.target, c.threads, tool) for tool in ("ours", "theirs")) for c in cells}
    estimate = args.rounds * sum(per_cell.values()) + (0 if args.no_start else START_SECONDS) + 5
    print(f"{len(cells)} file/thread cells × {args.rounds} rounds × 2 tools = {len(cells) * args.rounds * 2} runs"
          f"{'' if args.no_start else ' + 3 starts'}; estimated {estimate / 60:.1f} min on a quiet 2-core machine "
          "(more if numba's cache lacks these formats' kernels: their first run compiles them, outside the timed part)",
          file=sys.stderr, flush=True)
    if args.dry_run:
        for c in cells:
            print(f"{c.target.label}: {c.target.path}, -p {c.target.n_prompt} -n {c.target.n_gen} -r {c.target.reps} "
                  f"-t {c.threads}, about {args.rounds * per_cell[id(c)]:.0f} s", file=sys.stderr)
        return 0

    cpu, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else "")
    header = dict(cpu=cpu, cores=os.cpu_count(), flags=" ".join(flags) or "unknown",
                  isa=f"{args.isa} (--isa)" if args.isa else engine_isa(sys.executable), llama_bench=exe, build="unknown",
                  ggml=ggml_features(exe), load_start=load_average(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    compiler = compiler_line(exe)
    progress = Progress(estimate)
    env_theirs = llama_bench_env()
    start_rows = None
    try:
        for c in cells:
            t = c.target
            for rnd in range(1, args.rounds + 1):
                for tool in ("ours", "theirs"):
                    name = "llamachat bench" if tool == "ours" else "llama-bench"
                    progress.say(f"{t.label} -t {c.threads}, round {rnd}/{args.rounds}: {name}")
                    t0 = time.monotonic()
                    if tool == "ours":
                        res, why = run_tool(ours_cmd(llamachat, t, c.threads, args.isa), parse_ours, args.timeout)
                        c.ours.append(res)
                    else:
                        res, why = run_tool(theirs_cmd(exe, t, c.threads), parse_llama_bench, args.timeout, env_theirs)
                        c.theirs.append(res)
                        if res and res.get("build"):
                            header["build"] = res["build"]
                    progress.done_estimate += run_seconds(t, c.threads, tool)
                    if res is None:
                        print(f"  failed ({time.monotonic() - t0:.1f} s): {why}", file=sys.stderr, flush=True)
                    else:
                        figs = ", ".join(f"{k} {res[k]:.1f} t/s" for k in ("pp", "tg") if k in res)
                        if res.get("bound_percent") is not None:
                            figs += f", {res['bound_percent']:.0f}% of the memory bound"
                        print(f"  {figs} ({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
        if start_files:
            start_rows = measure_start(llamachat, start_files[0], start_files[1], args.timeout, progress)
            for r in start_rows:
                r["label"] = f"{describe(r['file'], '')[0].strip()} ({r['file'].name})"
    except KeyboardInterrupt:
        print("interrupted: the table below holds the runs done so far", file=sys.stderr)
    if compiler:
        header["build"] += f", {compiler}"
    header["load_end"] = load_average()
    header["duration"] = f"{progress.elapsed() / 60:.1f} min"
    block = render(cells, header, start_rows, args.rounds)
    print(block)
    if args.out:
        args.out.write_text(block)
        print(f"wrote {args.out}", file=sys.stderr)
    runs = [r for c in cells for r in c.ours + c.theirs]
    failed = sum(r is None for r in runs)
    if failed:
        print(f"{failed} of {len(runs)} runs failed (their cells say so; why: above)", file=sys.stderr)
    return 1 if runs and failed == len(runs) else 0


if __name__ == "__main__":
    sys.exit(main())
