"""`llamachat bench` (runtime/generation/bench.py): llama-bench's tests and output shapes on a tiny model."""

from __future__ import annotations

import json
import time

import pytest

from llamachat.runtime.generation.bench import bench
from llamachat.runtime.model.model import load_model
from llamachat.tui.cli import main

from test_model import write_tiny


class Recorder:
    """Wraps a model's eval and truncate: every eval's token count and the time it took, by a
    clock read around the call here, split into runs at each truncate(0) (each bench run
    starts from an empty cache)."""

    def __init__(self, model):
        self.runs: list[list[tuple[int, float]]] = []
        real_eval, real_truncate = model.eval, model.truncate

        def eval_(tokens, *args, **kwargs):
            t0 = time.perf_counter()
            out = real_eval(tokens, *args, **kwargs)
            self.runs[-1].append((len(tokens), time.perf_counter() - t0))
            return out

        def truncate(n):
            if n == 0:
                self.runs.append([])
            return real_truncate(n)

        model.eval, model.truncate = eval_, truncate


def test_bench_counts_and_times_what_it_ran(tmp_path):
    """Each sample is the tokens a run evaluated over the time those evals took: the count and
    the time are checked against a recorder around the model's own calls."""
    m = load_model(write_tiny(tmp_path / "tiny.gguf"), n_ctx=32, n_threads=1)
    rec = Recorder(m)
    seen = []
    t0 = time.perf_counter()
    results = bench(m, n_prompt=16, n_gen=4, reps=2, on_result=seen.append)
    wall = time.perf_counter() - t0
    assert [r.test for r in results] == ["pp16", "tg4"] and seen == results
    assert [r.n_tokens for r in results] == [16, 4] and all(r.threads == 1 for r in results)
    # runs: pp warm-up, 2 pp reps, tg warm-up, 2 tg reps, then the final reset (no evals)
    assert len(rec.runs) == 7 and rec.runs[-1] == []
    pp_runs, tg_runs = rec.runs[1:3], rec.runs[4:6]
    assert all([n for n, _ in run] == [16] for run in pp_runs)  # one batch of 16
    assert all([n for n, _ in run] == [1] * 4 for run in tg_runs)  # 4 single-token decodes
    for res, runs in ((results[0], pp_runs), (results[1], tg_runs)):
        assert len(res.samples) == 2
        for tokens_per_s, run in zip(res.samples, runs):
            elapsed = res.n_tokens / tokens_per_s  # the time bench measured for this run
            in_evals = sum(dt for _, dt in run)
            # bench's clock brackets the evals: never less than their time, and the only extra
            # is its loop (a few microseconds a token; 10% + 0.1 s allows for a busy machine
            # pre-empting the process between two calls)
            assert in_evals * (1 - 1e-6) <= elapsed <= in_evals * 1.1 + 0.1, (res.test, elapsed, in_evals)
        assert res.mean == pytest.approx(sum(res.samples) / 2)
        assert res.stddev == pytest.approx(abs(res.samples[0] - res.samples[1]) / 2 ** 0.5)
    assert sum(r.n_tokens / s for r in results for s in r.samples) <= wall
    assert m.n_past == 0
    assert [r.test for r in bench(m, n_prompt=0, n_gen=3, reps=1)] == ["tg3"]


def test_bench_json(tmp_path, capsys, monkeypatch):
    """The printed figures are bench()'s results (mean and stddev of its samples)."""
    from llamachat.runtime.generation import bench as bench_module

    made = []

    def recording_bench(*args, **kwargs):
        made.extend(bench(*args, **kwargs))
        return made

    monkeypatch.setattr(bench_module, "bench", recording_bench)
    path = write_tiny(tmp_path / "tiny.gguf")
    assert main(["bench", "-m", str(path), "-p", "8", "-n", "2", "-r", "2", "-t", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["test"] for r in rows] == ["pp8", "tg2"] == [r.test for r in made]
    for r, res in zip(rows, made):
        assert {"model", "test", "tokens_per_second", "stddev", "threads"} <= set(r)
        assert r["threads"] == 1 and len(res.samples) == 2
        # (printed to 3 decimals)
        assert r["tokens_per_second"] == pytest.approx(res.mean, abs=5e-4)
        assert r["stddev"] == pytest.approx(res.stddev, abs=5e-4)
        assert r["samples"] == pytest.approx(res.samples, abs=5e-4)


def test_bench_table_and_errors(tmp_path, capsys):
    path = write_tiny(tmp_path / "tiny.gguf")
    assert main(["bench", "-m", str(path), "-p", "4", "-n", "0", "-r", "1"]) == 0
    out = capsys.readouterr().out
    assert "| model" in out and "pp4" in out and "tg" not in out.split("pp4")[1]
    assert main(["bench", "-m", str(path), "-p", "0", "-n", "0"]) == 2
    assert "nothing to measure" in capsys.readouterr().err
    assert main(["bench", "-m", str(path), "-r", "0"]) == 2
    assert main(["bench", "-m", str(tmp_path / "nope.gguf")]) == 2


def test_weight_bytes_per_token_reads_one_embedding_row(tmp_path):
    """Every weight is read once a token, of the token embedding one row; a tied embedding is
    also the output matrix and read whole."""
    from llamachat.runtime.generation.bench import weight_bytes_per_token

    m = load_model(write_tiny(tmp_path / "tiny.gguf"), n_ctx=32, n_threads=1)
    tensors = m.gguf.tensors
    embd = tensors["token_embd.weight"]
    whole = sum(t.nbytes for t in tensors.values())
    expected = whole - embd.nbytes + embd.row_nbytes if "output.weight" in tensors else whole
    assert weight_bytes_per_token(m.gguf) == expected

    class Tied:
        tensors = {k: v for k, v in m.gguf.tensors.items() if k != "output.weight"}

    assert weight_bytes_per_token(Tied) == sum(t.nbytes for t in Tied.tensors.values())


def test_bench_reports_bandwidth_and_the_share_of_the_bound(tmp_path, capsys, monkeypatch):
    from llamachat.runtime.generation import bench as bench_module

    monkeypatch.setattr(bench_module, "BANDWIDTH_BYTES", 64 << 20)  # 64 MiB: the test stays short
    path = write_tiny(tmp_path / "tiny.gguf")
    assert main(["bench", "-m", str(path), "-p", "4", "-n", "4", "-r", "1", "-t", "1", "--json"]) == 0
    pp, tg = json.loads(capsys.readouterr().out)
    assert "bound_percent" not in pp
    bw, per_token = tg["bandwidth_bytes_per_second"], tg["weight_bytes_per_token"]
    # any machine reads memory faster than 100 MB/s and slower than 10 TB/s
    assert 1e8 < bw < 1e13
    # (printed to one decimal, from the unrounded rate)
    assert tg["bound_percent"] == pytest.approx(100 * tg["tokens_per_second"] * per_token / bw, abs=0.051)
    assert main(["bench", "-m", str(path), "-p", "0", "-n", "4", "-r", "1", "-t", "1"]) == 0
    out = capsys.readouterr().out
    assert "tg4: " in out and "GB/s (1 thread, measured now)" in out and "% reached" in out
