"""A good first answer (issue 18, goal 2): the catalog's defaults reach the library entry at
pull, where the user can see and change them; with them the default model answers the first
question a new user asks; a reply that loops is stopped and labelled."""

from __future__ import annotations

import io

import pytest
from tui_support import FakeScript, SIZE, make_app, make_library, ready, reply_done, send, views

from llamachat.model_store.catalog import SMOLLM2, SYSTEM_PROMPT
from llamachat.model_store.library import Library
from llamachat.tui import headless_chat
from llamachat.tui.cli import build_main_parser
from llamachat.tui.conversation import LOOP_NOTE
from llamachat.tui.engine_worker import LoopGuard


def test_pull_writes_the_catalog_defaults_into_the_library(smollm2_path):
    from llamachat.model_store.pull import pull

    entry = pull("smollm2")
    assert entry.settings["system_prompt"] == SYSTEM_PROMPT
    assert entry.settings["n_predict"] > 0  # a cap on one reply
    assert entry.settings == {k: v for k, v in SMOLLM2.defaults.items()}
    # they are the user's to change, in models.toml
    text = Library.load().file.read_text()
    assert f'system_prompt = "{SYSTEM_PROMPT}"' in text
    Library.load().set(entry.name, system_prompt="Answer in French.")
    assert Library.load().models[entry.name].settings["system_prompt"] == "Answer in French."


def test_the_pulled_defaults_reach_the_first_request(smollm2_path):
    """The first question goes out with the catalog's system prompt (not the one SmolLM2's
    template injects when there is none) and the reply cap."""
    from tui_fake_engine import FakeScript as Script

    from llamachat.model_store.pull import pull

    pull("smollm2")
    script = Script(replies=["The capital of France is Paris."])
    args = build_main_parser().parse_args(["--no-tui"])
    out = io.StringIO()
    assert headless_chat.run(args, llama_factory=script.factory, stdin=io.StringIO("What is the capital of France?\n"),
                             stdout=out, stderr=io.StringIO()) == 0
    (call,) = script.calls
    assert call["messages"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                {"role": "user", "content": "What is the capital of France?"}]
    assert call["max_tokens"] == SMOLLM2.defaults["n_predict"]
    assert call["temperature"] == SMOLLM2.defaults["temp"] and call["top_p"] == SMOLLM2.defaults["top_p"]


@pytest.mark.real_model
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_with_the_pulled_defaults_the_real_model_says_paris(smollm2_path, seed):
    """What a new user meets (issue 18, goal 2): the library's defaults, the real engine, the
    first question. Before the catalog's system prompt and one arithmetic for prompts and
    decode, this answered "L'Etoile, la Marseillaise, la femme, ..."."""
    from llamachat.model_store.pull import pull

    pull("smollm2")
    args = build_main_parser().parse_args(["--no-tui", "-s", str(seed)])
    out, err = io.StringIO(), io.StringIO()
    assert headless_chat.run(args, stdin=io.StringIO("What is the capital of France?\n"), stdout=out, stderr=err) == 0, err.getvalue()
    assert "Paris" in out.getvalue(), out.getvalue()


@pytest.mark.parametrize("text", [
    "Paris is lovely. " + "la femme, " * 25,
    "The answer is:\n" + "I am sorry, I cannot help with that.\n" * 8,
    "!" * 250,
    # a paragraph of 300 characters said three times (SmolLM2 on "Describe the history of France."):
    # the guard looked for stretches of at most 400 characters, said four times
    "France has a long history.\n\n" + (
        "The French Revolution, which began in 1789, was a pivotal moment in the history of France, as it "
        "was a struggle for democracy and the rights of the people. The French Revolution was a turning point "
        "for Europe, as it spread the ideas of liberty, equality and fraternity across the continent and beyond.\n\n") * 3
    + "The French Revolution, which began",
])
def test_loop_guard_sees_a_loop(text):
    assert LoopGuard.looping(text)
    guard = LoopGuard()
    assert any(guard.feed(text[i:i + 7]) for i in range(0, len(text), 7))


@pytest.mark.parametrize("text", [
    "| a | b | c |\n|---|---|---|\n| 1 | 2 | 3 |\n",
    "def f():\n" + "    x = 0\n" * 12 + "    return x\n",
    ", ".join(str(i) for i in range(200)),
    "=" * 80 + "\nTitle\n" + "=" * 80,
    "The capital of France is Paris. Paris is known for the Eiffel Tower, the Louvre and its cafés; "
    "Paris has been the capital since the tenth century, and Paris is also the largest city of France.",
    # a long sentence said twice is not yet a loop
    "In short: the French Revolution was a turning point for Europe, as it spread liberty and equality.\n" * 2,
    # an ordinary list whose lines are alike (a near-repeat measure would cut it)
    "Here are some fruits:\n" + "".join(f"{i}. {f}: {f}s are usually {c}, but they can also be green when unripe.\n"
                                        for i, (f, c) in enumerate([("Banana", "yellow"), ("Lemon", "yellow"), ("Orange", "orange"),
                                                                    ("Plum", "purple"), ("Tomato", "red"), ("Mango", "yellow")], 1)),
])
def test_loop_guard_leaves_ordinary_text_alone(text):
    assert not LoopGuard.looping(text)


async def test_a_looping_reply_is_stopped_and_labelled(tmp_path):
    make_library(tmp_path)
    looping = "Paris. " + "la femme, " * 300
    app, _ = make_app(["-n", "2000"], script=FakeScript(replies=[looping, "fine"], delay=0.001))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot, app)
        await send(pilot, app, "What is the capital of France?")
        await reply_done(pilot, app)
        msg = app.conv.messages[-1]
        assert msg.stopped and msg.note == LOOP_NOTE
        assert len(msg.content) < len(looping) // 2  # stopped early, not run to the end
        header = str(views(app, "assistant")[-1].query_one(".message-header").render())
        assert "stopped" in header and LOOP_NOTE in header
        # the chat goes on
        await send(pilot, app, "again")
        await reply_done(pilot, app)
        assert app.conv.messages[-1].content == "fine" and not app.conv.messages[-1].stopped


def test_pulling_again_adds_new_catalog_defaults_and_keeps_the_users(smollm2_path, capsys):
    from llamachat.model_store.pull import pull
    from llamachat.tui.cli import main

    entry = pull("smollm2")
    lib = Library.load()
    # a library from before the catalog had a system prompt and a reply cap, with the user's own temp
    lib.set(entry.name, system_prompt=None, n_predict=None, temp=0.7)
    assert main(["pull"]) == 0
    out = capsys.readouterr().out
    assert f"system_prompt='{SYSTEM_PROMPT}'" in out and "n_predict=512" in out
    settings = Library.load().models[entry.name].settings
    assert settings["system_prompt"] == SYSTEM_PROMPT and settings["n_predict"] == 512
    assert settings["temp"] == 0.7  # the user's value stays
    assert main(["pull"]) == 0
    assert capsys.readouterr().out.strip().endswith("is already pulled (" + str(entry.path) + ").")
