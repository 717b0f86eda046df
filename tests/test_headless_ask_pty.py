"""Headless chat with context_policy "ask" on a terminal, as a person types at it: the real
SmolLM2 model in a subprocess whose stdin, stdout and stderr are a pseudo-terminal, with a
context so small that the second question no longer fits. The piped case (no one to ask: one
sentence and a non-zero exit) is in test_headless_chat.py.

The subprocess runs `cli.main` rather than the `llamachat` entry point, so numba's cache is the
one the rest of the suite fills (the entry point would move it under LLAMACHAT_HOME, and a cold
compile takes most of a minute); warm, the whole test takes a few seconds."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.real_model

RUNNER = "import sys; from llamachat.tui import cli; sys.exit(cli.main(sys.argv[1:]))"

# n_ctx 64 against questions of about 30 tokens (SmolLM2's tokenizer splits "w7" in two) and
# replies of at most 8: the first turn fits, the second question beside it does not
WORDS = " ".join(f"w{i}" for i in range(12))
QUESTION = "[d]rop the oldest turns, start a [n]ew chat with this message, or [c]ancel it? "
STEP_SECONDS = 120  # one step's limit: a cold numba cache compiles for a minute before the first "> "


class Terminal:
    """A child process on a pseudo-terminal: `type` what a person types, `expect` what it shows."""

    def __init__(self, args):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER, *args], stdin=slave, stdout=slave,
                                     stderr=slave, close_fds=True, start_new_session=True)
        os.close(slave)
        self.fd = master
        self.pending = ""

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, marker: str, timeout: float = STEP_SECONDS) -> str:
        """Everything shown up to and including `marker` (the next one; the rest is kept)."""
        deadline = time.monotonic() + timeout
        while marker not in self.pending:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"{marker!r} not shown within {timeout} s; the screen so far: {self.pending!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # the child ended and closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the chat ended before showing {marker!r}; the screen so far: {self.pending!r}")
            self.pending += chunk.decode(errors="replace").replace("\r\n", "\n")
        shown, _, self.pending = self.pending.partition(marker)
        return shown + marker

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """A failed step ends the child at once (it would wait for input for ever)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.fd)
        return False

    def wait(self) -> int:
        return self.proc.wait(timeout=STEP_SECONDS)


def test_ask_policy_on_a_terminal_asks_and_follows_the_answer(smollm2_path):
    with Terminal(["-m", str(smollm2_path), "--no-tui", "-c", "64", "-n", "8", "--temp", "0",
                   "--system", "Be brief.", "--context-policy", "ask"]) as term:
        term.expect("\n> ")
        term.type(f"q1 {WORDS}\n")
        first = term.expect("\n> ")
        assert QUESTION not in first and "llamachat:" not in first, first  # the first turn fits

        # the second question does not fit beside the first turn: the chat asks, on the terminal
        term.type(f"q2 {WORDS}\n")
        asked = term.expect(QUESTION)
        need = re.search(r"the chat no longer fits in the context \((\d+) of 64 tokens\)", asked)
        assert need and int(need.group(1)) > 64, asked
        term.type("x\n")  # not one of the choices: asked again
        term.expect(QUESTION)
        term.type("d\n")  # drop the oldest turns: the question goes, without the first turn
        dropped = term.expect("\n> ")
        assert ("llamachat: the chat outgrew the context (64 tokens): its 2 oldest messages are left out; "
                "the model's memory now begins at 'q2 w0 w1") in dropped, dropped
        reply = dropped.partition("'\n")[2].strip()
        assert reply and "llamachat:" not in reply, dropped  # answered, and the reply had its room

        # the third does not fit either: cancelled, it is not sent and the chat goes on
        term.type(f"q3 {WORDS}\n")
        term.expect(QUESTION)
        term.type("c\n")
        assert term.expect("\n> ") == "c\n\n> "  # the answer's echo, then the prompt: no reply, no notice

        # a new chat with this message: the earlier turns go, the message is answered
        term.type(f"q4 {WORDS}\n")
        term.expect(QUESTION)
        term.type("n\n")
        fresh = term.expect("\n> ")
        assert fresh.startswith("n\n") and fresh[2:].strip() and "llamachat:" not in fresh, fresh

        term.type("\x04")  # Ctrl-D: the end of the chat
        assert term.wait() == 0
