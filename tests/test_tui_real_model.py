"""The real SmolLM2-135M-Instruct through the app and through the headless chat: a user's
question gets the answer (greedy, so the answer is fixed)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from llamachat.tui.app import ChatApp
from llamachat.tui.cli import build_main_parser
from llamachat.tui.conversation import resolve_model

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


async def _wait(pilot, condition, timeout):
    end = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await pilot.pause(0.2)


async def test_app_answers_with_the_real_model(smollm2_path):
    args = build_main_parser().parse_args(["-m", str(smollm2_path), "--temp", "0", "-n", "24"])
    app = ChatApp(args, entry=resolve_model(args.model))
    async with app.run_test(size=(100, 30)) as pilot:
        await _wait(pilot, lambda: app.engine.loaded and not app.loading, 300)
        box = app.chat_screen.chat_input
        box.focus()
        box.text = "What is the capital of France? Answer in one word."
        await pilot.press("enter")
        await _wait(pilot, lambda: len(app.conv.messages) == 2 and not app.generating, 600)
        reply = app.conv.messages[-1]
        assert "Paris" in reply.content and not reply.stopped
        assert "tok/s" in app.status_text() and f"/{2048}" in app.status_text()
        await pilot.press("ctrl+q")
    assert app.return_code == 0


def test_headless_instruct_with_the_real_model(smollm2_path, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llamachat.tui.cli", "-m", str(smollm2_path), "--instruct", "--prompt-file", "alpaca.txt",
         "-n", "64", "--temp", "0", "--no-tui"],
        input="Name the largest planet in the solar system.\n", capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # stdout is a pipe: the prompt file, then the reply (no "> " or echoed question)
    preamble = (Path(__file__).resolve().parents[1] / "prompts" / "alpaca.txt").read_text().removesuffix("\n")
    assert proc.stdout.startswith(preamble + "\n") and "Name the largest planet" not in proc.stdout
    reply = proc.stdout[len(preamble) + 1:]
    assert "Jupiter" in reply
