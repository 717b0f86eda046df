"""The Llama API: llama-cpp-python's call signatures and response shapes, on the fake model
(exact, fast) and on the real SmolLM2 file (the program from the llama.cpp world)."""

from __future__ import annotations

import inspect
import threading
import warnings

import pytest

from llamachat.runtime.errors import UserError
from llamachat.runtime.generation.llama_api import Llama
from test_generate_fakes import EOS, FakeChatTemplate, FakeModel, FakeTokenizer, continuing

PROMPT = "Q: say hi\nA:"


def fake_llama(text=" hi there# and more", prompt=PROMPT, **options):
    tok = FakeTokenizer()
    model = FakeModel(continuing(text, after=len(tok.encode(prompt))), n_ctx=256)
    return Llama.from_model(model, tok, model_path="fake.gguf", chat_template=FakeChatTemplate(), **options), model


def test_completion_dict_shape():
    llm, _ = fake_llama()
    out = llm(PROMPT, max_tokens=256, temperature=0.1, top_p=0.5, echo=False, stop=["#"])
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "fake.gguf"
    assert isinstance(out["created"], int)
    assert out["choices"] == [{"text": " hi there", "index": 0, "logprobs": None, "finish_reason": "stop"}]
    n_prompt = len(PROMPT)
    # the tokens of the stop string were generated, so they count (as in llama-cpp-python)
    assert out["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 10, "total_tokens": n_prompt + 10}
    assert llm.last_stats["stop_reason"] == "stop"


def test_finish_reasons_and_max_tokens():
    llm, _ = fake_llama()
    out = llm(PROMPT, max_tokens=3)
    assert out["choices"][0]["text"] == " hi" and out["choices"][0]["finish_reason"] == "length"
    for max_tokens in (None, 0, -1):  # until the end of generation
        out = llm(PROMPT, max_tokens=max_tokens)
        assert out["choices"][0]["text"] == " hi there# and more" and out["choices"][0]["finish_reason"] == "stop"
        assert llm.last_stats["stop_reason"] == "eos"
    assert llm(PROMPT, max_tokens=100, stop="and")["choices"][0]["text"] == " hi there# "


def test_stream_chunks_add_up_to_the_completion():
    llm, _ = fake_llama()
    chunks = list(llm(PROMPT, max_tokens=50, stream=True, stop=["#"]))
    assert all(c["object"] == "text_completion" and len(c["choices"]) == 1 for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == " hi there"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_echo():
    llm, _ = fake_llama()
    out = llm(PROMPT, max_tokens=3, echo=True)
    assert out["choices"][0]["text"] == PROMPT + " hi"
    chunks = list(llm(PROMPT, max_tokens=3, echo=True, stream=True))
    assert chunks[0]["choices"][0]["text"] == PROMPT
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT + " hi"


def test_token_list_prompt_and_llama_cpp_python_keywords_left_at_off():
    llm, _ = fake_llama()
    ids = llm.tokenize(PROMPT.encode())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # their "off" values change nothing, so nothing to warn about
        out = llm(ids, max_tokens=3, logprobs=None, tfs_z=1.0, grammar=None, suffix=None, stopping_criteria=None,
                  logits_processor=None)
    assert out["choices"][0]["text"] == " hi"


# llama-cpp-python 0.3.36's parameters, in order (llama_cpp/llama.py, Llama.create_completion,
# Llama.__call__ and Llama.create_chat_completion)
LLAMA_CPP_PYTHON_COMPLETION = [
    "prompt", "suffix", "max_tokens", "temperature", "top_p", "min_p", "typical_p", "logprobs", "echo", "stop",
    "frequency_penalty", "presence_penalty", "repeat_penalty", "top_k", "stream", "seed", "tfs_z", "mirostat_mode",
    "mirostat_tau", "mirostat_eta", "model", "stopping_criteria", "logits_processor", "grammar", "logit_bias"]
LLAMA_CPP_PYTHON_CHAT = [
    "messages", "functions", "function_call", "tools", "tool_choice", "temperature", "top_p", "top_k", "min_p",
    "typical_p", "stream", "stop", "seed", "response_format", "max_tokens", "presence_penalty", "frequency_penalty",
    "repeat_penalty", "tfs_z", "mirostat_mode", "mirostat_tau", "mirostat_eta", "model", "logits_processor",
    "grammar", "logit_bias", "logprobs", "top_logprobs"]


@pytest.mark.parametrize("method, expected", [
    ("create_completion", LLAMA_CPP_PYTHON_COMPLETION), ("__call__", LLAMA_CPP_PYTHON_COMPLETION),
    ("create_chat_completion", LLAMA_CPP_PYTHON_CHAT)])
def test_positional_parameters_are_llama_cpp_pythons_in_its_order(method, expected):
    params = list(inspect.signature(getattr(Llama, method)).parameters.values())[1:]  # without self
    positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == expected
    # llamachat's own additions come after them, by keyword only, and nothing is swallowed
    assert [p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD] == [
        "repeat_last_n", "ignore_eos"]


@pytest.mark.parametrize("call", [
    lambda llm: llm(PROMPT, max_tokens=3, repetition_penalty=1.3),
    lambda llm: llm.create_completion(PROMPT, max_tokens=3, repetition_penalty=1.3),
    lambda llm: llm.create_chat_completion([{"role": "user", "content": "hi"}], repetition_penalty=1.3),
], ids=["__call__", "create_completion", "create_chat_completion"])
def test_an_unknown_keyword_is_a_type_error_naming_it(call):
    llm, _ = fake_llama()
    with pytest.raises(TypeError, match=r"got an unexpected keyword argument 'repetition_penalty'$"):
        call(llm)
    assert llm(PROMPT, max_tokens=3)["choices"][0]["text"] == " hi"  # the model is not left locked


def test_unimplemented_llama_cpp_python_keywords_warn_once_naming_them():
    llm, _ = fake_llama()
    with pytest.warns(UserWarning) as caught:
        out = llm(PROMPT, max_tokens=3, grammar=object(), suffix="!")
    assert [str(w.message) for w in caught] == [
        "Llama.create_completion: llamachat does not implement suffix, grammar; they are ignored"]
    assert caught[0].filename == __file__  # it points at the caller's line
    assert out["choices"][0]["text"] == " hi"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm(PROMPT, max_tokens=3, grammar=object(), suffix="!")  # already said
    with pytest.raises(UserError, match="^logprobs is not supported for models created with logits_all=False$"):
        llm(PROMPT, max_tokens=3, logprobs=5)  # llama-cpp-python's refusal
    with pytest.warns(UserWarning, match=r"^Llama.create_completion: llamachat does not implement tfs_z; it is ignored$"):
        llm(PROMPT, max_tokens=3, tfs_z=0.9, grammar=object())  # only the new name
    with pytest.warns(UserWarning) as caught:
        llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1,
                                   tools=[{"type": "function"}], response_format={"type": "json_object"})
    assert [str(w.message) for w in caught] == [
        "Llama.create_chat_completion: llamachat does not implement tools, response_format; they are ignored"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=1, tools=[], tool_choice="auto",
                                   response_format={"type": "text"}, logprobs=False, functions=None)


def test_bad_values_are_one_sentence():
    llm, _ = fake_llama()
    with pytest.raises(UserError, match="top_p must be between 0 and 1"):
        llm(PROMPT, top_p=1.5)
    with pytest.raises(UserError, match="top_k"):
        llm(PROMPT, top_k=-3)
    with pytest.raises(UserError, match="logit_bias"):
        llm(PROMPT, logit_bias={"x": 1})
    with pytest.raises(UserError, match="more than the context size"):
        llm("x" * 300)
    # the lock is released after a refused call
    assert llm(PROMPT, max_tokens=1)["choices"][0]["text"] == " "


def test_logit_bias_and_negative_temperature():
    llm, _ = fake_llama()
    out = llm(PROMPT, max_tokens=1, temperature=-1, logit_bias={str(ord(" ")): -1000.0, ord("Z"): 100.0})
    assert out["choices"][0]["text"] == "Z"


def test_ignore_eos_runs_to_max_tokens():
    llm, _ = fake_llama(text="ab")
    out = llm(PROMPT, max_tokens=6, temperature=0, ignore_eos=True)
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 6


def test_chat_completion_shapes():
    tok = FakeTokenizer()
    tmpl = FakeChatTemplate()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    n = len(tmpl.encode(messages, tok))
    model = FakeModel(continuing("Hello!", after=n), n_ctx=256)
    llm = Llama.from_model(model, tok, model_path="fake.gguf", chat_template=tmpl)
    out = llm.create_chat_completion(messages)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!"},
                               "logprobs": None, "finish_reason": "stop"}]
    assert out["usage"]["prompt_tokens"] == n and out["usage"]["completion_tokens"] == 6
    chunks = list(llm.create_chat_completion(messages, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Hello!"
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat_turns_reuse_the_cache():
    tok = FakeTokenizer()
    tmpl = FakeChatTemplate()
    turn1 = [{"role": "user", "content": "Hi"}]
    n1 = len(tmpl.encode(turn1, tok))
    model = FakeModel(continuing("Hello!", after=n1), n_ctx=512)
    llm = Llama.from_model(model, tok, chat_template=tmpl)
    reply = llm.create_chat_completion(turn1)["choices"][0]["message"]["content"]
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "More"}]
    llm.create_chat_completion(turn2, max_tokens=1)
    st = llm.last_stats
    assert st["prompt_tokens"] == len(tmpl.encode(turn2, tok))
    assert st["prompt_eval_tokens"] < st["prompt_tokens"] - n1  # the first turn came from the cache
    assert llm.n_tokens == model.n_past


def test_cancel_from_another_thread():
    tok = FakeTokenizer()
    model = FakeModel(continuing("z" * 1000, after=2), n_ctx=2048, delay=0.002)
    llm = Llama.from_model(model, tok)
    threading.Timer(0.1, llm.cancel).start()
    out = llm("ab", max_tokens=-1)
    assert out["choices"][0]["finish_reason"] == "cancelled"
    assert 0 < out["usage"]["completion_tokens"] < 1000
    assert out["choices"][0]["text"] == "z" * out["usage"]["completion_tokens"]
    assert llm.last_stats["stop_reason"] == "cancelled"


def test_seeds():
    tok = FakeTokenizer()
    model = FakeModel(lambda tokens: EOS)
    model._noise[:] = 0
    opts = dict(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, ignore_eos=True)
    llm = Llama.from_model(model, tok, seed=7)
    a, b = (llm("a", **opts)["choices"][0]["text"] for _ in range(2))
    assert a != b  # llama.cpp seeds once: the second reply continues the stream, it is no replay
    again = Llama.from_model(model, tok, seed=7)
    assert [again("a", **opts)["choices"][0]["text"] for _ in range(2)] == [a, b]  # same seed, same texts
    assert llm("a", seed=7, **opts)["choices"][0]["text"] == a  # a call's own seed restarts the stream
    c = llm("a", seed=8, **opts)["choices"][0]["text"]
    assert c != a and llm.last_stats["seed"] == 8
    rnd = Llama.from_model(model, tok)  # seed -1: a fresh random seed per call
    assert len({rnd("a", **opts)["choices"][0]["text"] for _ in range(3)}) == 3


def test_tokenize_detokenize_and_small_things():
    llm, model = fake_llama()
    assert llm.tokenize(b"hi") == [104, 105] and llm.tokenize("hi") == [104, 105]
    assert llm.tokenize("<s>", special=True) == [256] and llm.tokenize("<s>") == list(b"<s>")
    assert llm.detokenize([104, 105]) == b"hi"
    assert llm.n_ctx() == 256
    llm(PROMPT, max_tokens=2)
    assert llm.n_tokens == model.n_past > 0
    llm.reset()
    assert llm.n_tokens == 0 == model.n_past
    assert set(llm.last_stats) >= {"prompt_tokens", "prompt_ms", "completion_tokens", "eval_ms", "stop_reason", "n_past", "n_ctx"}


# --- the real model ---------------------------------------------------------------------------------


@pytest.mark.real_model
def test_llama_cpp_python_program_runs_unchanged(smollm2_path):
    # the program from the issue, with only its import changed
    llm = Llama(model_path=str(smollm2_path), n_ctx=512, n_batch=126)
    prompt = "def fibonacci(n):"
    out = llm(prompt, max_tokens=256, temperature=0.1, top_p=0.5, echo=False, stop=["#"])
    text = out["choices"][0]["text"]
    assert isinstance(text, str) and text.strip() and "#" not in text
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    assert out["usage"]["completion_tokens"] > 0


@pytest.mark.real_model
def test_real_model_greedy_matches_llama_cpp_and_streams_the_same(smollm2_path, reference):
    llm = Llama(str(smollm2_path), n_ctx=512)
    case = reference["greedy"][0]
    out = llm(case["prompt"], max_tokens=case["n_predict"], temperature=0)
    assert out["choices"][0]["text"].rstrip() == case["continuation"]
    chunks = list(llm(case["prompt"], max_tokens=case["n_predict"], temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks).rstrip() == case["continuation"]
    assert llm.last_stats["prompt_eval_tokens"] == 1  # the same prompt again: all from the cache


@pytest.mark.real_model
def test_real_model_chat(smollm2_path):
    llm = Llama(str(smollm2_path), n_ctx=1024)
    out = llm.create_chat_completion([{"role": "user", "content": "Hi! Who are you?"}], max_tokens=100, temperature=0)
    text = out["choices"][0]["message"]["content"]
    # the template's default system prompt names the model; the reply ends at <|im_end|>, not shown
    assert "SmolLM" in text and "<|im" not in text and out["choices"][0]["finish_reason"] == "stop"
    first = llm.last_stats["prompt_tokens"]
    out = llm.create_chat_completion([{"role": "user", "content": "Hi! Who are you?"},
                                      {"role": "assistant", "content": text},
                                      {"role": "user", "content": "Thanks."}], max_tokens=4, temperature=0)
    # the second turn evaluates only what follows the first turn's cached tokens
    assert llm.last_stats["prompt_eval_tokens"] < llm.last_stats["prompt_tokens"] - first


@pytest.mark.real_model
def test_real_model_cancel_from_another_thread_and_context_shift(smollm2_path):
    llm = Llama(str(smollm2_path), n_ctx=64, context_shift=True, n_keep=-1)
    got = []
    cancelled_at = []
    for chunk in llm("Once upon a time", max_tokens=-1, temperature=0, ignore_eos=True, stream=True):
        got.append(chunk["choices"][0]["text"])
        if len(got) == 5:
            def cancel():
                cancelled_at.append(len(got))
                llm.cancel()
            threading.Timer(0.05, cancel).start()
        if len(got) > 1000:
            break
    assert chunk["choices"][0]["finish_reason"] == "cancelled" and llm.last_stats["stop_reason"] == "cancelled"
    assert len(got) - 1 <= cancelled_at[0] + 1  # the last chunk is the empty finishing one
    # a context of 64 with context_shift: 150 tokens come out, the cache shifting under them
    out = llm("Once upon a time", max_tokens=150, temperature=0, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 150 and out["choices"][0]["finish_reason"] == "length"
    assert llm.last_stats["context_shifts"] >= 2 and llm.n_tokens < 64


def test_a_dropped_or_abandoned_stream_frees_the_model():
    llm, _ = fake_llama()
    stream = llm(PROMPT, max_tokens=50, stream=True)
    del stream  # never read
    assert llm(PROMPT, max_tokens=3)["choices"][0]["text"] == " hi"
    first = llm(PROMPT, max_tokens=50, stream=True)
    assert next(first)["choices"][0]["text"] == " "
    # a second call in the same thread ends the first stream instead of waiting for it forever
    assert llm(PROMPT, max_tokens=3)["choices"][0]["text"] == " hi"
    rest = list(first)  # what is left of the first stream: its finishing chunk, cancelled
    assert [c["choices"][0]["finish_reason"] for c in rest] == ["cancelled"] and rest[0]["choices"][0]["text"] == ""
    done = threading.Event()

    def other_thread():
        llm(PROMPT, max_tokens=2)
        done.set()

    held = llm(PROMPT, max_tokens=50, stream=True)
    next(held)
    t = threading.Thread(target=other_thread, daemon=True)
    t.start()
    assert not done.wait(0.2)  # another thread waits for the model...
    held.close()
    assert done.wait(5)  # ...and gets it when the stream is closed
    t.join()
    unread = llm(PROMPT, max_tokens=50, stream=True)
    del unread  # dropped unread: another thread is not kept waiting either
    done.clear()
    t = threading.Thread(target=other_thread, daemon=True)
    t.start()
    assert done.wait(5)
