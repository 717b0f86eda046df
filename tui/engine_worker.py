"""The bridge between a UI and the engine: load a model and run one generation at a time,
from a background thread, handing the text over through a buffer the UI drains at its own pace.

Nothing here imports Textual: the app calls `Engine.load` / `Engine.generate` inside its
`@work(thread=True)` workers and drains `StreamBuffer` on a timer (a handful of UI updates per
second however fast tokens come); the headless chat calls the same methods with a callback that
writes to stdout. `Engine.cancel()` is safe from any thread: the running generation ends within
one token and keeps what it made.

Every failure becomes a `GenerationResult.error` / `EngineError` sentence; a traceback never
reaches the user.
"""

from __future__ import annotations

import atexit
import contextlib

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from llamachat.runtime.errors import UserError

from .conversation import Request


class EngineError(UserError):
    """The engine failed in a way the user should hear about as one sentence."""


def default_llama_factory():
    """The real engine class, imported only when a model is first loaded (keeps start-up quick)."""
    from llamachat.runtime import Llama

    return Llama


def describe_error(err: BaseException) -> str:
    """One sentence for an exception: UserErrors say it themselves; anything else is named."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, MemoryError):
        return "out of memory: try a smaller n_ctx or a smaller model"
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"engine error ({err.__class__.__name__}{': ' + text if text else ''})"


class StreamBuffer:
    """Text pieces from the worker thread, drained by the UI thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._parts: list[str] = []

    def push(self, text: str) -> None:
        if text:
            with self._lock:
                self._parts.append(text)

    def drain(self) -> str:
        with self._lock:
            text = "".join(self._parts)
            self._parts.clear()
        return text


class LoopGuard:
    """Notices a reply that has fallen into a loop: its text ends in the same stretch (a word, a
    phrase, a paragraph) said again and again. Small models do this ("la femme, la femme, ...")
    and would otherwise run on to the end of the context or the reply cap. A short stretch
    counts as a loop once it has come MIN_REPEATS times in a row over at least MIN_SPAN
    characters, so an ordinary table rule, a row of zeros or a repeated line in code does not
    trip it; a stretch of LONG_UNIT characters or more (a sentence, a paragraph) once it has
    come LONG_REPEATS times.

    Only exact repeats count. Near-repeats ("It is a city shaped by its art... It is a city
    shaped by its rivers...") are left to the reply cap: measured by the share of a reply's last
    60 words inside a 4-word run said before, SmolLM2's near-repeating replies reached 0.70,
    but so did an ordinary list ("Lemons are usually yellow, but they can also be green...":
    0.60-0.73), which must not be cut."""

    MIN_REPEATS = 4
    MIN_SPAN = 200  # characters: a few seconds of a looping reply
    LONG_UNIT = 100  # characters: a sentence said three times over is a loop
    LONG_REPEATS = 3
    MAX_UNIT = 1000  # the longest repeated stretch looked for (a paragraph or two)
    CHECK_EVERY = 32  # characters of new text between checks

    def __init__(self):
        self.text = ""
        self._checked = 0

    def feed(self, piece: str) -> bool:
        """Add streamed text; True once the text ends in a loop."""
        self.text += piece
        if len(self.text) - self._checked < self.CHECK_EVERY:
            return False
        self._checked = len(self.text)
        return self.looping(self.text)

    @classmethod
    def looping(cls, text: str) -> bool:
        text = text.rstrip()
        n = len(text)
        for unit in range(1, min(cls.MAX_UNIT, n // min(cls.MIN_REPEATS, cls.LONG_REPEATS)) + 1):
            needed = cls.LONG_REPEATS if unit >= cls.LONG_UNIT else max(cls.MIN_REPEATS, -(-cls.MIN_SPAN // unit))
            if needed * unit > n:
                continue
            tail = text[n - unit:]
            repeats = 1
            while repeats < needed and text[n - (repeats + 1) * unit:n - repeats * unit] == tail:
                repeats += 1
            if repeats >= needed:
                return True
        return False


@dataclass
class GenerationResult:
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" (the chunk's)
    stop_reason: str | None = None  # last_stats: "eos" | "stop" | "length" | "context_full" | "cancelled", or "loop" (LoopGuard)
    cancelled: bool = False
    error: str | None = None
    stats: dict = field(default_factory=dict)
    n_tokens: int = 0
    n_ctx: int = 0
    seconds: float = 0.0
    stop_text: str | None = None  # which stop string ended it, when the engine lets us tell

    @property
    def tokens_per_second(self) -> float | None:
        n = self.stats.get("completion_tokens")
        ms = self.stats.get("eval_ms")
        if n and ms:
            return n * 1000.0 / ms
        return None


class Engine:
    """One model at a time; `load` and `generate` block, so call them from a worker thread.
    Generation goes through the typed seam of tui/backends.py (`self.backend`)."""

    def __init__(self, llama_factory: Callable | None = None):
        self._factory = llama_factory
        self.llm = None
        self.backend = None
        self.model_path = None
        self.load_kwargs: dict = {}
        self._cancel = threading.Event()
        self._lock = threading.Lock()  # one engine call at a time
        self.pending_seed: int | None = None  # a seed set since the last reply: applied once
        # instant resume (tui/resume.py): where chats' KV caches are saved (None: not at all),
        # the chat whose tokens the KV cache holds now, and what its file holds already
        self.resume = None
        self.state_key: int | None = None
        self._saved_tokens: list[int] | None = None
        self.last_resume: int | None = None  # tokens the last reply took from a saved state
        self._warm_pending = None  # the Llama whose warm-up `load` left to `warm_up_later`

    @property
    def loaded(self) -> bool:
        return self.backend is not None

    def load(self, model_path, progress: Callable[[float], None] | None = None, *, defer_warm: bool = False,
             **kwargs) -> None:
        """(Re-)create the Llama for `model_path` with these keywords, then run the kernels once
        (compiling them on a first run, while the user types, not after they press Enter);
        raises EngineError/UserError. defer_warm: when numba's cache already holds the model's
        kernels, leave that run to `warm_up_later` (the app calls it once it shows the model
        ready: the kernels' cache loads and a few evaluations, about half a second of a warm
        start, then happen while the user types)."""
        real = self._factory is None
        factory = self._factory or default_llama_factory()
        hold = contextlib.nullcontext()
        if real:
            from .compile_progress import WATCH

            WATCH.install()
            hold = WATCH.holding()  # loading and warming up are one wait: its notice stays up
        with hold, self._lock:
            self._save_state_locked()  # the chat's context, before the model goes
            self.state_key, self._saved_tokens = None, None
            old, self.llm, self.backend = self.backend, None, None  # free the old model (and its KV cache) first
            if old is not None:
                try:
                    old.close()
                except Exception:
                    pass
            try:
                self.llm = factory(str(model_path), progress=progress, verbose=False, **kwargs)
            except UserError:
                raise
            except FileNotFoundError as err:
                raise UserError(f"{model_path}: file not found ({err.strerror or err})") from None
            except Exception as err:  # an engine bug must not kill the UI: one sentence instead
                raise EngineError(f"{model_path}: cannot load the model: {describe_error(err)}") from None
            from .backends import backend_for

            self.backend = backend_for(self.llm)
            self.model_path = model_path
            self.load_kwargs = dict(kwargs)
            if real:
                from .compile_progress import model_is_warm

                try:  # the chat template made here, not on the UI thread when the context meter first counts
                    self.llm.chat_template  # (importing jinja2 and compiling: a tenth of a warm start)
                except Exception:  # noqa: BLE001 - it says so where the chat uses it, as before
                    pass
                if defer_warm and model_is_warm(self.llm):
                    self._warm_pending = self.llm
                else:
                    warm_up(self.llm)

    def warm_up_later(self) -> threading.Thread | None:
        """Run the warm-up a `load(defer_warm=True)` left, in a daemon thread under the engine's
        lock (returned; None when there is none to run), unless a reply (or another model) took
        the engine first: a reply loads the same kernels itself, and warm_up empties the KV cache
        a reply has filled."""
        llm = self._warm_pending
        if llm is None:
            return None

        def run() -> None:
            with self._lock:
                if self._warm_pending is llm and self.llm is llm:
                    self._warm_pending = None
                    warm_up(llm)

        thread = threading.Thread(target=run, name="llamachat-warm-up", daemon=True)
        thread.start()
        return thread

    def load_entry(self, entry, progress: Callable[[float], None] | None = None, *, defer_warm: bool = False,
                   **kwargs) -> None:
        """Load a library entry: a local model file (`load`), or connect to a remote one
        (checks the server and the model; RemoteError in one sentence)."""
        if not getattr(entry, "remote", False):
            return self.load(entry.path, progress=progress, defer_warm=defer_warm, **kwargs)
        from .remote_backend import RemoteBackend

        backend = RemoteBackend(entry.base_url, entry.model, api_key_env=entry.api_key_env, name=entry.name)
        try:
            backend.connect()
        except BaseException:
            backend.close()
            raise
        if progress is not None:
            progress(1.0)
        self.use_backend(backend, entry.name)
        self.load_kwargs = dict(kwargs)

    def use_backend(self, backend, name=None) -> None:
        """Drive `backend` (e.g. a remote one) instead of a local model."""
        with self._lock:
            self._save_state_locked()
            self.state_key, self._saved_tokens = None, None
            old, self.llm, self.backend = self.backend, None, backend
            if old is not None:
                try:
                    old.close()
                except Exception:
                    pass
            self.model_path = name
            self.load_kwargs = {}

    def n_ctx(self) -> int:
        try:
            return int(self.backend.n_ctx()) if self.backend is not None else 0
        except Exception:
            return 0

    def n_tokens(self) -> int:
        try:
            return int(self.backend.n_tokens()) if self.backend is not None else 0
        except Exception:
            return 0

    def count_tokens(self, request: Request) -> int | None:
        """How many tokens `request` fills the context with (its prompt, template included), or
        None if the engine cannot tell. Tokenizing only: no generation, no lock needed."""
        backend = self.backend
        if backend is None:
            return None
        try:
            return backend.count_tokens(request.messages, None if request.messages is not None else request.prompt)
        except Exception:  # an engine without a template (a stand-in) or a text it cannot encode
            return None

    def metadata(self) -> dict:
        try:
            return dict(self.backend.metadata() or {}) if self.backend is not None else {}
        except Exception:
            return {}

    def take_notice(self) -> str | None:
        """A one-time notice for the user (the model's chat template was refused and a built-in
        format is used instead), or None."""
        try:
            return self.backend.take_notice() if self.backend is not None else None
        except Exception:
            return None

    def cancel(self) -> None:
        """Stop the running generation (any thread). It keeps the text made so far."""
        self._cancel.set()
        backend = self.backend
        if backend is not None:
            try:
                backend.cancel()
            except Exception:
                pass

    # -- instant resume: a chat's KV cache saved when it is left, loaded when it comes back --

    def _resumable(self):
        """The engine's Llama if its state can be saved (a local model) and saving is on."""
        llm, resume = self.llm, self.resume
        if resume is None or resume.budget_bytes <= 0 or not callable(getattr(llm, "save_state", None)):
            return None
        return llm

    def save_state(self) -> int:
        """Save the KV cache of the chat it holds (`state_key`) to its file, if it changed since
        it was saved or loaded, then keep the folder within its budget; the bytes written.
        Blocks: call from a worker thread. Never raises (a failure only loses the shortcut)."""
        with self._lock:
            return self._save_state_locked()

    def _save_state_locked(self) -> int:
        llm, key = self._resumable(), self.state_key
        if llm is None or key is None:
            return 0
        try:
            tokens = list(llm.generator.cache_tokens)
            if not tokens or tokens == self._saved_tokens:
                return 0
            from llamachat.runtime.model import kv_state

            data = llm.save_state().llama_state
            if not self.resume.fits(len(data)):
                return 0  # bigger than the whole budget
            path = self.resume.path_for(key)
            kv_state.write_file(path, data)
            self._saved_tokens = tokens
            self.resume.evict(keep=path)
            return len(data)
        except (OSError, UserError, MemoryError):
            return 0

    def _resume_locked(self, chat_key: int | None) -> None:
        """Before a reply for chat `chat_key`: if the KV cache holds another chat, save that one
        and load this chat's saved state (refused when made for another model file, n_ctx or
        engine: the prompt is then processed as usual)."""
        self.last_resume = None
        if chat_key == self.state_key:
            return
        self._save_state_locked()
        self.state_key, self._saved_tokens = chat_key, None
        llm = self._resumable()
        if llm is None or chat_key is None:
            return
        path = self.resume.path_for(chat_key)
        if not path.is_file():
            return
        from llamachat.runtime.model.kv_state import StateError, StateMismatch

        try:
            n = llm.load_state_file(path)
        except StateMismatch:
            return  # made for another model or context: left for when that comes back
        except (StateError, OSError, MemoryError):
            self.resume.remove(chat_key)  # damaged or unreadable: never of use
            return
        self._saved_tokens = list(llm.generator.cache_tokens)
        self.last_resume = n
        self.resume.touch(path)

    def forget_state(self, chat_key: int) -> None:
        """A chat was deleted: its saved state goes too."""
        if self.resume is not None:
            self.resume.remove(chat_key)
        if self.state_key == chat_key:
            self.state_key, self._saved_tokens = None, None

    def generate(self, request: Request, sampling: dict, on_text: Callable[[str], None],
                 logit_bias: dict | None = None, context_shift: bool | None = None,
                 chat_key: int | None = None) -> GenerationResult:
        """Run one generation, streaming text pieces to `on_text`; never raises. `sampling`:
        the Llama-call keywords of conversation.call_kwargs; `context_shift`: shift a full
        context instead of stopping (None: as the model was loaded); `chat_key`: the saved chat
        it continues (its saved KV cache is loaded first when the cache holds another chat)."""
        from .backends import GenerationRequest, TextPiece, params_from_call

        result = GenerationResult()
        if self.backend is None:
            result.error = "no model is loaded"
            return result
        self._cancel.clear()
        start = time.perf_counter()
        pieces: list[str] = []
        guard = LoopGuard()
        looped = False
        with self._lock:
            backend = self.backend
            self._warm_pending = None  # this reply loads the kernels; a warm-up after it would empty its context
            try:
                self._resume_locked(chat_key)
            except Exception:  # noqa: BLE001 - only the shortcut is lost: the prompt is processed as usual
                self.state_key, self._saved_tokens = chat_key, None
            try:
                params = params_from_call(dict(sampling, seed=self.pending_seed), logit_bias)
                max_tokens = sampling.get("max_tokens")
                greq = GenerationRequest(
                    messages=tuple(request.messages) if request.messages is not None else None,
                    prompt=request.prompt if request.messages is None else None,
                    params=params, n_predict=max_tokens if max_tokens and max_tokens > 0 else -1,
                    stop=tuple(request.stop or ()), continue_stream=self.pending_seed is None,
                    context_shift=context_shift)
                for event in backend.stream(greq):
                    if isinstance(event, TextPiece):
                        pieces.append(event.text)
                        on_text(event.text)
                        if not looped and guard.feed(event.text):
                            looped = True
                            backend.cancel()  # ends within a token; the user did not ask, so not _cancel
                    else:
                        s = event.stats
                        result.stats = s.as_dict()
                        result.stop_reason = s.stop_reason or None
                        result.stop_text = s.stop_text
                        if s.n_ctx:
                            result.n_ctx = int(s.n_ctx)
                self.pending_seed = None
            except Exception as err:
                result.error = describe_error(err)
            result.seconds = time.perf_counter() - start
            result.n_tokens = self.n_tokens()
            result.n_ctx = self.n_ctx() or result.n_ctx
        result.text = "".join(pieces)
        result.finish_reason = {"eos": "stop", "context_full": "length"}.get(result.stop_reason or "", result.stop_reason)
        result.cancelled = self._cancel.is_set() or result.stop_reason == "cancelled"
        if looped and not self._cancel.is_set():
            result.stop_reason, result.cancelled = "loop", False
        return result

    def close(self) -> None:
        self.cancel()
        with self._lock:
            self._save_state_locked()
            self.state_key, self._saved_tokens = None, None
            self.backend, self.llm = None, None


def warm_up(llm, sizes: tuple[int, ...] | None = None) -> None:
    """Evaluate a few tokens the ways a chat will (by default: a long prompt, a short one, one
    token at a time; `sizes` says how many tokens each time), so every kernel the model's
    formats need is compiled or read from numba's cache now; then empty the KV cache. The
    model's sampler and random stream are not touched. Warm, it costs a fraction of a second; a failure
    here is left for the first reply to report.

    Cold (a first run, a format's first use), a second process (tui/compile_ahead) compiles a
    prompt's per-token passes and half of its batch products, then the one-token decode kernels,
    then the tiled prompt kernels where a shorter prompt size comes first, while this one
    compiles the kernels both share, the samplers and the other half of the products; this one
    then waits for the helper's prompt kernels and runs its prompt sizes. It does not wait for
    the decode kernels: until the helper has them in the cache the model decodes through the
    prompt kernels (LlamaModel.defer_decode; the same floats), and the helper writes the
    model's `.warm` note once they are there. The tiled kernels may still be compiling in the
    helper when the first long prompt comes: it reads them from the cache if the helper has
    finished, else compiles them itself."""
    model = getattr(llm, "model", None)
    if model is None or not hasattr(model, "eval"):
        return
    helper = None
    try:
        from llamachat.runtime.model.forward import FA_TILE_Q
        from llamachat.runtime.model.model import one_thread

        from .compile_progress import WATCH, model_is_warm, note_warm

        sizes = sizes or (FA_TILE_Q, 8, 1)  # the tiled prompt path, the small-batch path, decode
        ids = sample_tokens(llm, max(sizes))
        room = int(model.n_ctx)
        sizes = tuple(n for n in sizes if n <= room)
        order = sizes
        cold = not model_is_warm(llm)
        if 1 in sizes and len(sizes) > 1 and cold:
            here = [n for n in sizes if 1 < n < FA_TILE_Q] or [n for n in sizes if n > 1]
            from . import compile_ahead

            helper = compile_ahead.start(llm, (1,) + tuple(n for n in sizes if n > 1 and n not in here))
            if helper is not None:
                atexit.register(helper.release)  # (it finishes the decode kernels, then ends)
                order = tuple(here) + (1,)
        with WATCH.holding():  # the notice stays up between two kernels until the warm-up ends
            if helper is not None:
                from llamachat.runtime.model.forward import compile_products, compile_shared_kernels

                from .compile_ahead import PROMPT

                try:
                    compile_shared_kernels(model.config, model.weights)  # here, first: the helper's decode reads them
                finally:
                    helper.go()
                warm_sampler(model.config.n_vocab)  # while the helper compiles a prompt's passes
                compile_products(model.weights, part=0)  # and the helper part 1
                with WATCH.elsewhere("a prompt's kernels, in a second process"):
                    helper.wait_for(PROMPT, timeout=600)
                decoded = threading.Event()  # (set too when the helper fails: decode then compiles here)
                model.defer_decode(decoded)
                helper.when_done(1, lambda _: decoded.set())  # (the helper notes the model warm)
            # with a helper: on one thread (the other core compiles; a parallel step would wait for
            # its second thread each time), the one-token step through the prompt kernels
            with one_thread() if helper is not None else contextlib.nullcontext():
                for n in order:
                    model.eval(ids[:n], logits="last")
                    llm.reset()
                    if n == 1 and helper is None:
                        warm_sampler(model.config.n_vocab)
        if cold and helper is None:
            note_warm(llm)  # the next start finds the kernels cached and starts no helper
    except Exception:  # noqa: BLE001 - the first reply meets the same problem and names it
        pass
    finally:
        try:
            llm.reset()
        except Exception:
            pass


def sample_tokens(llm, n: int) -> list[int]:
    """n tokens of ordinary text (a sentence repeated, BOS first) to run kernels on."""
    sample = llm.tokenize(b"The quick brown fox jumps over the lazy dog, then rests a while. ", add_bos=True)
    return (sample * (n // max(1, len(sample)) + 1))[:n]


def warm_sampler(n_vocab: int) -> None:
    """Sample once from made-up logits with the default settings and greedily (fresh samplers:
    no conversation's state is touched), so the first reply does not compile the sampling
    kernels between its prompt and its first word (5 s cold, the partial sort)."""
    import numpy as np

    from llamachat.runtime.generation.sampling import Sampler
    from llamachat.runtime.params import SamplingParams

    logits = np.linspace(-4.0, 4.0, n_vocab, dtype=np.float32)
    for params in (SamplingParams(seed=1), SamplingParams(seed=1, temp=0.0)):
        Sampler(params, n_vocab).sample(logits)


def quant_name(metadata: dict) -> str:
    """The quantization of a model as llama.cpp names it (from general.file_type), or ''."""
    ftype = metadata.get("general.file_type")
    if ftype is None:
        return ""
    try:
        from llamachat.runtime.gguf.constants import LlamaFileType

        name = LlamaFileType(int(ftype)).name
    except Exception:
        return str(ftype)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")
