"""The real SmolLM2-135M-Instruct through the app and through the headless chat, checked against
what a wrong engine or a slip between the screen and the engine would not reproduce: llama.cpp's
own greedy continuation (../shared/reference), the context count in the status bar against the
tokenizer, and the real sampler's settings after they were typed into the sidebar."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tui_support import wait_for  # noqa: E402

from llamachat.runtime.generation import generate as generate_module  # noqa: E402
from llamachat.tui.app import ChatApp  # noqa: E402
from llamachat.tui.cli import build_main_parser  # noqa: E402
from llamachat.tui.conversation import resolve_model  # noqa: E402

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

LOAD = 600  # seconds: a first run compiles the kernels (numba), on a shared machine


def real_app(model_path, *argv) -> ChatApp:
    args = build_main_parser().parse_args(["-m", str(model_path), *argv])
    return ChatApp(args, entry=resolve_model(args.model))


async def type_into(pilot, field, text: str) -> None:
    """Replace a field's text with key presses, as a user does."""
    field.focus()
    await pilot.press("end", *["backspace"] * len(field.value), *text)


async def test_the_app_writes_llama_cpps_greedy_continuation(smollm2_path, reference):
    case = reference["greedy"][0]  # "The capital of France is", 32 tokens, no end of text before them
    assert case["n_predict"] == 32 and not case["ended_with_eos"]
    # interactive mode without a reverse prompt: the model continues the -p text at once
    app = real_app(smollm2_path, "-i", "-p", case["prompt"], "-n", "32", "--temp", "0")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: len(app.conv.messages) == 1 and not app.generating, "the reply", timeout=LOAD)
        reply = app.conv.messages[-1]
        assert reply.content.rstrip() == case["continuation"]  # the reference has trailing white space stripped
        assert not reply.stopped
        # the context holds the prompt and 31 of the 32 tokens (the last one is not evaluated)
        n_prompt = len(app.engine.llm.tokenize(case["prompt"].encode(), add_bos=True, special=True))
        assert n_prompt == 5
        assert f"ctx {n_prompt + 31}/2048" in app.status_text()
        await pilot.press("ctrl+q")
    assert app.return_code == 0


async def test_app_answers_with_the_real_model(smollm2_path):
    app = real_app(smollm2_path, "--temp", "0", "-n", "24")
    question = "What is the capital of France? Answer in one word."
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.engine.loaded and not app.loading and app.chat_screen.sidebar.built, "the model to load", timeout=LOAD)
        box = app.chat_screen.chat_input
        box.focus()
        box.text = question
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(app.conv.messages) == 2 and not app.generating, "the reply", timeout=LOAD)
        reply = app.conv.messages[-1]
        # the engine's greedy answer, pinned (the raw continuation above is llama.cpp's own)
        assert reply.content == "The capital of France is Paris." and not reply.stopped
        llm = app.engine.llm
        prompt = llm.chat_template.encode([{"role": "user", "content": question}], llm.tokenizer, add_generation_prompt=True)
        answer = llm.tokenize(reply.content.encode(), add_bos=False)
        assert len(answer) == 7 < 24  # it ended with the end-of-turn token, so every token was evaluated
        status = app.status_text()
        assert f"ctx {len(prompt) + len(answer)}/2048" in status and "Q4_1" in status
        stats = llm.generator.last_stats  # the app generates through the engine's generator (tui.backends)
        assert f"{stats.completion_tokens * 1000 / stats.eval_ms:.1f} tok/s" in status
        await pilot.press("ctrl+q")
    assert app.return_code == 0


async def test_every_sidebar_setting_reaches_the_real_sampler(smollm2_path, monkeypatch):
    """Each sampling setting typed into the sidebar is in the real Sampler the reply is drawn with
    (no fake in between: the app, engine_worker, the Llama API, the generator), n_predict ends
    the reply, the reply is the one the API gives for those settings, and n_ctx re-creates the
    context. n_ctx comes second: its reload would bring the typed seed in by itself."""
    samplers = []

    class RecordingSampler(generate_module.Sampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(self)

    monkeypatch.setattr(generate_module, "Sampler", RecordingSampler)
    typed = {"temp": "0.7", "top_k": "7", "top_p": "0.8", "min_p": "0.1", "repeat_penalty": "1.3",
             "repeat_last_n": "16", "n_predict": "6", "seed": "1234"}  # none is a default
    question = "Write a long story about a robot who learns to paint."
    app = real_app(smollm2_path)
    async with app.run_test(size=(110, 40)) as pilot:
        await wait_for(pilot, lambda: app.engine.loaded and not app.loading and app.chat_screen.sidebar.built, "the model to load", timeout=LOAD)
        sidebar = app.chat_screen.sidebar
        for name, text in typed.items():
            await type_into(pilot, sidebar.query_one(f"#setting-{name}"), text)
        await wait_for(pilot, lambda: all(str(app.settings[k]) == v for k, v in typed.items()), "the settings to apply")
        await send_and_wait(pilot, app, question)
        sampler = samplers[-1]
        p = sampler.params
        assert (p.temp, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.repeat_last_n) == (0.7, 7, 0.8, 0.1, 1.3, 16)
        assert sampler.penalties.last_n == 16 and sampler.penalties.repeat == pytest.approx(1.3)
        assert sampler.seed == 1234
        llm = app.engine.llm
        stats = llm.generator.last_stats  # the app generates through the engine's generator (tui.backends)
        assert stats.completion_tokens == 6 and stats.stop_reason == "length"
        reply = app.conv.messages[-1].content
        # the same settings through the API give the same text (a fresh stream from the seed). The
        # cache is emptied first, as the app's first reply found it: with the prompt in the cache
        # but its last token, the draw at temperature 0.7 differs from the third token on (a
        # prompt evaluated in one batch and in two do not give the same logits)
        llm.reset()
        direct = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0.7, top_k=7, top_p=0.8,
                                            min_p=0.1, repeat_penalty=1.3, repeat_last_n=16, max_tokens=6, seed=1234)
        assert direct["choices"][0]["message"]["content"] == reply

        await type_into(pilot, sidebar.query_one("#setting-n_ctx"), "1024")
        await wait_for(pilot, lambda: app.settings["n_ctx"] == 1024, "n_ctx to apply")
        await send_and_wait(pilot, app, "Go on.")
        llm = app.engine.llm
        stats = llm.generator.last_stats
        assert llm.n_ctx() == 1024 and stats.n_ctx == 1024 and len(app.conv.messages) == 4
        assert samplers[-1].params.top_k == 7 and stats.completion_tokens == 6
        await pilot.press("ctrl+q")


async def send_and_wait(pilot, app, text: str) -> None:
    n = len(app.conv.messages)
    box = app.chat_screen.chat_input
    box.focus()
    box.text = text
    await pilot.press("enter")
    await wait_for(pilot, lambda: len(app.conv.messages) == n + 2 and not app.generating and not app.loading,
                   f"the reply to {text!r}", timeout=LOAD)


def test_headless_instruct_with_the_real_model(smollm2_path, tmp_path):
    question = "Name the largest planet in the solar system."
    proc = subprocess.run(
        [sys.executable, "-m", "llamachat.tui.cli", "-m", str(smollm2_path), "--instruct", "--prompt-file", "alpaca.txt",
         "-n", "64", "--temp", "0", "--no-tui"],
        input=question + "\n", capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    # stdout is a pipe: the prompt file, then the reply (no "> " or echoed question)
    preamble = (Path(__file__).resolve().parents[1] / "prompts" / "alpaca.txt").read_text().removesuffix("\n")
    assert proc.stdout.startswith(preamble + "\n") and question not in proc.stdout
    reply = proc.stdout[len(preamble) + 1:]
    assert "Jupiter" in reply
    # the same Alpaca turn through the API, in this process: the headless chat sent that prompt,
    # with those settings, to the real engine
    from llamachat.prompts import find_prompt_file
    from llamachat.runtime import Llama

    preamble = Path(find_prompt_file("alpaca.txt")).read_text().removesuffix("\n")
    prompt = preamble + f"\n\n### Instruction:\n\n{question}\n\n### Response:\n\n"
    llm = Llama(str(smollm2_path), n_ctx=2048)
    expected = llm(prompt, max_tokens=64, temperature=0, stop=["### Instruction:"])["choices"][0]["text"]
    assert len(expected.split()) >= 3
    assert reply.strip() == expected.strip()


async def test_a_long_chat_with_the_real_model_drops_then_shifts(smollm2_path):
    """Past n_ctx with the real tokenizer and template: the oldest turns are left out so each
    request fits with room for the reply, the meter is the engine's own count; then with the
    shift policy (picked as the sidebar does) one long reply runs on past n_ctx."""
    from llamachat.runtime.params import check_setting

    app = real_app(smollm2_path, "--temp", "0", "-n", "24", "-c", "160", "--system", "Be brief.")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.engine.loaded and not app.loading and app.chat_screen.sidebar.built, "the model to load", timeout=LOAD)
        for i, topic in enumerate(("France", "Italy", "Spain", "Germany", "Norway", "Japan")):
            app.chat_screen.chat_input.focus()
            app.chat_screen.chat_input.text = f"Tell me one fact about {topic}, please."
            await pilot.press("enter")
            await wait_for(pilot, lambda: not app.generating and len(app.conv.messages) == 2 * (i + 1), "a reply", timeout=LOAD)
            assert app.conv.messages[-1].content.strip() and app.conv.messages[-1].note != "context full"
            assert app.ctx_used == app.engine.n_tokens() <= 160
            assert f"ctx {app.engine.n_tokens()}/160" in app.status_text()
        assert app.conv.memory_start > 0 and "oldest turns dropped" in app.status_text()
        sent = app.conv.request().messages
        assert sent[0] == {"role": "system", "content": "Be brief."}
        # shift: a reply of up to 300 tokens in a context of 160
        app.settings.update(n_predict=300, context_policy=check_setting("context_policy", "shift"))
        app.action_new_chat()
        # a long question (about 90 tokens) so that the reply reaches n_ctx well before it ends
        app.chat_screen.chat_input.text = ("Here is what I know: my cat Tom lives by the sea, naps in the sun all day, "
                                           "chases the gulls at dusk, and sleeps on the fishing nets of the harbour at "
                                           "night; the fishermen feed him sardines and call him the captain. " * 2
                                           + "Write a long story about Tom.")
        await pilot.press("enter")
        await wait_for(pilot, lambda: not app.generating and len(app.conv.messages) == 2, "the long reply", timeout=LOAD)
        stats = app.engine.llm.generator.last_stats
        assert stats.context_shifts > 0
        assert app.conv.messages[-1].note != "context full"
        assert app.ctx_used == app.engine.n_tokens() <= 160
        await pilot.press("ctrl+q")
