"""`llamachat bench` (runtime/bench.py): llama-bench's tests and output shapes on a tiny model."""

from __future__ import annotations

import json

import pytest

from llamachat.runtime.bench import bench
from llamachat.runtime.model import load_model
from llamachat.tui.cli import main

from test_model import write_tiny


def test_bench_runs_pp_and_tg(tmp_path):
    m = load_model(write_tiny(tmp_path / "tiny.gguf"), n_ctx=32, n_threads=1)
    seen = []
    results = bench(m, n_prompt=16, n_gen=4, reps=2, on_result=seen.append)
    assert [r.test for r in results] == ["pp16", "tg4"] and seen == results
    for r in results:
        assert len(r.samples) == 2 and all(s > 0 for s in r.samples)
        assert r.mean == pytest.approx(sum(r.samples) / 2) and r.stddev >= 0 and r.threads == 1
    assert m.n_past == 0
    assert [r.test for r in bench(m, n_prompt=0, n_gen=3, reps=1)] == ["tg3"]


def test_bench_json(tmp_path, capsys):
    path = write_tiny(tmp_path / "tiny.gguf")
    assert main(["bench", "-m", str(path), "-p", "8", "-n", "2", "-r", "2", "-t", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["test"] for r in rows] == ["pp8", "tg2"]
    for r in rows:
        assert {"model", "test", "tokens_per_second", "stddev", "threads"} <= set(r)
        assert r["threads"] == 1 and r["tokens_per_second"] > 0


def test_bench_table_and_errors(tmp_path, capsys):
    path = write_tiny(tmp_path / "tiny.gguf")
    assert main(["bench", "-m", str(path), "-p", "4", "-n", "0", "-r", "1"]) == 0
    out = capsys.readouterr().out
    assert "| model" in out and "pp4" in out and "tg" not in out.split("pp4")[1]
    assert main(["bench", "-m", str(path), "-p", "0", "-n", "0"]) == 2
    assert "nothing to measure" in capsys.readouterr().err
    assert main(["bench", "-m", str(path), "-r", "0"]) == 2
    assert main(["bench", "-m", str(tmp_path / "nope.gguf")]) == 2
