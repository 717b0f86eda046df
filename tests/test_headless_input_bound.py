"""Headless chat reads piped stdin a line at a time with a bound: an endless line (`cat
/dev/zero | llamachat --no-tui`) is refused in one sentence with a non-zero exit, instead of
growing memory until the machine gives out. Run through the CLI in a subprocess, stdin being
/dev/zero itself, with the tests' scripted stand-in for the engine."""

from __future__ import annotations

import subprocess
import sys

import pytest

from test_headless_chat import RUNNER, model  # noqa: F401 - the fixture

from llamachat.tui.headless_chat import MAX_LINE_CHARS


def test_endless_line_is_refused_in_one_sentence(model):  # noqa: F811
    with open("/dev/zero", "rb") as zero:
        proc = subprocess.run([sys.executable, "-c", RUNNER, '["never"]', "-m", str(model), "--no-tui"],
                              stdin=zero, capture_output=True, text=True, timeout=120)
    err = proc.stderr.rpartition("CALLS=")[0]
    assert proc.returncode != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"llamachat: a line of input is longer than {MAX_LINE_CHARS} characters, more than llamachat "
                     "takes as one message; split it, or give a long text with -f FILE"]
    assert proc.stdout == ""  # nothing was sent to the model


@pytest.mark.parametrize("extra", [0, -1])
def test_a_line_at_the_bound_is_a_turn(model, extra):  # noqa: F811
    line = "a" * (MAX_LINE_CHARS + extra)
    proc = subprocess.run([sys.executable, "-c", RUNNER, '["ok"]', "-m", str(model), "--no-tui", "-c", "4096"],
                          input=line + "\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout == "ok\n"
