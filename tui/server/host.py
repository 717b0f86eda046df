"""The model behind `llamachat serve`: one resident model, one worker thread, a bounded queue.

The HTTP side (event loop) never touches the engine. It turns a request into a `Job` and
`submit`s it; the worker thread takes jobs in order, loads the model the job names when it is
not the resident one (one model in memory at a time: the old one is closed first), runs the
generation through the same `Llama` calls the app makes (`create_chat_completion`, whose prompt
is the model's chat template, or `create_completion`) and posts the job's events to its
asyncio queue: `("ready",)`, `("text", piece)`..., then exactly one of `("done", finish_reason,
usage)` or `("error", ApiError)`.

The KV cache stays with the resident model between jobs, so a request that extends the
previous one (the next turn of a chat) only evaluates its new tokens; `usage` reports the
reused part as `prompt_tokens_details.cached_tokens`.

`cancel(job)` is safe from any thread: a waiting job leaves the queue, a running one ends
within one token. Past `queue_size` waiting jobs, `submit` raises ApiError(503) with a
Retry-After estimated from the recent job durations.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from llamachat.runtime.errors import UserError

from ..conversation import call_kwargs, load_kwargs, merged_settings
from ..engine_worker import default_llama_factory, describe_error
from .protocol import ApiError, GenerationRequest

log = logging.getLogger("llamachat.serve")

# Llama's finish reasons (runtime.generation.llama_api.FINISH_REASON) are OpenAI's, plus "cancelled"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat has none


@dataclass
class ServedModel:
    """A model the server may load: its library name, file and library settings."""

    name: str
    path: Path
    settings: dict = field(default_factory=dict)


class Job:
    """One generation request on its way through the queue and the worker."""

    def __init__(self, request: GenerationRequest, model: ServedModel, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.model = model
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.id = uuid.uuid4().hex
        self.created = int(time.time())
        self.cancelled = threading.Event()
        self.cancelled_at: float | None = None
        self.finished = threading.Event()
        self.ended_at: float | None = None
        self.summary: dict = {}

    def post(self, *event) -> None:
        """Hand an event to the event loop (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class ModelHost:
    def __init__(self, model: ServedModel, args=None, library_file: Path | None = None, queue_size: int = 8,
                 llama_factory=None, verbose: bool = False):
        """`args`: the serve command's flags (n_ctx, threads) applied to every model loaded;
        `library_file`: where the other models' names are looked up (None: only `model`)."""
        self.args = args
        self.library_file = library_file
        self.queue_size = queue_size
        self.verbose = verbose
        self._factory = llama_factory
        self.llm = None
        self.model: ServedModel | None = None
        self.settings: dict = {}
        self._first = model
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._pending: deque[Job] = deque()
        self._current: Job | None = None
        self._closed = False
        self._durations: deque[float] = deque(maxlen=16)
        self.history: deque[dict] = deque(maxlen=32)  # summaries of finished jobs (for logs and tests)
        self._thread: threading.Thread | None = None
        self._embedder = None  # (llm, its embedding view) for /v1/embeddings

    # -- life cycle (the thread that starts the server) -----------------------------------------

    def start(self) -> None:
        """Load the first model (so a bad file is refused before the server listens), then
        start the worker. Raises UserError."""
        self._load(self._first)
        self._warm_up()
        self._thread = threading.Thread(target=self._work, name="llamachat-serve-engine", daemon=True)
        self._thread.start()

    def _warm_up(self) -> None:
        """The engine's kernels loaded (or compiled, on a first run: on two cores in two
        processes, see engine_worker.warm_up), then one tiny chat through the engine, so the
        first client does not wait while the template compiles."""
        from ..engine_worker import warm_up

        warm_up(self.llm)
        try:
            self.llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0.0)
            self.llm.reset()
        except UserError as err:  # e.g. a template that refuses this conversation: clients will hear it
            log.warning("llamachat serve: warm-up: %s", err)

    def shutdown(self) -> None:
        """Refuse new jobs, end the waiting ones and cancel the running one (any thread)."""
        with self._lock:
            self._closed = True
            waiting = list(self._pending)
            self._pending.clear()
            current = self._current
            self._ready.notify_all()
        for job in waiting:
            job.post("error", ApiError(503, "the server is shutting down", type="server_error", code="shutting_down"))
            job.finished.set()
        if current is not None:
            self.cancel(current)

    def close(self, timeout: float = 10.0) -> None:
        """shutdown(), wait for the worker, free the model."""
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # stuck in something a cancel cannot interrupt (a kernel compiling): closing the
                # model would wait for it; the process is ending, so leave it to exit
                log.warning("llamachat serve: the engine did not stop within %.0f s; exiting without waiting", timeout)
                return
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.close()
            except Exception:
                pass

    # -- the event loop's side --------------------------------------------------------------------

    def served_models(self) -> list[ServedModel]:
        """The resident model first, then the one the server started with (it may be a file
        outside the library), then the library's models whose files exist; one per name."""
        models: list[ServedModel] = []
        for m in [self.model or self._first, self._first] + self._library_models():
            if all(m.name != known.name for known in models):
                models.append(m)
        return models

    def _library_models(self) -> list[ServedModel]:
        if self.library_file is None:
            return []
        from llamachat.model_store.library import Library

        try:
            library = Library.load(self.library_file)
        except UserError as err:  # a broken models.toml must not take the server down
            log.warning("llamachat serve: %s", err)
            return []
        out = []
        for entry in library.models.values():
            path = getattr(entry, "path", None)
            if getattr(entry, "missing", False) or path is None or not Path(path).is_file():
                continue
            out.append(ServedModel(entry.name, Path(path), dict(entry.settings)))
        return out

    def find_model(self, name: str | None) -> ServedModel:
        """The model a request names (None: the resident one); ApiError(404) if unknown. Only
        names are accepted: a client never makes the server open a path of its choosing."""
        resident = self.model or self._first
        if name is None or name == resident.name:
            return resident
        models = self.served_models()
        for m in models:
            if m.name == name:
                return m
        raise ApiError(404, f"the model {name!r} does not exist here; available: {', '.join(m.name for m in models)}",
                       param="model", code="model_not_found")

    def submit(self, job: Job) -> None:
        """Queue a job; ApiError(503) when the queue is full or the server is stopping."""
        with self._lock:
            if self._closed:
                raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._pending) >= self.queue_size and not (self._current is None and not self._pending):
                raise ApiError(503, f"the server is busy: {len(self._pending)} requests are already waiting; retry later",
                               type="server_error", code="queue_full",
                               headers={"Retry-After": str(self._retry_after_locked())})
            self._pending.append(job)
            self._ready.notify()

    def _retry_after_locked(self) -> int:
        average = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return int(min(max(math.ceil(average * (len(self._pending) + 1)), 1), 120))

    def cancel(self, job: Job) -> None:
        """The client is gone (any thread): drop the job if it waits, stop it if it runs."""
        if job.finished.is_set():
            return
        with self._lock:
            if job.cancelled_at is None:
                job.cancelled_at = time.monotonic()
            job.cancelled.set()
            waiting = job in self._pending
            if waiting:
                self._pending.remove(job)
            running = self._current is job
            llm = self.llm
        if waiting:
            job.post("error", ApiError(499, "the client closed the request", code="cancelled"))
            job.finished.set()
        elif running and llm is not None:
            llm.cancel()  # interrupts a long prompt too; the worker also checks job.cancelled per token

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._pending)

    # -- the worker thread ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._ready.wait()
                if self._closed and not self._pending:
                    return
                job = self._pending.popleft()
                self._current = job
            start = time.monotonic()
            try:
                self._run(job)
            except BaseException as err:  # an engine bug: one sentence to the client, the server goes on
                log.error("llamachat serve: %s", describe_error(err), exc_info=self.verbose)
                job.post("error", ApiError(500, describe_error(err), type="server_error"))
            finally:
                with self._lock:
                    self._current = None
                job.ended_at = time.monotonic()
                if job.cancelled_at is not None:
                    job.summary["cancel_seconds"] = job.ended_at - job.cancelled_at
                self._durations.append(job.ended_at - start)
                self.history.append(job.summary)
                job.finished.set()

    def _load(self, model: ServedModel) -> None:
        """Make `model` the resident one (UserError if it cannot be loaded)."""
        settings = merged_settings(self.args, model.settings)
        old, self.llm, self.model = self.llm, None, None
        if old is not None:  # free the old model (and its KV cache) before loading the next
            try:
                old.close()
            except Exception:
                pass
        factory = self._factory or default_llama_factory()
        try:
            self.llm = factory(str(model.path), verbose=False, **load_kwargs(settings))
        except UserError:
            raise
        except FileNotFoundError as err:
            raise UserError(f"{model.path}: file not found ({err.strerror or err})") from None
        except Exception as err:
            raise UserError(f"{model.path}: cannot load the model: {describe_error(err)}") from None
        self.model, self.settings = model, settings

    def _call_kwargs(self, req: GenerationRequest) -> dict:
        """The Llama keywords for a request: request field > the model's library setting >
        llama.cpp's default, merged as the app merges its flags."""
        settings = dict(self.settings)
        settings.update(req.settings)
        kwargs = call_kwargs(settings)
        if req.max_tokens is not None:
            kwargs["max_tokens"] = None if req.max_tokens < 0 else req.max_tokens
        elif req.kind == "completion" and "n_predict" not in self.model.settings:
            kwargs["max_tokens"] = COMPLETION_DEFAULT_MAX_TOKENS
        if "seed" in req.settings:
            kwargs["seed"] = req.settings["seed"]
        if req.stop:
            kwargs["stop"] = list(req.stop)
        if req.ignore_eos:
            kwargs["ignore_eos"] = True
        n_vocab = self.llm.n_vocab()
        for token in req.logit_bias:
            if token >= n_vocab:
                raise ApiError(400, f"logit_bias: token id {token} is not in the vocabulary (0 to {n_vocab - 1})",
                               param="logit_bias")
        if req.logit_bias:
            kwargs["logit_bias"] = dict(req.logit_bias)
        return kwargs

    def _messages(self, req: GenerationRequest) -> list[dict]:
        """The conversation as the app sends it: the library's system prompt first when the
        client gives none (conversation.Conversation.request does the same)."""
        system = self.settings.get("system_prompt") or ""
        if system.strip() and not any(m["role"] == "system" for m in req.messages):
            return [{"role": "system", "content": system}] + list(req.messages)
        return list(req.messages)

    def _embedding_view(self, llm):
        """The resident model with embedding=True: the GGUF's pooling type, or MEAN when the
        model pools nothing (OpenAI's answer is one vector per input; llama-server refuses
        pooling "none" here instead)."""
        if self._embedder is None or self._embedder[0] is not llm:
            from llamachat.runtime.generation.llama_api import LLAMA_POOLING_TYPE_MEAN, LLAMA_POOLING_TYPE_NONE, _pooling_type

            try:
                pooling = _pooling_type(None, llm.metadata)
            except UserError:  # a reranker's RANK: not an embedding
                pooling = LLAMA_POOLING_TYPE_NONE
            if pooling == LLAMA_POOLING_TYPE_NONE:
                pooling = LLAMA_POOLING_TYPE_MEAN
            self._embedder = (llm, llm.embedder(pooling))
        return self._embedder[1]

    def _embed(self, job: Job, llm) -> None:
        """One /v1/embeddings job: every input from an empty cache (the chat cache restarts)."""
        req = job.request
        started = time.monotonic()
        try:
            vectors, count = self._embedding_view(llm).embed(req.inputs, truncate=False, return_count=True)
        except UserError as err:  # a token id outside the vocabulary, an input longer than the batch
            job.post("error", ApiError(400, str(err), param="input"))
            return
        usage = {"prompt_tokens": count, "total_tokens": count}
        job.summary.update(finish_reason="stop", usage=usage, seconds=time.monotonic() - started)
        job.post("embeddings", vectors, usage)
        log.info("llamachat serve: embedding %s: %d inputs, %d tokens in %.2f s", job.model.name, len(vectors),
                 count, time.monotonic() - started)

    def _run(self, job: Job) -> None:
        req = job.request
        job.summary = {"id": job.id, "kind": req.kind, "model": job.model.name, "finish_reason": None}
        if job.cancelled.is_set():
            job.post("error", ApiError(499, "the client closed the request", code="cancelled"))
            return
        if self.model is None or job.model.name != self.model.name or job.model.path != self.model.path:
            log.info("llamachat serve: loading %s in place of %s", job.model.name, self.model.name if self.model else "nothing")
            try:
                self._load(job.model)
            except UserError as err:
                job.post("error", ApiError(500, f"the model {job.model.name!r} cannot be loaded: {err}",
                                           type="server_error", code="model_load_failed"))
                return
        llm = self.llm
        if req.kind == "embedding":
            self._embed(job, llm)
            return
        started = time.monotonic()
        try:
            kwargs = self._call_kwargs(req)
            if req.kind == "chat":
                chunks = llm.create_chat_completion(self._messages(req), stream=True, **kwargs)
            else:
                if isinstance(req.prompt, list):
                    bad = [t for t in req.prompt if t >= llm.n_vocab()]
                    if bad:
                        raise ApiError(400, f"prompt: token id {bad[0]} is not in the vocabulary (0 to {llm.n_vocab() - 1})",
                                       param="prompt")
                chunks = llm.create_completion(req.prompt, stream=True, echo=req.echo, **kwargs)
        except ApiError as err:
            job.post("error", err)
            return
        except UserError as err:  # prompt longer than the context, a template that refuses the roles, ...
            code = "context_length_exceeded" if "context size" in str(err) else None
            job.post("error", ApiError(400, str(err), code=code))
            return
        job.post("ready")
        template = getattr(llm, "_chat_template", None)  # built by a chat request: its fallback notice, once
        notice = template.take_notice() if template is not None else None
        if notice:
            log.warning("llamachat serve: %s: %s", job.model.name, notice)
        finish = None
        try:
            for chunk in chunks:
                choice = chunk["choices"][0]
                text = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                if text:
                    job.post("text", text)
                finish = choice.get("finish_reason") or finish
                if job.cancelled.is_set():
                    break
        finally:
            chunks.close()  # frees the model at once when we stopped early
        stats = dict(llm.last_stats or {})
        if job.cancelled.is_set():
            finish = "cancelled"
        prompt_tokens = int(stats.get("prompt_tokens", 0))
        completion_tokens = int(stats.get("completion_tokens", 0))
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": prompt_tokens - int(stats.get("prompt_eval_tokens", prompt_tokens))},
        }
        seconds = time.monotonic() - started
        job.summary.update(finish_reason=finish, usage=usage, seconds=seconds, stop_reason=stats.get("stop_reason"))
        if finish == "cancelled" and self._closed:
            job.post("error", ApiError(503, "the server is shutting down", type="server_error", code="shutting_down"))
        else:
            job.post("done", finish or "stop", usage)
        rate = f" ({completion_tokens / (stats['eval_ms'] / 1e3):.1f} tokens/s)" if stats.get("eval_ms") else ""
        log.info("llamachat serve: %s %s: prompt %d tokens (%d cached), %d generated in %.2f s%s, %s",
                 req.kind, job.model.name, prompt_tokens, usage["prompt_tokens_details"]["cached_tokens"],
                 completion_tokens, seconds, rate, finish)
