"""`llamachat serve` against the real model: the `openai` client and raw HTTP, loopback only.

One server per module (the model loads once), started in a thread on a free port of
127.0.0.1 and stopped at the end (or by a timer, whatever happens). Replies are checked
against the engine itself: a greedy reply must be the one `Llama.create_chat_completion` gives
for the same conversation, usage must count the tokens the chat template makes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from llamachat.model_store.library import Library
from llamachat.runtime import Llama
from llamachat.tui import cli
from llamachat.tui.commands import serve as serve_command
from llamachat.tui.server.app import bind_socket, create_app, make_server, url_of
from llamachat.tui.server.host import ModelHost, ServedModel

N_CTX = 512
SERVER_LIFETIME = 900  # seconds: a server a failed test leaves behind stops by itself
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PIRATE = "You are a pirate. Answer like one."


class RunningServer:
    """uvicorn in a thread on 127.0.0.1:<free port>, with a bounded lifetime."""

    def __init__(self, host: ModelHost, **app_options):
        self.host = host
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = make_server(create_app(host, **app_options), host)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.timer = threading.Timer(SERVER_LIFETIME, self.stop)
        self.timer.daemon = True

    def start(self) -> "RunningServer":
        self.thread.start()
        self.timer.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start within 30 s"
            assert self.thread.is_alive(), "the server thread died while starting"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.timer.cancel()
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def library_file(tmp_path_factory, smollm2_path):
    """A library with the model under two names; the second has a system prompt (a hard link,
    since a library refuses the same file twice)."""
    home = tmp_path_factory.mktemp("serve-home")
    second = home / "pirate.gguf"
    try:
        os.link(smollm2_path, second)
    except OSError:
        shutil.copyfile(smollm2_path, second)
    file = home / "models.toml"
    library = Library.load(file)
    library.add(smollm2_path, name="smol")
    library.add(second, name="smol-pirate", settings={"system_prompt": PIRATE})
    return file


@pytest.fixture(scope="module")
def host(smollm2_path, library_file):
    host = ModelHost(ServedModel("smol", smollm2_path, {}), argparse.Namespace(n_ctx=N_CTX), library_file, queue_size=4)
    host.start()
    yield host
    host.close()


@pytest.fixture(scope="module")
def server(host):
    running = RunningServer(host).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def keyed_server(host):
    """A second front end on the same engine, with an API key."""
    running = RunningServer(host, api_key="s3cret-key").start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def engine(smollm2_path):
    """The engine itself, for the replies the server must match."""
    llm = Llama(str(smollm2_path), n_ctx=N_CTX)
    yield llm
    llm.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


# Comparisons start both sides from the same cache state: batches of 64+ tokens take ggml's
# tiled attention, as llama.cpp does, so a reply to a long prompt can depend on how much of it
# was cached (everything shorter is batch-invariant: tests/test_batch_invariance.py).


def fresh(host: ModelHost) -> None:
    """Empty the server's KV cache, once the worker is idle (it tidies up after the answer)."""
    wait_for(lambda: host.waiting == 0 and host._current is None, 10, "the worker becoming idle")
    host.llm.reset()


def greedy_chat(engine, messages, max_tokens, cached=False):
    """The engine's greedy reply from an empty cache, or (cached) with the prompt already in it,
    as a server has it when the same conversation is asked again."""
    engine.reset()
    if cached:
        engine.create_chat_completion(messages, temperature=0.0, max_tokens=1)
    out = engine.create_chat_completion(messages, temperature=0.0, max_tokens=max_tokens)
    return out["choices"][0]["message"]["content"], out["usage"]


def check_error(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


pytestmark = pytest.mark.real_model


# -- the openai client -------------------------------------------------------------------------


def test_models_lists_the_library_with_the_resident_model_first(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] in ("smol", "smol-pirate") and sorted(ids) == ["smol", "smol-pirate"]
    assert client.models.retrieve("smol").id == "smol"


def test_greedy_chat_is_the_engines_reply_and_usage_counts_the_templates_tokens(client, engine, host):
    fresh(host)
    reply = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=24)
    expected, usage = greedy_chat(engine, QUESTION, 24)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(engine.chat_template.encode(QUESTION, engine.tokenizer))
    assert reply.usage.completion_tokens == usage["completion_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason == ("length" if usage["completion_tokens"] == 24 else "stop")
    assert reply.model == "smol"


def test_streamed_chat_is_the_same_reply_in_pieces(client, engine, host):
    fresh(host)
    stream = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    expected, usage = greedy_chat(engine, QUESTION, 24)
    assert "".join(pieces) == expected
    assert len([p for p in pieces if p]) > 1  # really streamed
    assert finishes == ["length" if usage["completion_tokens"] == 24 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage["completion_tokens"]


def test_completions_text_token_ids_echo_and_stream(client, engine, host):
    prompt = "Once upon a time"
    engine.reset()
    expected = engine(prompt, temperature=0.0, max_tokens=12)["choices"][0]["text"]
    fresh(host)
    out = client.completions.create(model="smol", prompt=prompt, temperature=0, max_tokens=12)
    assert out.choices[0].text == expected
    assert out.usage.prompt_tokens == len(engine.tokenize(prompt.encode()))
    tokens = engine.tokenize(prompt.encode())
    fresh(host)
    assert client.completions.create(model="smol", prompt=tokens, temperature=0, max_tokens=12).choices[0].text == expected
    fresh(host)
    echoed = client.completions.create(model="smol", prompt=prompt, temperature=0, max_tokens=12, echo=True)
    assert echoed.choices[0].text == prompt + expected
    fresh(host)
    streamed = client.completions.create(model="smol", prompt=prompt, temperature=0, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    default = client.completions.create(model="smol", prompt=prompt, temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_stop_strings_end_the_reply_before_them(client, engine, host):
    expected, _ = greedy_chat(engine, QUESTION, 24)
    words = expected.split()
    assert len(words) >= 4, expected
    stop = words[2]
    fresh(host)
    reply = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=24, stop=[stop, "@@@"])
    assert reply.choices[0].message.content == expected[:expected.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_a_seed_gives_the_same_sampled_reply_again(client, host):
    def sample(seed):
        return client.chat.completions.create(model="smol", messages=QUESTION, temperature=1.0, top_p=1.0,
                                              max_tokens=20, seed=seed).choices[0].message.content

    sample(7)  # from here on every request finds the same prompt in the cache
    first = sample(1234)
    assert sample(1234) == first
    # the seed is really used: other seeds give other replies (20 tokens at temperature 1)
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_the_next_turn_of_a_chat_reuses_the_cached_prompt(client):
    first = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=16)
    turn = QUESTION + [{"role": "assistant", "content": first.choices[0].message.content},
                       {"role": "user", "content": "And of Italy?"}]
    second = client.chat.completions.create(model="smol", messages=turn, temperature=0, max_tokens=8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens
    assert cached < second.usage.prompt_tokens


def test_a_request_may_name_another_library_model_which_then_gets_loaded(client, engine, host):
    reply = client.chat.completions.create(model="smol-pirate", messages=QUESTION, temperature=0, max_tokens=16)
    assert reply.model == "smol-pirate"
    assert host.model.name == "smol-pirate"
    assert [m.id for m in client.models.list().data][0] == "smol-pirate"
    # its library system prompt is sent as the app sends it
    expected, _ = greedy_chat(engine, [{"role": "system", "content": PIRATE}] + QUESTION, 16)
    assert reply.choices[0].message.content == expected
    fresh(host)
    back = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=16)
    assert back.choices[0].message.content == greedy_chat(engine, QUESTION, 16)[0]


def test_the_openai_client_sees_errors_as_its_exceptions(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert "smol" in str(caught.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smol", messages=QUESTION, temperature=-1)


# -- raw HTTP: every mistake is a 4xx in OpenAI's shape -------------------------------------------


def post(server, path, body, **kwargs):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60, **kwargs)


def chat_body(**fields):
    return {"model": "smol", "messages": QUESTION, "max_tokens": 4, **fields}


def test_llama_cpps_extra_fields_and_harmless_openai_fields_are_accepted(server):
    extras = {"top_k": 20, "min_p": 0.1, "typical_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 32,
              "presence_penalty": 0.5, "frequency_penalty": 0.5, "mirostat": 2, "mirostat_tau": 4.0,
              "mirostat_eta": 0.2, "seed": 5, "ignore_eos": True, "cache_prompt": True, "n_predict": 3,
              "logit_bias": {"28": -100}, "user": "someone", "metadata": {"a": "b"}, "n": 1, "stream": False}
    for path, body in (("/v1/chat/completions", chat_body(**extras)),
                       ("/v1/completions", {"model": "smol", "prompt": "Hello", **extras})):
        answer = post(server, path, body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 3  # n_predict, and ignore_eos kept it going


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe{}", b"[" * 100000 + b"]" * 100000])
def test_malformed_bodies_are_refused(server, raw):
    check_error(post(server, "/v1/chat/completions", raw), 400)


@pytest.mark.parametrize("fields, param", [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": -1}, "temperature"),  # runtime.params: temp >= 0, as for --temp
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": [0.1]}, "min_p"),
    ({"seed": -2}, "seed"),
    ({"mirostat": 3}, "mirostat"),
    ({"repeat_penalty": -0.5}, "repeat_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": "10"}, "max_completion_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),  # not in the vocabulary
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
    ({"model": 7}, "model"),
])
def test_wrong_fields_are_refused_naming_the_field(server, fields, param):
    check_error(post(server, "/v1/chat/completions", chat_body(**fields)), 400, param=param)


@pytest.mark.parametrize("text", ['{"temperature": NaN}', '{"temperature": Infinity}', '{"temperature": -Infinity}'])
def test_nan_and_infinity_are_refused(server, text):
    body = text[:-1] + ', "model": "smol", "messages": [{"role": "user", "content": "hi"}]}'
    check_error(post(server, "/v1/chat/completions", body), 400)


def test_a_number_too_large_for_a_float_is_refused(server):
    body = json.dumps(chat_body())[:-1] + ', "temperature": 1e999}'
    check_error(post(server, "/v1/chat/completions", body), 400, param="temperature")


def test_completion_prompts_are_checked(server):
    for prompt, param in (([], "prompt"), ([1, -5], "prompt"), ([1, 10**9], "prompt"), (["a", "b"], "prompt"), (None, "prompt")):
        check_error(post(server, "/v1/completions", {"model": "smol", "prompt": prompt}), 400, param=param)
    check_error(post(server, "/v1/completions", {"model": "smol", "prompt": "x", "suffix": "y"}), 400, param="suffix")


def test_a_prompt_longer_than_the_context_is_a_400(server):
    long_text = "hello " * (N_CTX * 2)
    check_error(post(server, "/v1/completions", {"model": "smol", "prompt": long_text}), 400, code="context_length_exceeded")


def test_oversized_bodies_are_refused(server):
    big = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * (5 << 20)}]))
    check_error(post(server, "/v1/chat/completions", big), 413)


def test_unknown_models_paths_and_methods(server, smollm2_path):
    check_error(post(server, "/v1/chat/completions", chat_body(model="nope")), 404, param="model", code="model_not_found")
    # a path is never opened for a client, even the served model's own file
    check_error(post(server, "/v1/chat/completions", chat_body(model=str(smollm2_path))), 404, code="model_not_found")
    check_error(httpx.get(server.url + "/v1/models/nope"), 404)
    check_error(httpx.get(server.url + "/v1/nothing"), 404)
    check_error(httpx.get(server.url + "/v1/chat/completions"), 405)
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_cors_only_for_the_origins_given(host):
    from starlette.testclient import TestClient

    app = TestClient(create_app(host, cors_origins=["http://localhost:3000"]))  # in-process, no socket
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "Authorization"}
    allowed = app.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000", **preflight})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = app.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    assert app.get("/health", headers={"Origin": "http://localhost:3000"}).headers["access-control-allow-origin"] == "http://localhost:3000"


def test_no_cors_headers_unless_asked(server):
    response = httpx.options(server.url + "/v1/models", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in httpx.get(server.url + "/v1/models", headers={"Origin": "http://evil.example"}).headers


# -- the API key -----------------------------------------------------------------------------------


def test_with_a_key_every_endpoint_but_health_needs_it(keyed_server):
    url = keyed_server.url
    assert httpx.get(url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}, {"Authorization": "Basic s3cret-key"}):
        check_error(httpx.get(url + "/v1/models", headers=headers), 401, code="invalid_api_key")
        check_error(httpx.get(url + "/v1/nothing", headers=headers), 401)  # no hint about what exists
        check_error(httpx.post(url + "/v1/chat/completions", json=chat_body(), headers=headers), 401)
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0, timeout=120)
    assert good.chat.completions.create(model="smol", messages=QUESTION, max_tokens=2).choices[0].message.content is not None


# -- concurrency --------------------------------------------------------------------------------------


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds} s"
        time.sleep(0.02)


def long_stream(server, max_tokens=400):
    body = chat_body(max_tokens=max_tokens, ignore_eos=True, stream=True, temperature=0)
    return httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60)


def test_a_client_that_leaves_mid_stream_cancels_its_generation(server, host, client, engine):
    fresh(host)
    with long_stream(server, max_tokens=400) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = 0
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                received += 1
                if received == 3:
                    break
        # the engine works in its thread; the event loop still answers at once
        started = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 2
        left_at = time.monotonic()
    wait_for(lambda: host.history and host.history[-1].get("finish_reason") == "cancelled", 10, "the cancellation")
    summary = host.history[-1]
    # it stopped far short of its 400 tokens, within a token of hearing of the close: a token
    # takes 10-100 ms here (more on a loaded machine), 400 of them many seconds
    assert summary["usage"]["completion_tokens"] < 400
    assert summary["cancel_seconds"] < 2
    start = time.monotonic()
    reply = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == greedy_chat(engine, QUESTION, 8, cached=True)[0]
    assert start - left_at < 10


def test_several_clients_at_once_each_get_their_own_reply(server, engine):
    # system prompts that differ from their first word: whatever order the requests run in,
    # each prompt after the first shares only the template's opening with the cache, and its
    # rest (16 tokens or more) is evaluated as it is from an empty cache
    conversations = [[{"role": "system", "content": f"{name}: you are a helpful assistant who answers in one short sentence."},
                      {"role": "user", "content": q}]
                     for name, q in (("Alpha", "What is the capital of France?"), ("Bravo", "Name a colour."),
                                     ("Charlie", "What is 2 + 2?"), ("Delta", "Say hello."))]
    expected = [greedy_chat(engine, messages, 12)[0] for messages in conversations]
    results: dict[int, str] = {}

    def ask(i):
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        stream = i % 2 == 0
        out = c.chat.completions.create(model="smol", messages=conversations[i],
                                        temperature=0, max_tokens=12, stream=stream)
        results[i] = "".join(ch.choices[0].delta.content or "" for ch in out) if stream else out.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(conversations))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(len(conversations))] == expected


def test_past_the_queue_requests_get_503_with_retry_after(server, host, engine, monkeypatch):
    # hold the worker at the start of its job, so the queue's state does not depend on timing
    gate = threading.Event()
    run = host._run
    monkeypatch.setattr(host, "_run", lambda job: (gate.wait(60), run(job)))
    monkeypatch.setattr(host, "queue_size", 1)
    answers: dict = {}

    def ask(name):
        answers[name] = post(server, "/v1/chat/completions", chat_body(temperature=0, max_tokens=4))

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("running", "waiting")]
    fresh(host)
    try:
        threads[0].start()
        wait_for(lambda: host._current is not None, 10, "the first request reaching the worker")
        threads[1].start()
        wait_for(lambda: host.waiting == 1, 10, "queueing the second request")
        refused = post(server, "/v1/chat/completions", chat_body())
        check_error(refused, 503, code="queue_full")
        assert int(refused.headers["Retry-After"]) >= 1
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
    finally:
        gate.set()
        for t in threads:
            t.join(60)
    # the second asks what the first asked: its prompt is in the cache then
    for name, cached in (("running", False), ("waiting", True)):
        assert answers[name].status_code == 200
        assert answers[name].json()["choices"][0]["message"]["content"] == greedy_chat(engine, QUESTION, 4, cached)[0]


# -- the command -------------------------------------------------------------------------------------


def parse(argv):
    parser = argparse.ArgumentParser()
    serve_command.configure(parser)
    return parser.parse_args(argv)


def test_serve_flags_parse_with_safe_defaults(monkeypatch):
    monkeypatch.delenv(serve_command.API_KEY_ENV, raising=False)
    args = parse([])
    assert (args.host, args.port, args.model, args.api_key, args.cors_origins) == ("127.0.0.1", 8080, None, None, [])
    assert serve_command.check_args(args) is None
    args = parse(["-m", "smol", "--host", "::1", "--port", "0", "-t", "2", "-c", "1024", "--api-key", "k",
                  "--cors-origin", "http://localhost:3000", "--queue-size", "2"])
    assert (args.model, args.host, args.port, args.threads, args.n_ctx, args.queue_size) == ("smol", "::1", 0, 2, 1024, 2)
    assert serve_command.check_args(args) == "k"
    monkeypatch.setenv(serve_command.API_KEY_ENV, "from-env")
    assert serve_command.check_args(parse([])) == "from-env"
    assert serve_command.check_args(parse(["--api-key", "flag-wins"])) == "flag-wins"


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "70000"], "--port must be between 0 and 65535"),
    (["serve", "--api-key", " "], "--api-key is empty"),
    (["serve", "--queue-size", "-1"], "--queue-size must be 0 or more"),
    (["serve", "-m", "no-such-model"], "no model named 'no-such-model'"),
    (["serve", "--port", "BUSY"], "Address already in use; choose another --port"),
])
def test_serve_mistakes_are_one_sentence(argv, message, capsys, monkeypatch, smollm2_path):
    monkeypatch.delenv(serve_command.API_KEY_ENV, raising=False)
    busy = bind_socket("127.0.0.1", 0)
    try:
        if "BUSY" in argv:  # the model is resolved before the socket is bound
            argv = [str(busy.getsockname()[1]) if a == "BUSY" else a for a in argv] + ["-m", str(smollm2_path)]
        assert cli.main(argv) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_a_bad_context_size_is_refused_before_anything_starts(capsys, smollm2_path):
    assert cli.main(["serve", "-m", str(smollm2_path), "-c", "0"]) == 2
    assert "n_ctx must be" in capsys.readouterr().err


def test_the_banner_says_how_to_point_a_client_at_the_server():
    text = serve_command.banner("http://127.0.0.1:8080", "smol", key_required=True)
    assert "OPENAI_BASE_URL=http://127.0.0.1:8080/v1" in text
    assert "$LLAMACHAT_API_KEY" in text and "Authorization: Bearer" in text
    assert "\"model\": \"smol\"" in text


def test_llamachat_serve_answers_and_stops_cleanly_on_ctrl_c(smollm2_path, tmp_path):
    env = dict(os.environ, LLAMACHAT_HOME=str(tmp_path), LLAMACHAT_API_KEY="k3y", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "llamachat.tui.cli", "serve", "-m", str(smollm2_path), "--port", "0",
                             "-c", "256"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()  # the banner's first line names the URL, once it listens
        assert "http://127.0.0.1:" in first, first + proc.stderr.read()
        base = first.split(" at ")[1].split()[0]
        assert base.startswith("http://127.0.0.1:") and base.endswith("/v1")
        c = openai.OpenAI(base_url=base, api_key="k3y", max_retries=0, timeout=120)
        stream = c.chat.completions.create(model=c.models.list().data[0].id, messages=QUESTION, max_tokens=200,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        proc.send_signal(signal.SIGINT)  # mid-stream: the stream ends, saying why, and the server exits
        stopped = time.monotonic()
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                pass
        code = proc.wait(30)
        assert time.monotonic() - stopped < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    err = proc.stderr.read()
    assert code in (0, 130), err
    assert "Traceback" not in err and "k3y" not in err and "capital of France" not in err  # no keys, no prompts
