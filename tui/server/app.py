"""The HTTP side of `llamachat serve`: a Starlette app on uvicorn, in OpenAI's shapes.

Routes: GET /health (never needs the key), GET /v1/models, GET /v1/models/{id},
POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings (also without the /v1 prefix, as llama.cpp's
server answers them). Everything runs on the event loop except the engine, which lives in
host.ModelHost's worker thread; a request waits for its job's events without blocking the loop.

Safety: the API key (when set) is compared in constant time and required on every path but
/health, before routing, so even a 404 tells nothing to a client without it; bodies larger
than `max_body_bytes` are refused while they arrive; every answer other than success is
OpenAI's error object with a 4xx (a 5xx only for the server's own faults), never a traceback;
no CORS headers unless origins are given. Prompts are logged only with verbose.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import socket
from typing import Iterable

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llamachat.runtime.errors import UserError

from .host import Job, ModelHost
from .protocol import ApiError, parse_embedding, parse_generation, parse_json_object

log = logging.getLogger("llamachat.serve")

DEFAULT_MAX_BODY_BYTES = 4 << 20  # a 128k-token conversation is about 0.5 MB of JSON
OPEN_PATHS = ("/health",)


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class ApiKeyMiddleware:
    """Every HTTP request but OPEN_PATHS must carry `Authorization: Bearer KEY`."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self._authorised(scope):
            err = ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            await error_response(err)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorised(self, scope) -> bool:
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        # compare_digest on equal-length inputs only tells whether they match, not where they differ
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    too_big = ApiError(413, f"the request body is larger than the limit of {limit} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


class ServeApp:
    """The endpoints, bound to one ModelHost."""

    def __init__(self, host: ModelHost, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, verbose: bool = False):
        self.host = host
        self.max_body_bytes = max_body_bytes
        self.verbose = verbose

    # -- plain endpoints ----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def _model_card(self, model) -> dict:
        try:
            created = int(model.path.stat().st_mtime)
        except OSError:
            created = 0
        return {"id": model.name, "object": "model", "created": created, "owned_by": "llamachat"}

    async def models(self, request: Request) -> Response:
        models = await asyncio.to_thread(self.host.served_models)  # reads models.toml
        return JSONResponse({"object": "list", "data": [self._model_card(m) for m in models]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        model = await asyncio.to_thread(self.host.find_model, name)
        return JSONResponse(self._model_card(model))

    # -- generation ---------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def _generate(self, request: Request, kind: str) -> Response:
        body = parse_json_object(await read_body(request, self.max_body_bytes))
        req = parse_generation(body, kind)
        model = await asyncio.to_thread(self.host.find_model, req.model)
        if self.verbose:
            log.info("llamachat serve: %s request: %s", kind, json.dumps(body, ensure_ascii=False)[:2000])
        job = Job(req, model, asyncio.get_running_loop())
        self.host.submit(job)
        watcher = asyncio.create_task(self._watch_disconnect(request, job))
        try:
            first = await job.events.get()
            if first[0] == "error":
                raise first[1]
            if req.stream:
                stream = self._stream(job, watcher)
                watcher = None  # the stream owns it now
                return StreamingResponse(stream, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return JSONResponse(await self._collect(job))
        finally:
            if watcher is not None:
                watcher.cancel()
                self.host.cancel(job)  # no-op once it finished; stops it if we leave early

    async def embeddings(self, request: Request) -> Response:
        """OpenAI's /v1/embeddings, on the same worker and queue as the generations."""
        body = parse_json_object(await read_body(request, self.max_body_bytes))
        req = parse_embedding(body)
        model = await asyncio.to_thread(self.host.find_model, req.model)
        if self.verbose:
            log.info("llamachat serve: embedding request: %s", json.dumps(body, ensure_ascii=False)[:2000])
        job = Job(req, model, asyncio.get_running_loop())
        self.host.submit(job)
        watcher = asyncio.create_task(self._watch_disconnect(request, job))
        try:
            event = await job.events.get()
            if event[0] == "error":
                raise event[1]
            _, vectors, usage = event
        finally:
            watcher.cancel()
            self.host.cancel(job)
        if req.encoding_format == "base64":  # OpenAI's: the little-endian float32 bytes
            vectors = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vectors]
        return JSONResponse({"object": "list", "model": model.name, "usage": usage,
                             "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]})

    async def _watch_disconnect(self, request: Request, job: Job) -> None:
        """Cancel the job when the client goes away (the body is read: only that can arrive)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.host.cancel(job)
                return

    def _meta(self, job: Job) -> dict:
        chat = job.request.kind == "chat"
        return {"id": ("chatcmpl-" if chat else "cmpl-") + job.id,
                "object": "chat.completion" if chat else "text_completion",
                "created": job.created, "model": job.model.name}

    async def _collect(self, job: Job) -> dict:
        pieces = []
        while True:
            event = await job.events.get()
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "error":
                raise event[1]
            elif event[0] == "done":
                finish, usage = event[1], event[2]
                break
        text = "".join(pieces)
        if job.request.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return {**self._meta(job), "choices": [choice], "usage": usage}

    async def _stream(self, job: Job, watcher: asyncio.Task):
        chat = job.request.kind == "chat"
        meta = self._meta(job)
        if chat:
            meta["object"] = "chat.completion.chunk"

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
            return {**meta, "choices": [choice]}

        try:
            if chat:
                yield _sse(chunk(None, role=True))
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    yield _sse(chunk(event[1]))
                elif event[0] == "error":
                    yield _sse(event[1].body())
                    return
                elif event[0] == "done":
                    yield _sse(chunk(None, event[1]))
                    if job.request.include_usage:
                        yield _sse({**meta, "choices": [], "usage": event[2]})
                    break
            yield b"data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self.host.cancel(job)  # the client left mid-stream: stop generating for it


def _handled(endpoint):
    """Every failure becomes OpenAI's error object; nothing reaches the client as a traceback."""

    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as err:
            return error_response(err)
        except UserError as err:
            return error_response(ApiError(400, str(err)))
        except Exception as err:
            log.error("llamachat serve: internal error on %s: %s: %s", request.url.path, type(err).__name__, err,
                      exc_info=True)
            return error_response(ApiError(500, "internal server error", type="server_error"))

    return wrapper


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                                   headers=dict(exc.headers or {})))


def create_app(host: ModelHost, api_key: str | None = None, cors_origins: Iterable[str] = (),
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, verbose: bool = False) -> Starlette:
    api = ServeApp(host, max_body_bytes, verbose)
    routes = []
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/models", _handled(api.models), methods=["GET"]),
            Route(f"{prefix}/models/{{model:path}}", _handled(api.model), methods=["GET"]),
            Route(f"{prefix}/chat/completions", _handled(api.chat_completions), methods=["POST"]),
            Route(f"{prefix}/completions", _handled(api.completions), methods=["POST"]),
            Route(f"{prefix}/embeddings", _handled(api.embeddings), methods=["POST"]),
        ]
    routes.append(Route("/health", _handled(api.health), methods=["GET"]))
    middleware = []
    origins = list(cors_origins)
    if origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    if api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=api_key))
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_exception})


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one); UserError if that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UserError(f"--host {host!r}: cannot resolve it ({err.strerror}); give an address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        hint = "; choose another --port" if err.errno in (98, 48) else ""
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}{hint}") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    return f"http://{shown}:{port}"


class Server(uvicorn.Server):
    """uvicorn's server, stopping the engine's work as soon as it is told to exit, so open
    streams end at once instead of holding the shutdown until their replies are complete."""

    def __init__(self, config: uvicorn.Config, host: ModelHost):
        super().__init__(config)
        self.model_host = host

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self.model_host.shutdown()


def make_server(app: Starlette, host: ModelHost, verbose: bool = False) -> Server:
    config = uvicorn.Config(app, http="h11", loop="asyncio", lifespan="off", log_level="info" if verbose else "warning",
                            access_log=verbose, server_header=False, timeout_graceful_shutdown=5)
    return Server(config, host)


@contextlib.contextmanager
def server_logging():
    """Our log lines on stderr while serving: loading, a one-line summary per request (no
    prompt text: that only with verbose), engine errors."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate
