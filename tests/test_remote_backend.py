"""The remote backend (tui/remote_backend.py) against a tiny fake OpenAI server on 127.0.0.1:
streaming, the parameters sent, cancel closing the stream, and each failure as one sentence
with what came kept. Loopback only."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from llamachat.runtime.params import SamplingParams
from llamachat.tui.backends import Finished, GenerationRequest, TextPiece, run_to_end
from llamachat.tui.conversation import Conversation, Message, call_kwargs
from llamachat.tui.engine_worker import Engine
from llamachat.tui.remote_backend import RemoteBackend, RemoteError

HI = ({"role": "user", "content": "hi"},)


class Fake:
    def __init__(self):
        self.mode = "ok"
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.closed = threading.Event()  # the client went away during a long stream
        self.words = ["Hello", " there", ",", " friend", "."]

    async def models(self, request):
        if self.mode == "401":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        return JSONResponse({"object": "list", "data": [{"id": "fake-1", "meta": {"n_ctx": 4096}}, {"id": "fake-2"}]})

    async def chat(self, request):
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        status = {"401": 401, "404": 404, "429": 429, "500": 500}.get(self.mode)
        if status:
            return JSONResponse({"error": {"message": f"fake says {status}"}}, status_code=status)
        chat = "messages" in body

        def chunk(text=None, finish=None):
            choice = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": text} if text else {}
            else:
                choice["text"] = text or ""
            return "data: " + json.dumps({"choices": [choice]}) + "\n\n"

        async def events():
            try:
                for word in self.words:
                    yield chunk(word)
                    await asyncio.sleep(0.01)
                if self.mode == "cut":
                    raise RuntimeError("the server died")  # uvicorn drops the connection mid-stream
                if self.mode == "long":
                    for _ in range(2000):
                        yield chunk(" more")
                        await asyncio.sleep(0.01)
                yield chunk(None, "length" if body.get("max_tokens") == len(self.words) else "stop")
                yield "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.closed.set()

        return StreamingResponse(events(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def fake_server():
    fake = Fake()
    app = Starlette(routes=[Route("/v1/models", fake.models), Route("/v1/chat/completions", fake.chat, methods=["POST"]),
                            Route("/v1/completions", fake.chat, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield fake, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def fake(fake_server):
    fake, url = fake_server
    fake.mode = "ok"
    fake.bodies.clear()
    fake.headers.clear()
    fake.closed.clear()
    return fake, url


def test_streams_a_chat_and_passes_the_parameters(fake, monkeypatch):
    fake, url = fake
    monkeypatch.setenv("FAKE_KEY", "k-123")
    backend = RemoteBackend(url, "fake-1", api_key_env="FAKE_KEY")
    backend.connect()
    assert backend.n_ctx() == 4096
    params = SamplingParams(temp=0.3, top_k=7, top_p=0.5, seed=42, logit_bias=((3, -1.0),))
    events = list(backend.stream(GenerationRequest(messages=HI, params=params, n_predict=64, stop=("##",),
                                                   continue_stream=False)))
    assert [e.text for e in events if isinstance(e, TextPiece)] == fake.words
    stats = events[-1].stats
    assert isinstance(events[-1], Finished) and stats.stop_reason == "stop" and stats.stop_text == "##"
    assert (stats.prompt_tokens, stats.completion_tokens, stats.n_past, stats.n_ctx) == (7, 5, 12, 4096)
    assert stats.tokens_per_second and stats.tokens_per_second > 0
    body = fake.bodies[-1]
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["model"] == "fake-1" and body["stream"]
    assert (body["temperature"], body["top_k"], body["top_p"], body["seed"], body["max_tokens"]) == (0.3, 7, 0.5, 42, 64)
    assert body["stop"] == ["##"] and body["logit_bias"] == {"3": -1.0}
    assert fake.headers[-1]["authorization"] == "Bearer k-123"
    backend.close()


def test_a_prompt_goes_to_completions_and_length_is_reported(fake):
    fake, url = fake
    backend = RemoteBackend(url, "fake-1")
    stats = run_to_end(backend, GenerationRequest(prompt="Once", n_predict=5), lambda t: None)
    assert fake.bodies[-1]["prompt"] == "Once" and "seed" not in fake.bodies[-1]
    assert stats.stop_reason == "length"
    assert "authorization" not in fake.headers[-1]


def test_unknown_model_and_bad_key_are_one_sentence(fake, monkeypatch):
    fake, url = fake
    with pytest.raises(RemoteError, match=r"has no model 'nope'; it has: fake-1, fake-2$"):
        RemoteBackend(url, "nope").connect()
    fake.mode = "401"
    monkeypatch.delenv("FAKE_KEY", raising=False)
    with pytest.raises(RemoteError) as err:
        RemoteBackend(url, "fake-1", api_key_env="FAKE_KEY").connect()
    assert str(err.value) == (f"{url} refused the request (HTTP 401, the API key): bad key; "
                              "set the environment variable FAKE_KEY to a valid key")


@pytest.mark.parametrize("mode, words", [("404", "was not found (HTTP 404): fake says 404; check the URL"),
                                         ("429", "is busy (HTTP 429, too many requests): fake says 429; wait a moment"),
                                         ("500", "failed (HTTP 500): fake says 500; try again")])
def test_error_codes_are_one_sentence_and_the_chat_is_kept(fake, mode, words):
    fake, url = fake
    fake.mode = mode
    engine = Engine()
    engine.use_backend(RemoteBackend(url, "fake-1"), "remote")
    conv = Conversation()
    conv.messages.append(Message("user", "hi"))
    settings = {"temp": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "typical_p": 1.0, "repeat_penalty": 1.0,
                "repeat_last_n": 64, "presence_penalty": 0.0, "frequency_penalty": 0.0, "mirostat": 0,
                "mirostat_tau": 5.0, "mirostat_eta": 0.1, "n_predict": -1}
    result = engine.generate(conv.request(), call_kwargs(settings), lambda t: None)
    assert words in result.error and "\n" not in result.error and result.text == ""
    fake.mode = "ok"  # the user tries again: the same engine, the same conversation
    again = engine.generate(conv.request(), call_kwargs(settings), lambda t: None)
    assert again.error is None and again.text == "Hello there, friend."


def test_a_stream_cut_midway_keeps_the_text(fake):
    fake, url = fake
    fake.mode = "cut"
    backend = RemoteBackend(url, "fake-1")
    pieces: list[str] = []
    with pytest.raises(RemoteError, match="broke in the middle of the reply; what came is kept, try again"):
        run_to_end(backend, GenerationRequest(messages=HI), pieces.append)
    assert "".join(pieces) == "Hello there, friend."


def test_nobody_listening_is_one_sentence():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # a port nobody listens on
    with pytest.raises(RemoteError, match=r"^cannot reach http://127.0.0.1:\d+/v1 .*; is the server running\?$"):
        RemoteBackend(f"http://127.0.0.1:{port}/v1", "m").connect()


def test_cancel_closes_the_stream_and_keeps_the_text(fake):
    fake, url = fake
    fake.mode = "long"
    backend = RemoteBackend(url, "fake-1")
    pieces: list[str] = []

    def on_text(text):
        pieces.append(text)
        if len(pieces) == 8:
            threading.Thread(target=backend.cancel).start()

    t0 = time.monotonic()
    stats = run_to_end(backend, GenerationRequest(messages=HI), on_text)
    assert stats.stop_reason == "cancelled"
    assert time.monotonic() - t0 < 10  # the long stream would take 20 s
    assert "".join(pieces).startswith("Hello there, friend.")
    assert fake.closed.wait(10)  # the server saw the client go and stopped generating
