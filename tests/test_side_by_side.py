"""bench/side_by_side.py reads both tools' output and writes the README's table: fed captured
output here (no model runs; milliseconds)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("side_by_side", Path(__file__).parents[1] / "bench" / "side_by_side.py")
sbs = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("side_by_side", sbs)  # dataclasses look their module up there
_spec.loader.exec_module(sbs)

# `llamachat bench -m Q4_0.gguf -p 256 -n 64 -t 2 -r 2 --json`, captured on the busy Xeon
OURS = """[
  {"model": "Smollm2 135M 8k Lc100K Mix1 Ep2", "model_path": "/tmp/arith/Q4_0.gguf", "model_size": 91726912,
   "model_type": "Q4_0", "test": "pp256", "n_tokens": 256, "tokens_per_second": 63.88, "stddev": 20.491,
   "samples": [49.39, 78.369], "threads": 2},
  {"model": "Smollm2 135M 8k Lc100K Mix1 Ep2", "model_path": "/tmp/arith/Q4_0.gguf", "model_size": 91726912,
   "model_type": "Q4_0", "test": "tg64", "n_tokens": 64, "tokens_per_second": 45.835, "stddev": 0.942,
   "samples": [46.501, 45.169], "threads": 2, "bandwidth_bytes_per_second": 8941514885,
   "weight_bytes_per_token": 89941248, "bound_percent": 46.1}
]
"""

# `llama-bench -m Q4_0.gguf -p 256 -n 64 -t 2 -r 2 -o json`, captured the same minute (fields trimmed)
THEIRS = """[
  {"build_commit": "unknown", "build_number": 0, "cpu_info": "Intel(R) Xeon(R) Processor", "backends": "CPU",
   "model_filename": "/tmp/arith/Q4_0.gguf", "model_type": "llama 256M Q4_0", "n_threads": 2,
   "n_prompt": 256, "n_gen": 0, "n_depth": 0, "avg_ns": 7101938641, "stddev_ns": 3863267091,
   "avg_ts": 42.305791, "stddev_ts": 23.013233, "samples_ns": [ 9833680998, 4370196285 ],
   "samples_ts": [ 26.033, 58.5786 ]},
  {"build_commit": "unknown", "build_number": 0, "cpu_info": "Intel(R) Xeon(R) Processor", "backends": "CPU",
   "model_filename": "/tmp/arith/Q4_0.gguf", "model_type": "llama 256M Q4_0", "n_threads": 2,
   "n_prompt": 0, "n_gen": 64, "n_depth": 0, "avg_ns": 10255025887, "stddev_ns": 3133608591,
   "avg_ts": 6.546470, "stddev_ts": 2.000392, "samples_ns": [ 12470821770, 8039230005 ],
   "samples_ts": [ 5.13198, 7.96096 ]}
]
"""


def test_parses_both_tools():
    ours = sbs.parse_ours("a warning printed first\n" + OURS)
    assert ours["pp"] == 63.88 and ours["tg"] == 45.835 and ours["type"] == "Q4_0"
    assert ours["bandwidth"] == 8941514885 and ours["weight_bytes"] == 89941248 and ours["bound_percent"] == 46.1
    theirs = sbs.parse_llama_bench(THEIRS)
    assert theirs["pp"] == 42.305791 and theirs["tg"] == 6.546470 and theirs["build"] == "unknown (0)"
    for parse in (sbs.parse_ours, sbs.parse_llama_bench):
        with pytest.raises(ValueError):
            parse("error: no such file\n")


def test_cpuinfo_flags():
    name, flags = sbs.parse_cpuinfo("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                                    "flags\t\t: fpu avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni amx_tile avx_vnni\n")
    assert name == "Intel(R) Xeon(R) Processor"
    assert flags == ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_tile"]


def test_table_rows_ratios_and_failed_runs(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"")
    t = sbs.Target(f, "SmolLM2-135M Q4_0", 256, 64, 2)
    ours, theirs = sbs.parse_ours(OURS), sbs.parse_llama_bench(THEIRS)
    good = sbs.Cell(t, 2, ours=[ours, dict(ours, pp=73.88)], theirs=[theirs, None])  # llama-bench's 2nd run failed
    failed = sbs.Cell(t, 1, ours=[None, None], theirs=[theirs, theirs])
    header = dict(date="d", duration="1 min", cpu="Xeon", cores=2, flags="avx2 avx512_vnni", isa="avx512vnni",
                  llama_bench="llama-bench", build="unknown (0)", ggml="ggml built with AVX2",
                  load_start="0.1 0.1 0.1", load_end="0.2 0.2 0.2")
    start = [dict(what="cold: empty numba cache", label="Q4_1 (x.gguf)", first=9.6, wall=10.4, cpu=9.9, background=16.0,
                  reply="The capital of France"),
             dict(what="warm", label="Q4_1 (x.gguf)", first=None, wall=None, cpu=None, background=None, reply="")]
    text = sbs.render([good, failed], header, start, rounds=2)
    lines = text.splitlines()
    assert lines[0] == sbs.START_MARK and lines[-1] == sbs.END_MARK
    row = next(line for line in lines if line.startswith("| SmolLM2-135M Q4_0 (pp256 / tg64) | 2 |")).split(" | ")
    # pp: rounds 63.9 and 73.9 against llama.cpp's one good round, 42.3: (63.88 + 73.88) / 2 / 42.31 = 1.63
    assert row[2:5] == ["63.9, 73.9", "42.3, failed", "1.63"]
    # tg: 45.8 / 6.5 = 7.00; bandwidth share 100 * 45.835 * 89941248 / 8941514885 = 46 (llama.cpp: 7)
    assert row[5:9] == ["45.8, 45.8", "6.5, failed", "7.00", "46 / 7 |"]
    row = next(line for line in lines if line.startswith("| SmolLM2-135M Q4_0 (pp256 / tg64) | 1 |")).split(" | ")
    assert row[2:5] == ["failed", "42.3, 42.3", "-"]
    assert "| cold: empty numba cache | Q4_1 (x.gguf) | 9.6 s | 10.4 s | 9.9 s | 16.0 s | The capital of France |" in lines
    assert "| warm | Q4_1 (x.gguf) | failed | failed | - | - |  |" in lines
    # behind llama.cpp: the ratio in bold
    slow = sbs.Cell(t, 2, ours=[dict(ours, pp=21.0)], theirs=[theirs])
    assert "| **0.50** |" in sbs.render([slow], header, None, rounds=1)
    level = sbs.Cell(t, 2, ours=[dict(ours, pp=42.2)], theirs=[theirs])  # 0.9975: shown as 1.00, not bold
    assert "| 1.00 |" in sbs.render([level], header, None, rounds=1)


def test_a_start_is_timed_to_its_first_output_and_its_exit():
    code = "import sys, time; time.sleep(0.3); print('answer', flush=True); time.sleep(0.5)"
    why, out, first, wall = sbs._run_timed([sys.executable, "-c", code], dict(os.environ), timeout=60)
    assert why == "" and out.strip() == "answer"
    assert 0.3 <= first < wall and wall >= 0.8
    why, *_ = sbs._run_timed([sys.executable, "-c", "import sys; sys.exit('no model')"], dict(os.environ), timeout=60)
    assert why.startswith("exit status 1") and "no model" in why
    assert all(isinstance(pid, int) for pid in sbs.helpers_running())
