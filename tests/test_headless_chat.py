"""Headless chat (`--no-tui` / piped stdin), run as the user runs it: a subprocess through the
CLI, with the scripted fake engine standing in for the model (the real-model runs are in
test_tui_real_model.py). Each stdin line is a turn, EOF ends, replies stream to stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llamachat.runtime.gguf.writer import write_gguf

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

RUNNER = f"""
import atexit, json, sys
sys.path.insert(0, {str(TESTS)!r})
from tui_fake_engine import FakeScript
from llamachat.tui import cli, headless_chat
script = FakeScript(replies=json.loads(sys.argv[1]))
real_run = headless_chat.run
headless_chat.run = lambda args: real_run(args, llama_factory=script.factory)
def report():
    sys.stderr.write("\\nCALLS=" + json.dumps(dict(calls=script.calls,
        textual=any(m == "textual" or m.startswith("textual.") for m in sys.modules),
        load=[i.load_kwargs for i in script.instances])) + "\\n")
atexit.register(report)
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, {"general.architecture": "llama"}, [("x", (32,), 0, np.zeros(32, np.float32))])
    return path


def run(replies, args, stdin: str):
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(replies), *args], input=stdin,
                          capture_output=True, text=True, timeout=120)
    err, _, calls = proc.stderr.rpartition("CALLS=")
    info = json.loads(calls) if calls else {}
    return proc.returncode, proc.stdout, err, info


def test_chat_mode_turns_and_eof(model):
    code, out, err, info = run(["Paris.\n\n\n", "Berlin."], ["-m", str(model), "--temp", "0", "--system", "Be terse."],
                               "Capital of France?\n\nCapital of Germany?\n")
    assert code == 0, err
    assert "Traceback" not in err
    assert out == "Paris.\nBerlin.\n"  # stdout is a pipe: replies only, no "> " prompts or echoed lines
    first, second = info["calls"]
    assert first["messages"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"}]
    assert second["messages"][-2:] == [{"role": "assistant", "content": "Paris.\n\n\n"}, {"role": "user", "content": "Capital of Germany?"}]
    assert first["temperature"] == 0.0
    assert not info["textual"]  # the headless path never imports the UI


def test_instruct_mode(model):
    code, out, err, info = run(["Jupiter.\n### Instruction: more"], ["-m", str(model), "--instruct", "--prompt-file", "alpaca", "-n", "64"],
                               "Name the largest planet in the solar system.\n")
    assert code == 0, err
    preamble = (ROOT / "prompts" / "alpaca.txt").read_text().removesuffix("\n")
    assert out.startswith(preamble + "\nJupiter.\n")
    (call,) = info["calls"]
    assert call["prompt"] == preamble + "\n\n### Instruction:\n\nName the largest planet in the solar system.\n\n### Response:\n\n"
    assert call["stop"] == ["### Instruction:"] and call["max_tokens"] == 64


def test_interactive_mode_transcript(model):
    code, out, err, info = run([" Bob: Hi. What can I do for you?\nUser: x", " Bob: Paris.\nUser:"],
                               ["-m", str(model), "-i", "-r", "User:", "-f", "chat-with-bob"],
                               "Hello.\nCapital of France?\n")
    assert code == 0, err
    bob = (ROOT / "prompts" / "chat-with-bob.txt").read_text().removesuffix("\n")
    assert out == bob + " Hello.\n Bob: Hi. What can I do for you?\nUser: Capital of France?\n Bob: Paris.\nUser:\n"
    assert info["calls"][1]["prompt"] == bob + " Hello.\n Bob: Hi. What can I do for you?\nUser: Capital of France?\n"
    assert info["calls"][1]["stop"] == ["User:"]


def test_color_marks_prompt_and_user_text(model):
    code, out, err, _ = run(["Bob: ok\nUser:"], ["-m", str(model), "-i", "-r", "User:", "-f", "chat-with-bob", "--color"], "Hi\n")
    assert code == 0, err
    assert out.startswith("\x1b[33mTranscript of a dialog")  # the prompt in yellow, as llama.cpp
    assert "\x1b[1m\x1b[32m Hi\n\x1b[0m" in out  # the user's text in bold green
    assert out.endswith("Bob: ok\nUser:\n")  # the model's text uncoloured


def test_eof_at_once_and_flag_settings(model):
    code, out, err, info = run([], ["-m", str(model), "-c", "128", "-s", "7", "--context-shift", "--keep", "5"], "")
    assert code == 0, err
    assert info["calls"] == []
    (load,) = info["load"]
    assert load["n_ctx"] == 128 and load["seed"] == 7 and load["context_shift"] is True and load["n_keep"] == 5


@pytest.mark.parametrize("args, message", [
    (["--instruct", "-f", "no-such-prompt"], "prompt file 'no-such-prompt' not found"),
    (["--temp", "-2"], "temp must be at least 0"),
    (["-l", "12x"], "--logit-bias '12x'"),
])
def test_user_errors_are_one_line(model, args, message):
    code, out, err, _ = run([], ["-m", str(model), *args], "hi\n")
    assert code == 2
    assert message in err and "Traceback" not in err


def test_missing_model_is_one_line(tmp_path):
    code, out, err, _ = run([], ["-m", str(tmp_path / "nope.gguf")], "hi\n")
    assert code == 2 and "nope.gguf: no such file" in err and "Traceback" not in err


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(model, tmp_path):
    import os
    import signal

    runner = RUNNER.replace("FakeScript(replies=json.loads(sys.argv[1]))", "FakeScript(replies=json.loads(sys.argv[1]), delay=0.02)")
    long = " ".join(f"w{i}" for i in range(2000))
    lines = tmp_path / "in.txt"
    lines.write_text("first\nsecond\n")
    # SIGINT back to its default in the child: a suite started in the background by a shell
    # without job control inherits it ignored, and Python then installs no KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-c", runner, json.dumps([long, "second reply"]), "-m", str(model)],
                            stdin=open(lines), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    while "w20 " not in seen:
        seen += proc.stdout.read(1)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    out = seen + out
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "did not finish" not in err
    first, rest = out.split("\n", 1)
    assert "w20" in first and "w1999" not in first  # stopped part-way, the text so far kept
    assert rest.startswith("second reply\n")
    calls = json.loads(err.rpartition("CALLS=")[2])["calls"]
    assert calls[1]["messages"][1]["content"].startswith("w0 w1")  # the partial reply stays in the chat


def test_interactive_mode_keeps_the_reverse_prompt_that_stopped_it(model):
    code, out, err, info = run(["Thought: I add.\nObservation: 4\nQuestion: next", "Final Answer: 4"],
                               ["-m", str(model), "-i", "-r", "Question:", "-r", "Observation:", "-f", "reason-act"],
                               "What is 2+2?\nok\n")
    assert code == 0, err
    assert info["calls"][0]["stop"] == ["Question:", "Observation:"]
    # the reply stopped at "Observation:", the second reverse prompt, and the transcript says so
    assert info["calls"][1]["prompt"].endswith("\nQuestion: What is 2+2?\nThought: I add.\nObservation: ok\n")


POLICY_RUNNER = RUNNER.replace(
    "real_run(args, llama_factory=script.factory)",
    "real_run(args, llama_factory=__import__('tui_support').templated_factory(script))")


def run_policy(replies, args, stdin: str):
    """As run(), with the fake engine's chat template, so the chat's tokens can be counted."""
    proc = subprocess.run([sys.executable, "-c", POLICY_RUNNER, json.dumps(replies), *args], input=stdin,
                          capture_output=True, text=True, timeout=120)
    err, _, calls = proc.stderr.rpartition("CALLS=")
    return proc.returncode, proc.stdout, err, json.loads(calls) if calls else {}


# n_ctx 96 at one token a word: a question of 21 words and its answer cut at 8 (-n 8) make a turn
# of about 31 tokens, so the fourth question (with room for 8 reply tokens) no longer fits
# beside the first three turns
WORDS = " ".join(f"w{i}" for i in range(20))
QUESTIONS = "".join(f"q{i} {WORDS}\n" for i in range(4))


def test_drop_oldest_policy_leaves_out_the_oldest_turns_and_says_so(model):
    code, out, err, info = run_policy([WORDS] * 4, ["-m", str(model), "-c", "96", "-n", "8", "--system", "Be brief.",
                                                    "--context-policy", "drop-oldest"], QUESTIONS)
    assert code == 0, err
    assert "Traceback" not in err and "more than the context size" not in err
    assert len(info["calls"]) == 4  # every question answered
    last = info["calls"][-1]["messages"]
    assert last[0] == {"role": "system", "content": "Be brief."}
    assert last[1]["content"].startswith("q") and not last[1]["content"].startswith("q0")
    assert last[-1]["content"].startswith("q3")
    assert "the chat outgrew the context (96 tokens)" in err and "memory now begins at 'q" in err
    assert info["load"][0]["context_shift"] is False


def test_ask_policy_with_piped_input_stops_with_one_sentence(model):
    code, out, err, info = run_policy([WORDS] * 4, ["-m", str(model), "-c", "96", "-n", "8", "--context-policy", "ask"],
                                      QUESTIONS)
    assert code != 0 and "Traceback" not in err
    assert len(info["calls"]) == 3  # the turns that fit were answered
    assert "context_policy is ask, which needs a terminal to ask: give --context-policy drop-oldest" in err
