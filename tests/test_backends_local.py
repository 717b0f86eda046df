"""The typed seam (tui/backends.py) over the real engine: LocalBackend drives runtime's
Generator directly and must give what the Llama API gives for the same request, with typed
stats, the stop string that ended a reply, and cancel from another thread."""

from __future__ import annotations

import threading

import pytest

from llamachat.runtime import Llama
from llamachat.runtime.params import SamplingParams
from llamachat.tui.backends import (
    Finished,
    GenerationRequest,
    LlamaApiBackend,
    LocalBackend,
    TextPiece,
    backend_for,
    params_from_call,
    run_to_end,
)
from llamachat.tui.conversation import Conversation, Message, call_kwargs
from llamachat.tui.engine_worker import Engine

pytestmark = pytest.mark.real_model

QUESTION = ({"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"})
GREEDY = SamplingParams(temp=0.0)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    llm = Llama(str(smollm2_path), n_ctx=512)
    yield llm
    llm.close()


def test_local_backend_is_chosen_for_the_engine_and_matches_the_llama_api(llm):
    backend = backend_for(llm)
    assert type(backend) is LocalBackend
    llm.reset()
    want = llm.create_chat_completion(list(QUESTION), temperature=0.0, max_tokens=24)
    llm.reset()
    events = list(backend.stream(GenerationRequest(messages=QUESTION, params=GREEDY, n_predict=24)))
    assert all(isinstance(e, TextPiece) for e in events[:-1]) and isinstance(events[-1], Finished)
    text = "".join(e.text for e in events[:-1])
    assert text == want["choices"][0]["message"]["content"] and text
    stats = events[-1].stats
    assert stats.prompt_tokens == want["usage"]["prompt_tokens"]
    assert stats.completion_tokens == want["usage"]["completion_tokens"]
    assert stats.n_ctx == 512 and stats.n_past == backend.n_tokens() == llm.n_tokens
    assert stats.stop_reason in ("eos", "length")
    assert stats.tokens_per_second and stats.tokens_per_second > 0


def test_stop_text_is_the_string_that_ended_it(llm):
    backend = LocalBackend(llm)
    llm.reset()
    free: list[str] = []
    stats = run_to_end(backend, GenerationRequest(messages=QUESTION, params=GREEDY, n_predict=24), free.append)
    assert stats.stop_reason in ("eos", "length")
    word = "".join(free).split()[2]  # a word of the greedy reply; "zebra-zebra" is in none
    llm.reset()
    pieces: list[str] = []
    stats = run_to_end(backend, GenerationRequest(messages=QUESTION, params=GREEDY, n_predict=24,
                                                  stop=("zebra-zebra", word)), pieces.append)
    assert stats.stop_reason == "stop" and stats.stop_text == word
    assert "".join(free).startswith("".join(pieces)) and word not in "".join(pieces)


def test_count_tokens_is_what_the_request_fills(llm):
    """The context fitting (drop-oldest, ask) and the meter count a chat with count_tokens; it
    left out the assistant header the template adds for the reply (3 tokens for SmolLM2), so a
    chat fitted to leave n_predict free ran into a full context a few tokens into its reply
    (seen in a pty run of headless chat with -c 96 -n 8: "the context is full" after 4 tokens)."""
    backend = LocalBackend(llm)
    llm.reset()
    stats = run_to_end(backend, GenerationRequest(messages=QUESTION, params=GREEDY, n_predict=1), lambda text: None)
    assert backend.count_tokens(list(QUESTION), None) == stats.prompt_tokens
    assert backend.count_tokens([], None) == 0


def test_cancel_from_another_thread_keeps_the_text(llm):
    backend = LocalBackend(llm)
    llm.reset()
    pieces: list[str] = []

    def on_text(text):
        pieces.append(text)
        if len(pieces) == 3:
            threading.Thread(target=backend.cancel).start()

    stats = run_to_end(backend, GenerationRequest(prompt="Once upon a time", params=GREEDY, n_predict=200), on_text)
    assert stats.stop_reason == "cancelled"
    assert 3 <= stats.completion_tokens < 10  # within a token or two of the cancel
    assert len(pieces) >= 3


def test_a_fixed_seed_restarts_the_random_stream(llm):
    backend = LocalBackend(llm)
    params = SamplingParams(temp=1.0, seed=1234)

    def one():
        llm.reset()
        return "".join(e.text for e in backend.stream(GenerationRequest(prompt="The weather", params=params, n_predict=12,
                                                                        continue_stream=False))
                       if isinstance(e, TextPiece))

    assert one() == one()


GREEDY_SETTINGS = {"temp": 0.0, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "typical_p": 1.0, "repeat_penalty": 1.0,
                   "repeat_last_n": 64, "presence_penalty": 0.0, "frequency_penalty": 0.0, "mirostat": 0,
                   "mirostat_tau": 5.0, "mirostat_eta": 0.1}


def test_engine_uses_the_seam_and_still_reports_like_before(smollm2_path):
    engine = Engine()
    engine.load(smollm2_path, n_ctx=512)
    assert isinstance(engine.backend, LocalBackend)
    conv = Conversation(system_prompt="You are a helpful assistant.")
    conv.messages.append(Message("user", "What is the capital of France?"))
    settings = dict(GREEDY_SETTINGS, n_predict=24)
    shown: list[str] = []
    result = engine.generate(conv.request(), call_kwargs(settings), shown.append)
    assert result.error is None
    assert result.text and "".join(shown) == result.text
    assert result.n_ctx == 512 and result.n_tokens == result.stats["n_past"]
    assert result.tokens_per_second and result.stop_reason in ("eos", "length")
    engine.close()


def test_a_warm_start_runs_its_warm_up_after_the_load_unless_a_reply_comes_first(smollm2_path, monkeypatch):
    """The app's warm start: load(defer_warm=True) returns without evaluating anything when
    numba's cache holds the model's kernels; warm_up_later then runs the warm-up in a thread
    and leaves the KV cache empty, or does nothing once a reply has used the engine (that reply
    loaded the kernels, and its context must stay). A cold model still warms up inside load."""
    import llamachat.tui.compile_progress as compile_progress
    import llamachat.tui.engine_worker as engine_worker

    runs = []
    real_warm_up = engine_worker.warm_up
    monkeypatch.setattr(engine_worker, "warm_up", lambda llm, sizes=None: (runs.append(llm), real_warm_up(llm, sizes)))
    warm = [True]
    monkeypatch.setattr(compile_progress, "model_is_warm", lambda llm: warm[0])
    engine = Engine()
    greedy = call_kwargs(dict(GREEDY_SETTINGS, n_predict=4))
    request = Conversation(system_prompt="You are a helpful assistant.", messages=[Message("user", "Hi")]).request()
    try:
        engine.load(smollm2_path, n_ctx=256, defer_warm=True)
        assert runs == []
        thread = engine.warm_up_later()
        thread.join(60)
        assert runs == [engine.llm] and engine.n_tokens() == 0
        assert engine.warm_up_later() is None  # once

        engine.load(smollm2_path, n_ctx=256, defer_warm=True)
        assert len(runs) == 1
        result = engine.generate(request, greedy, lambda text: None)
        assert result.error is None and engine.n_tokens() > 0
        kept = engine.n_tokens()
        assert engine.warm_up_later() is None and engine.n_tokens() == kept and len(runs) == 1

        warm[0] = False  # a first run or a format's first use: the warm-up (its compiles) is part of the load
        engine.load(smollm2_path, n_ctx=256, defer_warm=True)
        assert runs[-1] is engine.llm and len(runs) == 2 and engine.warm_up_later() is None
    finally:
        engine.close()


def test_params_from_call_checks_values():
    from llamachat.runtime.errors import UserError

    assert params_from_call({"temperature": -1.0}).temp == 0.0
    assert params_from_call({"top_k": 5}, {3: -1.5}).logit_bias == ((3, -1.5),)
    with pytest.raises(UserError):
        params_from_call({"top_p": float("nan")})


def test_foreign_llama_shaped_objects_get_the_adapter():
    class Shaped:  # an object with the call API only (as llama-cpp-python's Llama from outside)
        def create_chat_completion(self, messages, **kw):
            yield {"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]}
            yield {"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]}
            yield {"choices": [{"delta": {}, "finish_reason": "length"}]}

    backend = backend_for(Shaped())
    assert type(backend) is LlamaApiBackend
    events = list(backend.stream(GenerationRequest(messages=({"role": "user", "content": "x"},), n_predict=1)))
    assert events[0] == TextPiece("Hi") and events[1].stats.stop_reason == "length"
