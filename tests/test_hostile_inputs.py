"""Inputs that are not text or never end (issue 17, item 5): -f for a one-shot or interactive
prompt, `perplexity -f`, `tokenize -f` and `tokenize --stdin` given /dev/zero, /dev/urandom, a
FIFO, a directory, a multi-GB file or NUL bytes: refused promptly with one sentence."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llamachat.tui.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_model import N_VOCAB, tiny_metadata, write_tiny  # noqa: E402

VOCAB = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(N_VOCAB - 3)],
         "tokenizer.ggml.scores": np.zeros(N_VOCAB, np.float32)}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("m") / "tiny.gguf", metadata=tiny_metadata(**VOCAB))


def _inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    fifo = tmp / "fifo"
    os.mkfifo(fifo)  # nobody ever writes: opening it for reading would block for ever
    big = tmp / "big.txt"
    with open(big, "wb") as f:
        f.truncate(5 << 30)  # sparse: 5 GB long, nothing written
    nul = tmp / "nul.txt"
    nul.write_bytes(b"text\0more")
    return {
        "dev-zero": (Path("/dev/zero"), "/dev/zero is not a regular file (a device, FIFO or socket)"),
        "dev-urandom": (Path("/dev/urandom"), "/dev/urandom is not a regular file"),
        "fifo": (fifo, f"{fifo} is not a regular file"),
        "directory": (tmp, f"{tmp} is a directory, not a"),
        "5-GB": (big, f"{big} is 5368709120 bytes long, more than the"),
        "nul-bytes": (nul, f"{nul} holds a NUL byte at offset 4: it is not a text file"),
    }


COMMANDS = {
    "one-shot": lambda m, f: ["-m", str(m), "-f", str(f), "--no-tui"],
    "interactive": lambda m, f: ["-m", str(m), "-i", "-r", "User:", "-f", str(f), "--no-tui"],
    "instruct": lambda m, f: ["-m", str(m), "--instruct", "-f", str(f), "--no-tui"],
    "perplexity": lambda m, f: ["perplexity", "-m", str(m), "-f", str(f)],
    "tokenize": lambda m, f: ["tokenize", "-m", str(m), "-f", str(f)],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", ["dev-zero", "dev-urandom", "fifo", "directory", "5-GB", "nul-bytes"])
def test_inputs_that_are_not_text_are_refused_promptly(model, tmp_path, capsys, monkeypatch, command, kind):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    path, expected = _inputs(tmp_path)[kind]
    t0 = time.monotonic()
    code = main(COMMANDS[command](model, path))
    out, err = capsys.readouterr()
    assert time.monotonic() - t0 < 30
    assert code == 2 and out == ""
    assert err.startswith(f"llamachat: {expected}") and err.count("\n") == 1, err[:300]


def test_tokenize_stdin_is_read_with_a_bound(model):
    t0 = time.monotonic()
    done = subprocess.run(f"head -c 100000000 /dev/zero | {sys.executable} -m llamachat.tui.cli tokenize -m {model} --stdin",
                          shell=True, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 30
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"llamachat: standard input holds more than {64 << 20} bytes, more than llamachat reads as text\n"


def test_a_real_text_file_still_works(model, tmp_path, capsys):
    text = tmp_path / "ok.txt"
    text.write_text("t1 t2 t3\n")
    assert main(["tokenize", "-m", str(model), "-f", str(text), "--ids"]) == 0
    assert capsys.readouterr().out.startswith("[")
