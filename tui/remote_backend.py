"""A remote model behind the typed seam (tui/backends.py): an OpenAI-compatible server
(`llamachat serve`, llama.cpp's llama-server, vLLM, Ollama's /v1) reached over HTTP.

`RemoteBackend.stream` posts to /v1/chat/completions (messages) or /v1/completions (a prompt)
with `stream: true` and turns the server-sent events into `TextPiece`s and one `Finished`; the
sampling parameters go through under their OpenAI / llama.cpp names. `cancel()` (any thread)
closes the stream, which is how a client stops a server's generation. Tokens/s are measured
here (first piece to last) with the server's usage counts when it sends them
(`stream_options.include_usage`); the context size only as far as the server says (`n_ctx` in
/v1/models' `meta` for llama-server, `max_model_len` for vLLM).

Every failure is one sentence (`RemoteError`, a UserError): network down, a timeout, 401/403
(the key), 404 (the model or the endpoint), 429 (busy), 5xx, a stream cut in the middle. The
caller keeps the conversation, so the user can simply try again.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Iterator

import httpx

from llamachat.runtime.errors import UserError

from .backends import Finished, GenerationRequest, ReplyStats, TextPiece

CONNECT_TIMEOUT = 10.0  # seconds to open a connection
READ_TIMEOUT = 300.0  # seconds between two pieces of a reply (a big prompt on a slow server)
MAX_ERROR_BODY = 4096  # bytes of an error response read for its message

# The server's tokenizer is not here, so the app's context meter and its dropping of the oldest
# turns count a remote request by its characters: English runs about 4 characters a token in
# the BPE vocabularies of llama-family models, code and other languages fewer, so 3 over-counts
# most text, and a chat template adds a few tokens around each message. Over-counting leaves a
# chat's oldest turns out a little early rather than sending a request the server refuses.
CHARS_PER_TOKEN = 3
TOKENS_PER_MESSAGE = 5


class RemoteError(UserError):
    """A remote backend failed; the message is the one sentence the user sees."""


def api_key_from_env(var: str | None) -> str | None:
    return os.environ.get(var) or None if var else None


class RemoteBackend:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 api_key_env: str | None = None, name: str | None = None, timeout: float = READ_TIMEOUT,
                 transport: httpx.BaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.api_key = api_key if api_key is not None else api_key_from_env(api_key_env)
        self.name = name or model or self.base_url
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT), transport=transport,
                                    headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})
        self._cancel = threading.Event()
        self._response: httpx.Response | None = None
        self._lock = threading.Lock()
        self._n_ctx = 0
        self._n_tokens = 0
        self._metadata: dict = {}

    # ---- the endpoint ------------------------------------------------------------------------

    def list_models(self) -> list[dict]:
        """GET /models: the server's models (each a dict with at least an id); RemoteError."""
        try:
            resp = self._client.get(self.base_url + "/models")
        except httpx.HTTPError as err:
            raise self._network_error(err) from None
        if resp.status_code != 200:
            raise self._status_error(resp.status_code, resp.text[:MAX_ERROR_BODY], "/models")
        try:
            data = resp.json()["data"]
            assert isinstance(data, list)
        except Exception:
            raise RemoteError(f"{self.base_url}/models did not answer with an OpenAI model list; "
                              "check the URL (it usually ends in /v1)") from None
        return [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def connect(self) -> None:
        """Check the endpoint and the model; learn the context size if the server tells it."""
        models = self.list_models()
        ids = [m["id"] for m in models]
        if self.model is None:
            if not ids:
                raise RemoteError(f"{self.base_url} lists no models; give one with --model")
            self.model = ids[0]
        elif ids and self.model not in ids:
            raise RemoteError(f"{self.base_url} has no model {self.model!r}; it has: {', '.join(ids[:10])}")
        for m in models:
            if m["id"] == self.model:
                meta = m.get("meta") if isinstance(m.get("meta"), dict) else {}
                n_ctx = meta.get("n_ctx") or meta.get("n_ctx_train") or m.get("max_model_len") or m.get("context_length")
                if isinstance(n_ctx, int) and n_ctx > 0:
                    self._n_ctx = n_ctx
                self._metadata = {"general.name": self.model, "remote.url": self.base_url}

    # ---- the seam ----------------------------------------------------------------------------

    def _body(self, request: GenerationRequest) -> dict:
        p = request.params
        body: dict = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                      "temperature": p.temp, "top_p": p.top_p, "top_k": p.top_k, "min_p": p.min_p,
                      "typical_p": p.typical_p, "repeat_penalty": p.repeat_penalty, "repeat_last_n": p.repeat_last_n,
                      "presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty}
        if p.mirostat:
            body.update(mirostat=p.mirostat, mirostat_tau=p.mirostat_tau, mirostat_eta=p.mirostat_eta)
        if not request.continue_stream and p.seed >= 0:
            body["seed"] = p.seed
        if request.n_predict > 0:
            body["max_tokens"] = request.n_predict
        if request.stop:
            body["stop"] = list(request.stop)
        if p.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in p.logit_bias}
        if p.ignore_eos:
            body["ignore_eos"] = True
        if request.messages is not None:
            body["messages"] = [dict(m) for m in request.messages]
        else:
            body["prompt"] = request.prompt
        return body

    def stream(self, request: GenerationRequest) -> Iterator:
        path = "/chat/completions" if request.messages is not None else "/completions"
        with self._lock:
            self._cancel.clear()
            start = time.perf_counter()
            first = last = None
            n_pieces = 0
            finish = None
            usage: dict = {}
            timings: dict = {}
            cancelled = False
            try:
                with self._client.stream("POST", self.base_url + path, json=self._body(request)) as resp:
                    if resp.status_code != 200:
                        body = resp.read()[:MAX_ERROR_BODY].decode("utf-8", "replace")
                        raise self._status_error(resp.status_code, body, path)
                    self._response = resp
                    if self._cancel.is_set():
                        cancelled = True
                    else:
                        for line in resp.iter_lines():
                            if not line.startswith("data:"):
                                continue
                            data = line[5:].strip()
                            if data == "[DONE]":
                                break
                            try:
                                event = json.loads(data)
                            except ValueError:
                                raise RemoteError(f"{self.base_url}{path} sent something that is not an "
                                                  "OpenAI stream; is the URL right?") from None
                            if isinstance(event.get("error"), dict):
                                raise RemoteError(f"{self.base_url} stopped the reply: "
                                                  f"{event['error'].get('message') or 'an error'}")
                            if isinstance(event.get("usage"), dict):
                                usage = event["usage"]
                            if isinstance(event.get("timings"), dict):
                                timings = event["timings"]
                            for choice in event.get("choices") or []:
                                text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                                if text:
                                    now = time.perf_counter()
                                    first = first or now
                                    last = now
                                    n_pieces += 1
                                    yield TextPiece(text)
                                finish = choice.get("finish_reason") or finish
            except httpx.HTTPError as err:
                if not self._cancel.is_set():
                    raise self._network_error(err, midway=first is not None) from None
                cancelled = True
            finally:
                self._response = None
            if self._cancel.is_set():
                cancelled = True
        completion = int(usage.get("completion_tokens") or timings.get("predicted_n") or n_pieces)
        prompt_tokens = int(usage.get("prompt_tokens") or timings.get("prompt_n") or 0)
        if prompt_tokens:
            self._n_tokens = prompt_tokens + completion
        if cancelled:
            reason = "cancelled"
        elif finish == "length":
            reason = "length"
        elif finish == "stop" and request.stop:
            reason = "stop"  # the server does not say whether a stop string or the model ended it
        else:
            reason = "eos"
        eval_ms = float(timings.get("predicted_ms") or ((last - first) * 1e3 if first and last and last > first else 0.0))
        if not timings.get("predicted_ms") and completion > 1 and eval_ms:
            eval_ms = eval_ms * completion / (completion - 1)  # first to last piece spans n-1 tokens
        prompt_ms = float(timings.get("prompt_ms") or ((first - start) * 1e3 if first else 0.0))
        yield Finished(ReplyStats(
            stop_reason=reason, stop_text=request.stop[0] if reason == "stop" and len(request.stop) == 1 else None,
            prompt_tokens=prompt_tokens, completion_tokens=completion, prompt_ms=prompt_ms, eval_ms=eval_ms,
            n_past=self._n_tokens or None, n_ctx=self._n_ctx or None, detail={"usage": usage, "timings": timings}))

    def cancel(self) -> None:
        self._cancel.set()
        resp = self._response
        if resp is not None:
            try:
                resp.close()  # closing the stream is how a client stops the server's generation
            except Exception:
                pass

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_tokens(self) -> int:
        return self._n_tokens

    def count_tokens(self, messages, prompt) -> int | None:
        """An estimate from the characters (CHARS_PER_TOKEN): the server's tokenizer is not here."""
        if messages is not None:
            return sum(-(-len(str(m.get("content") or "")) // CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE for m in messages)
        return -(-len(prompt or "") // CHARS_PER_TOKEN)

    def metadata(self) -> dict:
        return dict(self._metadata)

    def take_notice(self) -> str | None:
        return None

    def close(self) -> None:
        self.cancel()
        self._client.close()

    # ---- sentences ---------------------------------------------------------------------------

    def _network_error(self, err: httpx.HTTPError, midway: bool = False) -> RemoteError:
        where = self.base_url
        if isinstance(err, httpx.TimeoutException):
            what = "did not answer in time" if not midway else "stopped sending in the middle of the reply"
            return RemoteError(f"{where} {what} ({err.__class__.__name__}); try again, or check the server")
        if midway or isinstance(err, (httpx.RemoteProtocolError, httpx.ReadError)):
            return RemoteError(f"the connection to {where} broke in the middle of the reply; what came is kept, try again")
        if isinstance(err, httpx.ConnectError):
            return RemoteError(f"cannot reach {where} ({_first_line(err) or 'connection refused'}); is the server running?")
        if isinstance(err, httpx.UnsupportedProtocol):
            return RemoteError(f"{where} is not an http:// or https:// URL")
        return RemoteError(f"{where}: {err.__class__.__name__}: {_first_line(err)}; try again")

    def _status_error(self, status: int, body: str, path: str) -> RemoteError:
        message = _error_message(body)
        tail = f": {message}" if message else ""
        if status in (401, 403):
            how = (f"set the environment variable {self.api_key_env} to a valid key" if self.api_key_env
                   else "give the entry an API key variable with `llamachat models add-remote ... --api-key-env VAR`")
            return RemoteError(f"{self.base_url} refused the request (HTTP {status}, the API key){tail}; {how}")
        if status == 404:
            return RemoteError(f"{self.base_url}{path} was not found (HTTP 404){tail}; check the URL "
                               f"(it usually ends in /v1) and the model name {self.model!r}")
        if status == 429:
            return RemoteError(f"{self.base_url} is busy (HTTP 429, too many requests){tail}; wait a moment and try again")
        if status >= 500:
            return RemoteError(f"{self.base_url} failed (HTTP {status}){tail}; try again")
        return RemoteError(f"{self.base_url} refused the request (HTTP {status}){tail}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else ""


def _error_message(body: str) -> str:
    """The message of an OpenAI-style error body, or its first line."""
    try:
        data = json.loads(body)
        err = data.get("error") if isinstance(data, dict) else None
        msg = err.get("message") if isinstance(err, dict) else err if isinstance(err, str) else data.get("detail")
        if isinstance(msg, str):
            return msg.strip().splitlines()[0][:300] if msg.strip() else ""
    except (ValueError, AttributeError):
        pass
    body = body.strip()
    return body.splitlines()[0][:200] if body else ""
