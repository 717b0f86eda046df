"""`llamachat -m MODEL (-p TEXT | -f FILE) ... --no-tui`: on the fake model through tui/cli.py's
main (flags, prompt files, settings merge, streaming, Ctrl-C), and on the real SmolLM2 file as a
subprocess, reproducing llama.cpp's greedy continuations exactly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from llamachat.runtime.generation import llama_api
from llamachat.tui.cli import main
from llamachat.tui.oneshot import process_escapes
from test_generate_fakes import BOS, EOS, FakeModel, FakeTokenizer


class Made:
    """What the fake Llama factory built, for the assertions."""
    model: FakeModel | None = None
    kwargs: dict = {}


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """`llama_api.Llama(path, ...)` builds a Llama over a fake model that says `text` after the
    prompt; returns (set_text, model file path, Made)."""
    state = {"text": "Hello world.", "interrupt_after": None}
    made = Made()
    real_llama = llama_api.Llama

    def factory(path, **kwargs):
        tok = FakeTokenizer()
        base = {"n": None}

        def rule(tokens):
            if base["n"] is None:
                base["n"] = len(tokens)
            k = len(tokens) - base["n"]
            data = state["text"].encode()
            return data[k] if 0 <= k < len(data) else EOS

        model = FakeModel(rule, n_ctx=kwargs.get("n_ctx", 2048))
        model.eval_real = model.eval

        def eval_(tokens, logits="last", cancel=None):
            if base["n"] is None:
                base["n"] = model.n_past + len(tokens)
            if state["interrupt_after"] is not None and model.n_past >= base["n"] + state["interrupt_after"]:
                raise KeyboardInterrupt
            return model.eval_real(tokens, logits, cancel)

        model.eval = eval_
        made.model, made.kwargs = model, kwargs
        options = {k: kwargs[k] for k in ("seed", "context_shift", "n_keep") if k in kwargs}
        return real_llama.from_model(model, tok, model_path=str(path), n_threads=kwargs.get("n_threads"), **options)

    monkeypatch.setattr(llama_api, "Llama", factory)
    path = tmp_path / "fake.gguf"
    from llamachat.runtime.gguf.writer import write_gguf

    write_gguf(path, {"general.architecture": "llama", "general.name": "fake"}, [])  # the library checks it
    return state, str(path), made


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_streams_only_the_generated_text(fake, capsys):
    state, path, made = fake
    code, out, err = cli(capsys, "-m", path, "-p", "Say hello:", "--temp", "0", "--no-tui")
    assert (code, out, err) == (0, "Hello world.", "")
    assert made.model.evals[0] == list(b"Say hello:")


def test_echo_prints_the_prompt_first(fake, capsys):
    _, path, _ = fake
    code, out, _ = cli(capsys, "-m", path, "-p", "Say hello:", "--temp", "0", "--echo", "--no-tui")
    assert out == "Say hello:Hello world."


def test_n_predict_and_special_tokens_and_escapes(fake, capsys):
    _, path, made = fake
    code, out, _ = cli(capsys, "-m", path, "-p", "<s>a\\nb</s>", "-n", "5", "--temp", "0", "--no-tui")
    assert out == "Hello"
    assert made.model.evals[0] == [BOS, ord("a"), ord("\n"), ord("b"), EOS]


def test_process_escapes_like_llama_cpp():
    assert process_escapes(r"a\nb\tc\\d\"e\'f") == "a\nb\tc\\d\"e'f"
    assert process_escapes(r"\x41\x4g\q") == "A\\x4g\\q"
    assert process_escapes("trailing\\") == "trailing\\"


def test_reverse_prompt_acts_as_a_stop_string(fake, capsys):
    state, path, _ = fake
    state["text"] = "Bob: fine.\nUser: and you?"
    code, out, err = cli(capsys, "-m", path, "-p", "x", "-r", "User:", "-r", "Nobody", "--temp", "0", "--verbose", "--no-tui")
    assert code == 0 and out == "Bob: fine.\n" and "stop reason: stop" in err


def test_prompt_file_path_shipped_name_and_bad_utf8(fake, capsys, tmp_path):
    _, path, made = fake
    f = tmp_path / "p.txt"
    f.write_text("From a file\n")
    assert cli(capsys, "-m", path, "-f", str(f), "-n", "1", "--no-tui")[0] == 0
    assert made.model.evals[0] == list(b"From a file")  # one trailing newline dropped
    from llamachat.prompts import find_prompt_file

    assert cli(capsys, "-m", path, "-f", "chat-with-bob", "-n", "1", "--no-tui")[0] == 0
    shipped = find_prompt_file("chat-with-bob").read_text().removesuffix("\n").encode()
    assert made.model.evals[0] == list(shipped)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok so far \xff\xfe")
    code, out, err = cli(capsys, "-m", path, "-f", str(bad), "--no-tui")
    assert code == 2 and out == "" and err.strip() == f"llamachat: {bad}: the prompt file is not valid UTF-8 (byte 0xff at offset 10)"
    code, _, err = cli(capsys, "-m", path, "-f", "no-such-prompt", "--no-tui")
    assert code == 2 and "no-such-prompt: no such prompt file" in err and "chat-with-bob" in err


@pytest.mark.parametrize("flags, named", [
    (["--top-p", "1.5"], "--top-p: top_p must be between 0 and 1, got 1.5"),
    (["-c", "0"], "-c/--ctx-size: n_ctx must be between 1 and"),
    (["-c", "-5"], "-c/--ctx-size"),
    (["-t", "0"], "-t/--threads: the number of threads must be at least 1, got 0"),
    (["-t", "-2"], "-t/--threads"),
    (["--temp", "-1"], "--temp: temp must be at least 0"),
    (["-n", "-7"], "-n/--n-predict"),
    (["--mirostat", "3"], "--mirostat: mirostat must be between 0 and 2"),
    (["--keep", "-3"], "--keep"),
    (["-l", "12x"], "--logit-bias '12x'"),
    (["-f", "x.txt"], "-p/--prompt and -f/--file both give the prompt"),
])
def test_bad_flag_values_are_one_sentence_and_exit_2(fake, capsys, flags, named):
    _, path, made = fake
    code, out, err = cli(capsys, "-m", path, "-p", "x", *flags, "--no-tui")
    assert code == 2 and out == ""
    assert err.startswith("llamachat: ") and named in err and len(err.strip().splitlines()) == 1
    assert made.model is None  # refused before loading anything


def test_logit_bias_flag(fake, capsys):
    state, path, _ = fake
    code, out, _ = cli(capsys, "-m", path, "-p", "x", "-n", "3", "--temp", "0", "-l", "72-inf", "-l", "90+100", "--no-tui")
    assert out == "ZZZ"
    code, out, err = cli(capsys, "-m", path, "-p", "x", "-l", "99999+1", "--no-tui")
    assert code == 2 and "--logit-bias: token id 99999 is outside the vocabulary (0..259)" in err


def test_ignore_eos_and_context_full(fake, capsys):
    state, path, _ = fake
    state["text"] = "ab"
    code, out, err = cli(capsys, "-m", path, "-p", "x", "--temp", "0", "--ignore-eos", "-c", "12", "--verbose", "--no-tui")
    assert code == 0 and out.startswith("ab") and "stop reason: context_full" in err
    # n_ctx - 1 = 11 tokens in the cache at the end: the prompt's and 10 generated (an 11th printed)
    assert re.search(r"eval time = +[\d.]+ ms / +10 runs", err)


def test_context_shift_flag(fake, capsys):
    state, path, made = fake
    state["text"] = "x" * 50
    code, out, err = cli(capsys, "-m", path, "-p", "abc", "--temp", "0", "-c", "16", "-n", "30",
                         "--context-shift", "--keep", "1", "--verbose", "--no-tui")
    assert out == "x" * 30 and "stop reason: length" in err
    assert made.model.shifts and made.model.shifts[0][0] == 1


def test_verbose_prints_llama_cpp_timing_lines(fake, capsys):
    _, path, _ = fake
    code, out, err = cli(capsys, "-m", path, "-p", "Say hello:", "--temp", "0", "--verbose", "--no-tui")
    assert out == "Hello world."
    assert re.search(r"llama_perf_sampler_print: +sampling time = +[\d.]+ ms / +13 runs", err)  # 12 + the EOS
    assert re.search(r"llama_perf_context_print: +load time = +[\d.]+ ms", err)
    assert re.search(r"prompt eval time = +[\d.]+ ms / +10 tokens \( *[\d.]+ ms per token, +[\d.]+ tokens per second\)", err)
    assert re.search(r"eval time = +[\d.]+ ms / +12 runs", err)
    assert "stop reason: eos" in err


def test_library_settings_under_flags(fake, capsys):
    _, path, made = fake
    from llamachat.model_store.library import Library

    Library.load().add(path, name="tiny", settings={"n_predict": 3, "temp": 0.0, "n_ctx": 64})
    code, out, _ = cli(capsys, "-m", "tiny", "-p", "x", "--no-tui")
    assert out == "Hel" and made.kwargs["n_ctx"] == 64
    code, out, _ = cli(capsys, "-m", "tiny", "-p", "x", "-n", "5", "-c", "128", "--no-tui")
    assert out == "Hello" and made.kwargs["n_ctx"] == 128
    code, out, err = cli(capsys, "-m", "nosuch", "-p", "x", "--no-tui")
    assert code == 2 and "tiny" in err


def test_ctrl_c_keeps_the_text_and_exits_130(fake, capsys):
    state, path, _ = fake
    state["interrupt_after"] = 4
    code, out, err = cli(capsys, "-m", path, "-p", "x", "--temp", "0", "--no-tui")
    assert code == 130 and out == "Hello" and "Traceback" not in err


# --- the real model -----------------------------------------------------------------------------


def _llamachat(*argv, timeout=300):
    exe = os.path.join(os.path.dirname(sys.executable), "llamachat")
    return subprocess.run([exe, *argv], capture_output=True, text=True, timeout=timeout)


def _greedy_cases():
    import json

    from conftest import REFERENCE_DIR

    ref = REFERENCE_DIR / "smollm2.json"
    cases = json.loads(ref.read_text())["greedy"] if ref.is_file() else []
    return [pytest.param(i, id=c["prompt"][:24]) for i, c in enumerate(cases)] or [pytest.param(0, id="no-reference")]


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("index", _greedy_cases())
def test_greedy_continuation_matches_llama_cpp(smollm2_path, reference, index):
    case = reference["greedy"][index]
    assert case["temp"] == 0
    r = _llamachat("-m", str(smollm2_path), "-p", case["prompt"], "-n", str(case["n_predict"]),
                   "--temp", "0", "--verbose", "--no-tui")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    got = r.stdout.rstrip()
    reason = re.search(r"stop reason: (\w+)", r.stderr).group(1)
    assert got == case["continuation"]
    assert reason == ("eos" if case["ended_with_eos"] else "length")


@pytest.mark.real_model
@pytest.mark.slow
def test_real_model_ctrl_c_exits_130_keeping_the_text(smollm2_path):
    exe = os.path.join(os.path.dirname(sys.executable), "llamachat")
    # SIGINT back to its default in the child (a suite started in the background by a shell
    # without job control inherits it ignored, and Python then installs no KeyboardInterrupt)
    proc = subprocess.Popen([exe, "-m", str(smollm2_path), "-p", "Once upon a time", "-n", "-1", "--ignore-eos",
                             "--temp", "0", "-c", "4096", "--no-tui"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.read(20)  # generation has started
    time.sleep(0.5)
    proc.send_signal(2)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert len(first + rest) > 20 and b"Traceback" not in err
