"""`Llama`: llama-cpp-python's high-level API on llamachat's engine.

A program written for llama-cpp-python runs with only its import changed:

    from llamachat.runtime import Llama
    llm = Llama(model_path=PATH, n_ctx=512, n_batch=126)
    out = llm(prompt, max_tokens=256, temperature=0.1, top_p=0.5, echo=False, stop=["#"])
    out["choices"][0]["text"]

Owns the call signatures and the response shapes (completion dicts and stream chunks, chat
completions through the model's chat template, embeddings), the mapping of llama-cpp-python's
argument names onto runtime.params.SamplingParams, and the per-instance state: the model with
its KV cache (kept between calls, so a chat turn only evaluates its new tokens), the tokenizer
and the statistics of the last call.

llama-cpp-python's low-level loop is here too: eval(tokens) / sample(...) / generate(tokens)
over the same KV cache, with input_ids, and with logits_all=True every position's logits in
`scores` (then create_completion(logprobs=N) answers logprobs; without it, it refuses as
llama-cpp-python does). With embedding=True, embed / create_embedding give the final-norm
hidden states pooled as llama.cpp does (pooling_type NONE/MEAN/CLS/LAST, default from the GGUF).
The constructor accepts and ignores llama-cpp-python's options that mean nothing here
(n_gpu_layers, use_mlock, ...). The completion methods take llama-cpp-python 0.3's parameters
in its order; those this engine does not implement (grammar, suffix, tools, chat logprobs, ...)
warn once per Llama when given a value that would do something, and a keyword llama-cpp-python
does not know either is a TypeError, as in Python: a misspelt setting must not pass unnoticed.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
import warnings
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import UserError
from .generate import GenerationStats, Generator
from ..params import SamplingParams
from .sampling import Sampler

# llama.cpp's enum llama_pooling_type (llama-cpp-python's LLAMA_POOLING_TYPE_*); RANK is for rerankers
LLAMA_POOLING_TYPE_UNSPECIFIED, LLAMA_POOLING_TYPE_NONE, LLAMA_POOLING_TYPE_MEAN = -1, 0, 1
LLAMA_POOLING_TYPE_CLS, LLAMA_POOLING_TYPE_LAST = 2, 3
POOLING_NAMES = {"none": 0, "mean": 1, "cls": 2, "last": 3}

# generate's stop reasons -> llama-cpp-python's finish_reason
FINISH_REASON = {"eos": "stop", "stop": "stop", "length": "length", "context_full": "length", "cancelled": "cancelled"}


def _off(value) -> bool:
    return value is None


def _no_list(value) -> bool:
    return not value  # None or an empty list


def _no_tool_choice(value) -> bool:
    return value in (None, "none", "auto")  # with no tools given, nothing to choose


# llama-cpp-python 0.3 parameters this engine does not implement -> whether a value leaves it off
UNIMPLEMENTED_COMPLETION = {
    "suffix": _off, "tfs_z": lambda v: v == 1.0, "stopping_criteria": _off,
    "logits_processor": _off, "grammar": _off,
}
UNIMPLEMENTED_CHAT = {
    "functions": _no_list, "function_call": _no_tool_choice, "tools": _no_list, "tool_choice": _no_tool_choice,
    "response_format": lambda v: v is None or v == {"type": "text"}, "tfs_z": lambda v: v == 1.0,
    "logits_processor": _off, "grammar": _off,
}


def sampling_params(temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, typical_p=1.0, repeat_penalty=1.0,
                    repeat_last_n=64, presence_penalty=0.0, frequency_penalty=0.0, mirostat_mode=0,
                    mirostat_tau=5.0, mirostat_eta=0.1, seed=-1, logit_bias=None, ignore_eos=False) -> SamplingParams:
    """llama-cpp-python's argument names -> SamplingParams, each value checked (UserError)."""
    if temperature is not None and temperature < 0:
        temperature = 0.0  # llama.cpp: a negative temperature is greedy too
    values = dict(temp=temperature, top_p=top_p, top_k=top_k, min_p=min_p, typical_p=typical_p,
                  repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
                  frequency_penalty=frequency_penalty, mirostat=mirostat_mode, mirostat_tau=mirostat_tau,
                  mirostat_eta=mirostat_eta, seed=seed)
    try:
        params = SamplingParams().updated(**values)
    except ValueError as err:
        raise UserError(str(err)) from None
    return params.updated(logit_bias=_logit_bias(logit_bias), ignore_eos=bool(ignore_eos))


def _logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """{token: bias} (keys may be strings, as in JSON) or [(token, bias), ...]."""
    if not bias:
        return ()
    items = bias.items() if isinstance(bias, dict) else bias
    out = []
    for item in items:
        try:
            token, value = item
            out.append((int(token), float(value)))
        except (TypeError, ValueError):
            raise UserError(f"logit_bias entries must be token id -> number, got {item!r}") from None
    return tuple(out)


def _pooling_type(value, metadata: dict) -> int:
    """The pooling a Llama(embedding=True, pooling_type=...) uses: the value given (a
    LLAMA_POOLING_TYPE_* number or its name), else the GGUF's `{arch}.pooling_type`, else NONE,
    llama.cpp's default for a llama model (one embedding per token)."""
    if isinstance(value, str) and value.lower() in POOLING_NAMES:
        return POOLING_NAMES[value.lower()]
    if value is None or value == LLAMA_POOLING_TYPE_UNSPECIFIED:
        arch = metadata.get("general.architecture", "llama")
        value = metadata.get(f"{arch}.pooling_type", LLAMA_POOLING_TYPE_NONE)
        if value not in POOLING_NAMES.values():  # e.g. RANK from a reranker's file
            raise UserError(f"the model's {arch}.pooling_type is {value!r}; llamachat pools with none (0), mean (1), "
                            "cls (2) or last (3): give pooling_type=")
        return int(value)
    if isinstance(value, bool) or value not in POOLING_NAMES.values():
        raise UserError(f"pooling_type must be one of none (0), mean (1), cls (2) or last (3), not {value!r}")
    return int(value)


class LlamaTokenizer:
    """llama-cpp-python's LlamaTokenizer (what Llama.tokenizer() returns)."""

    def __init__(self, llama: "Llama"):
        self._model = llama

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        return self._model.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int], prev_tokens=None, special: bool = False) -> bytes:
        return self._model.detokenize(tokens, special=special)

    def encode(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.tokenize(text.encode("utf-8", errors="ignore"), add_bos=add_bos, special=special)

    def decode(self, tokens: list[int]) -> str:
        return self.detokenize(tokens).decode("utf-8", errors="ignore")


class _TokenizerAttribute:
    """`Llama.tokenizer`: called, llama-cpp-python's method (a LlamaTokenizer); otherwise the
    engine's Tokenizer, whose attributes llamachat's own callers (oneshot, the app) read."""

    def __init__(self, llama: "Llama", tokenizer):
        self._llama = weakref.ref(llama)
        self._tokenizer = tokenizer

    def __call__(self) -> LlamaTokenizer:
        return LlamaTokenizer(self._llama())

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _normalized(v: np.ndarray) -> list[float]:
    """llama-cpp-python's normalize_embedding: v / |v| (a zero vector stays)."""
    v = np.asarray(v, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    return (v / norm if norm != 0.0 else v).tolist()


def timing_lines(load_ms: float, stats: GenerationStats) -> list[str]:
    """llama.cpp's llama_perf_context_print lines for one run."""
    def rate(ms, n):
        return (f"({ms / n:8.2f} ms per token, {n * 1e3 / ms:8.2f} tokens per second)"
                if n and ms > 0 else "(     n/a ms per token,      n/a tokens per second)")
    total_ms = stats.prompt_ms + stats.eval_ms + stats.sample_ms
    name = "llama_perf_context_print"
    return [
        f"llama_perf_sampler_print:    sampling time = {stats.sample_ms:10.2f} ms / {stats.sample_runs:5d} runs   "
        + rate(stats.sample_ms, stats.sample_runs),
        f"{name}:        load time = {load_ms:10.2f} ms",
        f"{name}: prompt eval time = {stats.prompt_ms:10.2f} ms / {stats.prompt_eval_tokens:5d} tokens "
        + rate(stats.prompt_ms, stats.prompt_eval_tokens),
        f"{name}:        eval time = {stats.eval_ms:10.2f} ms / {stats.eval_runs:5d} runs   "
        + rate(stats.eval_ms, stats.eval_runs),
        f"{name}:       total time = {total_ms:10.2f} ms / {stats.prompt_eval_tokens + stats.eval_runs:5d} tokens",
    ]


class LlamaState:
    """A Llama's evaluation state as llama-cpp-python's save_state returns it: the cached
    tokens (input_ids, n_ctx long), their scores, the seed, and `llama_state`, the KV rows and
    what they depend on (runtime/model/kv_state.py's bytes; `llama_state_size` of them)."""

    def __init__(self, input_ids: np.ndarray, scores: np.ndarray, n_tokens: int, llama_state: bytes,
                 llama_state_size: int, seed: int):
        self.input_ids = input_ids
        self.scores = scores
        self.n_tokens = n_tokens
        self.llama_state = llama_state
        self.llama_state_size = llama_state_size
        self.seed = seed


class Llama:
    """A loaded model you can complete text and chats with (llama-cpp-python's `Llama`)."""

    def __init__(self, model_path: str | Path, n_ctx: int = 512, n_threads: int | None = None, seed: int = -1,
                 verbose: bool = False, n_batch: int = 512, chat_format: str | None = None,
                 context_shift: bool = False, n_keep: int = 0, progress=None, embedding: bool = False,
                 pooling_type: int = LLAMA_POOLING_TYPE_UNSPECIFIED, logits_all: bool = False, isa: str | None = None,
                 **ignored: Any):
        from ..gguf.reader import GGUFFile
        from ..model.model import load_model, trained_context_length
        from ..thread_env import apply_thread_env
        from ..tokenizer.tokenizer import Tokenizer

        apply_thread_env()  # before load_model starts numba's OpenMP threads

        t0 = time.perf_counter()
        if isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed <= 0xFFFFFFFF:
            raise UserError(f"seed must be -1 (random) or between 0 and {0xFFFFFFFF}, got {seed!r}")
        gguf = GGUFFile(str(model_path))
        try:
            tokenizer = Tokenizer.from_gguf(gguf)
            if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx == 0:
                # llama-cpp-python: n_ctx=0 means the context the model was trained with
                n_ctx = trained_context_length(gguf)
            model = load_model(gguf, n_ctx=n_ctx, n_threads=n_threads, n_batch=n_batch, progress=progress, isa=isa)
        except BaseException:
            gguf.close()
            raise
        self._setup(model, tokenizer, gguf, str(model_path), n_threads=n_threads, seed=seed, verbose=verbose,
                    chat_format=chat_format, context_shift=context_shift, n_keep=n_keep, embedding=embedding,
                    pooling_type=pooling_type, logits_all=logits_all)
        self.load_ms = (time.perf_counter() - t0) * 1e3
        if verbose:
            for warning in getattr(self.model, "warnings", []):
                print(f"llamachat: warning: {warning}", file=sys.stderr)

    @classmethod
    def from_model(cls, model, tokenizer, model_path: str = "", chat_template=None, **options) -> "Llama":
        """A Llama over an already loaded model and tokenizer (options as for the constructor)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, None, model_path or str(getattr(model, "path", "")), **options)
        self._chat_template = chat_template
        return self

    def _setup(self, model, tokenizer, gguf, model_path: str, n_threads=None, seed: int = -1, verbose: bool = False,
               chat_format=None, context_shift: bool = False, n_keep: int = 0, embedding: bool = False,
               pooling_type: int = LLAMA_POOLING_TYPE_UNSPECIFIED, logits_all: bool = False) -> None:
        self.model_path = model_path
        self.model = model
        self._tok = tokenizer
        self.tokenizer = _TokenizerAttribute(self, tokenizer)
        self.seed = seed
        self.verbose = verbose
        self.chat_format = chat_format
        self.context_shift = context_shift
        self.n_keep = n_keep
        self._gguf = gguf
        self.generator = Generator(model, tokenizer, n_threads=n_threads)
        self._chat_template = None
        self._lock = threading.Lock()
        self._active = None  # (iterator, thread id) of the generation in progress
        md = gguf.metadata if gguf is not None else getattr(model, "metadata", {}) or {}
        self.metadata = {k: v for k, v in md.items() if isinstance(v, (str, int, float, bool))}
        self.load_ms = 0.0
        self.last_stats: dict | None = None
        self._warned: set[str] = set()  # unimplemented keywords already warned about
        # the low-level API (eval / sample / generate / embed), as llama-cpp-python keeps it
        self.n_batch = min(model.n_batch, model.n_ctx)
        self._logits_all = bool(logits_all)
        self._embedding = bool(embedding)
        self._pooling = _pooling_type(pooling_type, self.metadata) if embedding else LLAMA_POOLING_TYPE_UNSPECIFIED
        # llama-cpp-python: every position's logits with logits_all, else a batch's worth (unused
        # there since sampling moved into llama.cpp); np.empty maps pages only when written
        self.scores = np.empty((model.n_ctx if logits_all else self.n_batch, tokenizer.n_vocab), np.float32)
        self._last_logits: np.ndarray | None = None  # of the last evaluated token (sample's default)
        self._sampler = None  # generate()'s sampler while it runs (sample() builds its own otherwise)
        self._sample_rng = None  # the random stream sample() continues while the seed stays

    # -- small things ----------------------------------------------------------------------------

    def n_ctx(self) -> int:
        return self.model.n_ctx

    @property
    def n_tokens(self) -> int:
        """Tokens now in the KV cache."""
        return self.generator.n_tokens

    @n_tokens.setter
    def n_tokens(self, n: int) -> None:
        """As llama-cpp-python: lowering it forgets the later positions (the next eval overwrites them)."""
        n = int(n)
        gen = self.generator
        gen._sync()
        if not 0 <= n <= len(gen.cache_tokens):
            raise ValueError(f"n_tokens can only go down, to 0..{len(gen.cache_tokens)}, not {n}")
        if n < len(gen.cache_tokens):
            self.model.truncate(n)
            del gen.cache_tokens[n:]
            self._last_logits = self.scores[n - 1].copy() if self._logits_all and n else None

    def n_vocab(self) -> int:
        return self._tok.n_vocab

    def n_embd(self) -> int:
        return self.model.config.n_embd

    def token_bos(self) -> int:
        return self._tok.bos_id

    def token_eos(self) -> int:
        return self._tok.eos_id

    def token_nl(self) -> int:
        """llama.cpp's linefeed token: SPM's <0x0A> byte token, else what "\n" encodes to
        (WordPiece has none: its padding token, as llama.cpp)."""
        tok = self._tok
        if tok.vocab_type == "spm":
            nl = tok.token_id("<0x0A>")
        elif tok.vocab_type == "bpe":
            ids = tok.encode("\n", add_special=False)
            nl = ids[0] if ids else None
        else:
            nl = None
        return tok.pad_id if nl is None else nl

    def pooling_type(self) -> int:
        """llama.cpp's pooling type of the embeddings (LLAMA_POOLING_TYPE_*; -1 without embedding=True)."""
        return self._pooling

    def set_seed(self, seed: int) -> None:
        """The seed of the next samplers (sample, generate and the completions without a seed of their own)."""
        if isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed <= 0xFFFFFFFF:
            raise UserError(f"seed must be -1 (random) or between 0 and {0xFFFFFFFF}, got {seed!r}")
        self.seed = seed
        self._sample_rng = None

    def reset(self) -> None:
        """Empty the KV cache (the next call evaluates its whole prompt)."""
        self.generator.reset()
        self._last_logits = None

    def cancel(self) -> None:
        """From any thread: the running generation ends within one token and keeps its text."""
        self.generator.cancel()

    def close(self) -> None:
        self.cancel()
        with self._lock:
            self.model.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- saved states (llama-cpp-python's save_state / load_state; files for instant resume) ---

    def save_state(self) -> LlamaState:
        """The tokens in the KV cache with their keys and values (only the used rows) and the
        model, context and engine they were made with."""
        from ..model import kv_state

        self._end_own_stream()
        with self._lock:
            gen = self.generator
            gen._sync()
            tokens = list(gen.cache_tokens)
            logits = self._last_logits if tokens else None
            data = kv_state.encode(self.model, tokens, logits)
        return LlamaState(input_ids=self.input_ids.copy(), scores=self._scores.copy(), n_tokens=len(tokens),
                          llama_state=data, llama_state_size=len(data), seed=self.seed)

    def load_state(self, state: LlamaState) -> None:
        """Put a saved state back: the next call reuses its tokens as a cached prefix.
        kv_state.StateMismatch (a UserError saying what changed) if it was made for another
        model file, n_ctx or engine; the cache is then left as it was."""
        from ..model import kv_state

        data = memoryview(state.llama_state)[:int(state.llama_state_size)]
        self._restore(kv_state.decode(data), state.scores, state.seed)

    def save_state_file(self, path) -> int:
        """Write save_state()'s rows to `path` atomically (a crash leaves the old file or
        none); the bytes written."""
        from ..model import kv_state

        data = self.save_state().llama_state
        kv_state.write_file(path, data)
        return len(data)

    def load_state_file(self, path) -> int:
        """Load a state written by save_state_file (refused as load_state refuses; StateError
        for a damaged file); the number of tokens now cached."""
        from ..model import kv_state

        saved = kv_state.read_file(path, self.model)
        self._restore(saved, None, self.seed)
        return saved.n_tokens

    def _restore(self, saved, scores, seed: int) -> None:
        self._end_own_stream()
        gen = self.generator
        with self._lock:
            tokens, logits = saved.load_into(self.model)  # checks before it changes anything
            gen.cache_tokens = tokens
        n = len(tokens)
        if scores is not None and scores.ndim == 2 and scores.shape[1] == self.scores.shape[1]:
            rows = min(len(scores), len(self.scores))
            self.scores[:rows] = scores[:rows]
        if self._logits_all and logits is None and n and scores is not None and len(scores) >= n:
            logits = self.scores[n - 1].copy()
        self._last_logits = logits
        self.seed = seed
        self._sample_rng = None

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._tok.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens=None, special: bool = False) -> bytes:
        return self._tok.decode_bytes(tokens, special)

    # -- the low-level loop (llama-cpp-python's eval / sample / generate) -------------------------

    @property
    def input_ids(self) -> np.ndarray:
        """The tokens in the KV cache, in llama-cpp-python's n_ctx-long buffer (np.intc; only
        the first n_tokens mean anything). A copy: set n_tokens to forget positions."""
        ids = np.zeros(self.model.n_ctx, np.intc)
        cached = self.generator.cache_tokens
        ids[:len(cached)] = cached
        return ids

    @property
    def _input_ids(self) -> np.ndarray:
        return self.input_ids[:self.n_tokens]

    @property
    def _scores(self) -> np.ndarray:
        return self.scores[:self.n_tokens, :]

    @property
    def eval_tokens(self) -> deque:
        return deque(self.generator.cache_tokens, maxlen=self.model.n_ctx)

    @property
    def eval_logits(self) -> deque:
        """Rows of `scores` for the cached tokens (filled by eval with logits_all=True)."""
        return deque(self.scores[:self.n_tokens, :].tolist(), maxlen=self.model.n_ctx if self._logits_all else 1)

    @staticmethod
    def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
        """How many leading tokens a and b share."""
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n

    @staticmethod
    def logits_to_logprobs(logits, axis: int = -1) -> np.ndarray:
        """log_softmax in float32, as llama-cpp-python computes it (non-finite maxima count as 0)."""
        logits_maxs = np.amax(logits, axis=axis, keepdims=True)
        if logits_maxs.ndim > 0:
            logits_maxs[~np.isfinite(logits_maxs)] = 0
        elif not np.isfinite(logits_maxs):
            logits_maxs = 0
        subtract_maxs = np.subtract(logits, logits_maxs, dtype=np.single)
        exp = np.exp(subtract_maxs)
        with np.errstate(divide="ignore"):
            summed = np.sum(exp, axis=axis, keepdims=True)
            out = np.log(summed)
        return subtract_maxs - out

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate tokens after the n_tokens already cached (their logits go to `scores` with
        logits_all=True; the last token's are what sample() draws from)."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return
        self._end_own_stream()
        gen = self.generator
        with self._lock:
            gen._sync()
            start = len(gen.cache_tokens)
            try:
                out = self.model.eval(tokens, logits="all" if self._logits_all else "last")
            except BaseException:
                if self.model.n_past > start:  # an interrupted chunk may leave a half-written position
                    self.model.truncate(start)
                raise
            gen.cache_tokens.extend(tokens)
        if self._logits_all:
            self.scores[start:start + len(tokens), :] = out
            self._last_logits = out[-1]
        else:
            self._last_logits = out

    def _sampler_for(self, top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty,
                     presence_penalty, mirostat_mode, mirostat_eta, mirostat_tau, grammar) -> Sampler:
        """llama-cpp-python's _init_sampler on the engine's sampler chain: temp < 0 draws from
        the plain softmax, temp == 0 is greedy; penalties over the last 64 sampled tokens."""
        self._warn_unimplemented("sample", {"grammar": _off}, {"grammar": grammar})
        if temp is not None and temp < 0:
            top_k, top_p, min_p, typical_p, temp, mirostat_mode = 0, 1.0, 0.0, 1.0, 1.0, 0
        params = sampling_params(temp, top_p, top_k, min_p, typical_p, repeat_penalty, 64, presence_penalty,
                                 frequency_penalty, mirostat_mode, mirostat_tau, mirostat_eta, self.seed)
        sampler = Sampler(params, self._tok.n_vocab, self._tok.eog_ids, self.model.n_ctx, rng=self._sample_rng)
        self._sample_rng = sampler.rng  # a fixed seed's stream goes on across calls, as llama.cpp seeds once
        return sampler

    def _logits_at(self, idx: int | None) -> np.ndarray:
        if self.n_tokens == 0 or self._last_logits is None:
            raise UserError("sample: no logits to sample from; call eval(tokens) first")
        if idx is None or idx == self.n_tokens - 1:
            return self._last_logits
        if not self._logits_all:
            raise UserError("sample(idx=...) other than the last token needs the Llama created with logits_all=True")
        if not 0 <= idx < self.n_tokens:
            raise UserError(f"sample: idx {idx} is not an evaluated position (0..{self.n_tokens - 1})")
        return self.scores[idx]

    @staticmethod
    def _processed(logits_processor, input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if logits_processor is None:
            return logits
        processors = [logits_processor] if callable(logits_processor) else list(logits_processor)
        scores = np.array(logits, dtype=np.float32)
        for processor in processors:
            scores = np.asarray(processor(input_ids, scores), dtype=np.float32)
        return scores

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
               temp: float = 0.80, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_eta: float = 0.1,
               mirostat_tau: float = 5.0, penalize_nl: bool = True, logits_processor=None, grammar=None,
               idx: int | None = None) -> int:
        """A token for the logits of position idx (default: the last evaluated token).
        tfs_z and penalize_nl are accepted and unused, as in llama-cpp-python 0.3."""
        logits = self._logits_at(idx)
        sampler = self._sampler
        if sampler is None:
            sampler = self._sampler_for(top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty,
                                        presence_penalty, mirostat_mode, mirostat_eta, mirostat_tau, grammar)
        logits = self._processed(logits_processor, self._input_ids, logits)
        token = sampler.sample(logits)
        sampler.accept(token)
        return token

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0, reset: bool = True,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 penalize_nl: bool = True, logits_processor=None, stopping_criteria=None, grammar=None):
        """llama-cpp-python's token generator: evaluates the prompt (reusing the cached prefix
        with reset=True, appending to the cache with reset=False), then yields sampled tokens
        for ever; `send(tokens)` appends more tokens after the yielded one. It never stops by
        itself: the caller breaks (at token_eos(), a length...), or stopping_criteria(input_ids,
        logits) says so."""
        sampler = self._sampler_for(top_k, top_p, min_p, typical_p, temp, repeat_penalty, frequency_penalty,
                                    presence_penalty, mirostat_mode, mirostat_eta, mirostat_tau, grammar)
        tokens = [int(t) for t in tokens]
        if reset and self.n_tokens > 0:
            cached = self.generator.cache_tokens
            longest = 0
            for a, b in zip(cached, tokens):
                if a != b:
                    break
                longest += 1
            # a prompt wholly cached replays its last token, so there are fresh logits to sample
            reuse = longest - 1 if longest == len(tokens) else longest
            if reuse > 0:
                reset = False
                tokens = tokens[reuse:]
                self.n_tokens = reuse
        if reset:
            self.reset()
        sample_idx = self.n_tokens + len(tokens) - 1
        while True:
            self.eval(tokens)
            while sample_idx < self.n_tokens:
                self._sampler = sampler
                try:
                    token = self.sample(logits_processor=logits_processor, idx=sample_idx)
                finally:
                    self._sampler = None
                sample_idx += 1
                if stopping_criteria is not None and stopping_criteria(self._input_ids[:sample_idx], self._logits_at(sample_idx - 1)):
                    return
                tokens_or_none = yield token
                tokens = [token]
                if tokens_or_none is not None:
                    tokens.extend(int(t) for t in tokens_or_none)
                if sample_idx < self.n_tokens and token != self.generator.cache_tokens[sample_idx]:
                    self.n_tokens = sample_idx
                    break

    # -- embeddings -------------------------------------------------------------------------------

    def _embedding_inputs(self, input) -> tuple[list[list[int]], bool]:
        """Texts or token ids -> token lists, and whether one input was given (not a list of them)."""
        def is_ids(x):
            return isinstance(x, (list, tuple)) and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in x)

        if isinstance(input, (str, bytes)):
            items, single = [input], True
        elif is_ids(input) and input:
            items, single = [list(input)], True
        elif isinstance(input, (list, tuple)):
            items, single = list(input), False
        else:
            raise UserError(f"embed: input must be a text, a list of texts, token ids or lists of them, not {type(input).__name__}")
        out = []
        for item in items:
            if isinstance(item, (str, bytes)):
                out.append(self.tokenize(item.encode("utf-8") if isinstance(item, str) else item))
            elif is_ids(item):
                bad = [t for t in item if not 0 <= t < self._tok.n_vocab]
                if bad:
                    raise UserError(f"embed: token id {bad[0]} is not in the vocabulary (0 to {self._tok.n_vocab - 1})")
                out.append([int(t) for t in item])
            else:
                raise UserError(f"embed: each input must be a text or a list of token ids, not {item!r:.60}")
        return out, single

    def embed(self, input, normalize: bool = False, truncate: bool = True, return_count: bool = False):
        """llama-cpp-python's embed: for each input (from an empty cache) the final-norm hidden
        states pooled as pooling_type() says: one vector per input, or with NONE one per
        token; a single input gives its embedding, a list a list. Inputs longer than n_batch
        are cut there (truncate=True) or refused. Token id lists are accepted too."""
        if not self._embedding:
            raise UserError("Llama model must be created with embedding=True to call this method")
        token_lists, single = self._embedding_inputs(input)
        n_batch = self.n_batch
        data, total = [], 0
        self._end_own_stream()
        with self._lock:
            if self.generator.n_threads is not None:
                self.model.set_threads(self.generator.n_threads)  # numba's thread count is per thread
            try:
                for tokens in token_lists:
                    if truncate:
                        tokens = tokens[:n_batch]
                    if not tokens:
                        raise UserError("embed: an input is empty (no tokens to embed)")
                    if len(tokens) > n_batch:
                        raise UserError(f"Requested tokens ({len(tokens)}) exceed batch size of {n_batch}")
                    total += len(tokens)
                    self.model.truncate(0)
                    hidden = self.model.eval(tokens, logits="hidden")
                    if self._pooling == LLAMA_POOLING_TYPE_NONE:
                        data.append([_normalized(h) if normalize else h.tolist() for h in hidden])
                        continue
                    if self._pooling == LLAMA_POOLING_TYPE_MEAN:
                        vector = hidden.mean(axis=0, dtype=np.float32)
                    elif self._pooling == LLAMA_POOLING_TYPE_CLS:
                        vector = hidden[0]
                    else:
                        vector = hidden[-1]
                    data.append(_normalized(vector) if normalize else vector.tolist())
            finally:
                self.model.truncate(0)  # as llama-cpp-python: the cache is empty afterwards
                self.generator.cache_tokens = []
                self._last_logits = None
        output = data[0] if single else data
        return (output, total) if return_count else output

    def embedder(self, pooling_type=LLAMA_POOLING_TYPE_UNSPECIFIED) -> "Llama":
        """A Llama with embedding=True over this one's loaded model (no second copy of the
        weights; one lock, so the two never run at once). An embedding empties the KV cache,
        so this Llama's next call evaluates its whole prompt again."""
        view = Llama.from_model(self.model, self._tok, self.model_path, embedding=True, pooling_type=pooling_type,
                                n_threads=self.generator.n_threads)
        view._lock = self._lock
        return view

    def create_embedding(self, input, model: str | None = None) -> dict:
        """OpenAI's embeddings response (llama-cpp-python's create_embedding)."""
        token_lists, single = self._embedding_inputs(input)
        embeds, total = self.embed(token_lists, return_count=True)
        return {"object": "list",
                "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(embeds)],
                "model": model if model is not None else self.model_path,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    # -- completions -------------------------------------------------------------------------------

    def _check_logprobs(self, name: str, n_top, stream: bool) -> None:
        """Refuse a request for the `n_top` most likely tokens per position (None: not asked) that
        this Llama cannot give, as llama-cpp-python refuses it."""
        if n_top is None:
            return
        if not self._logits_all:
            raise UserError("logprobs is not supported for models created with logits_all=False")
        if isinstance(n_top, bool) or not isinstance(n_top, int) or n_top < 0:
            raise UserError(f"{name} must be a number of top tokens (0 or more), not {n_top!r}")
        if stream:
            raise UserError("llamachat gives logprobs only without stream=True")

    def create_completion(self, prompt: str | Sequence[int], suffix: str | None = None, max_tokens: int | None = 16,
                          temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
                          logprobs: int | None = None, echo: bool = False, stop: str | Sequence[str] | None = None,
                          frequency_penalty: float = 0.0, presence_penalty: float = 0.0, repeat_penalty: float = 1.0,
                          top_k: int = 40, stream: bool = False, seed: int | None = None, tfs_z: float = 1.0,
                          mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                          model: str | None = None, stopping_criteria=None, logits_processor=None, grammar=None,
                          logit_bias=None, *, repeat_last_n: int = 64, ignore_eos: bool = False):
        """llama-cpp-python's completion dict, or with stream=True an iterator of its chunks.
        Its parameters in its order; repeat_last_n and ignore_eos are llamachat's (keyword only)."""
        self._warn_unimplemented("create_completion", UNIMPLEMENTED_COMPLETION, dict(
            suffix=suffix, tfs_z=tfs_z, stopping_criteria=stopping_criteria,
            logits_processor=logits_processor, grammar=grammar))
        self._check_logprobs("logprobs", logprobs, stream)
        params = sampling_params(temperature, top_p, top_k, min_p, typical_p, repeat_penalty, repeat_last_n,
                                 presence_penalty, frequency_penalty, mirostat_mode, mirostat_tau, mirostat_eta,
                                 self._seed_for(seed), logit_bias, ignore_eos)
        if isinstance(prompt, str):
            tokens = self._prompt_tokens(prompt)
            echo_text = prompt
        else:
            tokens = [int(t) for t in prompt]
            echo_text = self._tok.decode([t for t in tokens if t != self._tok.bos_id])
        pieces, run = self._run(tokens, params, max_tokens, stop, continue_stream=seed is None)
        meta = {"id": f"cmpl-{uuid.uuid4()}", "object": "text_completion", "created": int(time.time()),
                "model": model or self.model_path}
        if stream:
            return self._completion_chunks(meta, pieces, run, echo_text if echo else "")
        text = "".join(pieces)
        lp = None
        if logprobs is not None:
            lp = self._completion_logprobs(tokens, self.generator.last_stats.tokens, text, echo,
                                           len(echo_text), logprobs)
        if echo:
            text = echo_text + text
        return {**meta, "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": _finish_reason(run)}],
                "usage": _usage(run)}

    def _completion_logprobs(self, prompt: list[int], generated: list[int], text: str, echo: bool,
                             prompt_chars: int, n_top: int) -> dict:
        """llama-cpp-python's logprobs of a completion: per token its text, its log-probability
        under the model's raw logits (log_softmax of `scores`), the n_top likeliest tokens and
        its character offset. The generation loop keeps only the last token's logits, so the
        positions wanted are evaluated again with every row kept."""
        tok = self._tok
        # the tokens behind the returned text (a stop string may have cut the last ones)
        completion = list(generated)
        while completion and not text.startswith(tok.decode(completion)):
            completion.pop()
        stats = self.generator.last_stats
        common = stats.prompt_tokens - stats.prompt_eval_tokens  # the prompt prefix the cache already had
        with self._lock:
            gen = self.generator
            gen._sync()
            # the rows again the way the run made them (a batch of the prompt's new part, then
            # one token at a time), so each logprob is of the very logits its token was drawn from
            steps = [prompt[common:]] + [[t] for t in completion[:-1]]
            if echo and common:
                steps.insert(0, prompt[:common])
            start = 0 if echo else common
            self.model.truncate(start)
            del gen.cache_tokens[start:]
            for step in steps:
                at = len(gen.cache_tokens)
                out = self.model.eval(step, logits="all")
                gen.cache_tokens.extend(step)
                self.scores[at:at + len(step), :] = out
                self._last_logits = out[-1]
        bos = tok.bos_id
        if echo:
            all_tokens = prompt[1 if prompt and prompt[0] == bos else 0:] + completion
            token_offset, text_offset = (1 if prompt and prompt[0] == bos else 0), 0
            rows = self.scores[token_offset - 1 if token_offset else 0:len(prompt) + len(completion) - 1]
            if not token_offset:  # no BOS: the first token has no logits before it
                rows = np.concatenate([np.zeros((1, rows.shape[1]), np.float32), rows])
        else:
            all_tokens = completion
            text_offset = prompt_chars
            rows = self.scores[len(prompt) - 1:len(prompt) - 1 + len(completion)]
        all_logprobs = Llama.logits_to_logprobs(rows)
        pieces = [tok.decode_bytes([t]).decode("utf-8", errors="ignore") for t in all_tokens]
        tokens, offsets, token_logprobs, top_logprobs = [], [], [], []
        for idx, (token, piece, row) in enumerate(zip(all_tokens, pieces, all_logprobs)):
            offsets.append(text_offset + len(tok.decode_bytes(all_tokens[:idx]).decode("utf-8", errors="ignore")))
            tokens.append(piece)
            token_logprobs.append(float(row[token]))
            best = np.argsort(-row, kind="stable")[:n_top]
            top = {tok.decode_bytes([int(i)]).decode("utf-8", errors="ignore"): float(row[i]) for i in best}
            top[piece] = float(row[token])
            top_logprobs.append(top)
        if echo and all_tokens:  # OpenAI's: the first token has no log-probability
            token_logprobs[0] = None
            top_logprobs[0] = None
        return {"tokens": tokens, "text_offset": offsets, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs}

    def _completion_chunks(self, meta: dict, pieces: Iterator[str], run: dict, echo_text: str):
        def chunk(text, finish_reason=None):
            return {**meta, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]}

        try:
            if echo_text:
                yield chunk(echo_text)
            for piece in pieces:
                yield chunk(piece)
        finally:
            pieces.close()  # a reader that stops early frees the model at once
        yield chunk("", _finish_reason(run))

    __call__ = create_completion  # as in llama-cpp-python: the same parameters, the same answer

    def create_chat_completion(self, messages: list[dict], functions=None, function_call=None, tools=None,
                               tool_choice=None, temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, typical_p: float = 1.0, stream: bool = False,
                               stop: str | Sequence[str] | None = None, seed: int | None = None, response_format=None,
                               max_tokens: int | None = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, repeat_penalty: float = 1.0, tfs_z: float = 1.0,
                               mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                               model: str | None = None, logits_processor=None, grammar=None, logit_bias=None,
                               logprobs: bool | None = None, top_logprobs: int | None = None, *,
                               repeat_last_n: int = 64, ignore_eos: bool = False):
        """An OpenAI-style chat completion (llama-cpp-python's shapes), the prompt built by the
        model's chat template (or `chat_format`). llama-cpp-python's parameters in its order;
        repeat_last_n and ignore_eos are llamachat's (keyword only)."""
        self._warn_unimplemented("create_chat_completion", UNIMPLEMENTED_CHAT, dict(
            functions=functions, function_call=function_call, tools=tools, tool_choice=tool_choice,
            response_format=response_format, tfs_z=tfs_z, logits_processor=logits_processor, grammar=grammar))
        n_top = top_logprobs if logprobs else None  # llama-cpp-python: logprobs=True alone gives none
        self._check_logprobs("top_logprobs", n_top, stream)
        params = sampling_params(temperature, top_p, top_k, min_p, typical_p, repeat_penalty, repeat_last_n,
                                 presence_penalty, frequency_penalty, mirostat_mode, mirostat_tau, mirostat_eta,
                                 self._seed_for(seed), logit_bias, ignore_eos)
        tokens = self.chat_template.encode(messages, self._tok, add_generation_prompt=True)
        pieces, run = self._run(tokens, params, max_tokens, stop, continue_stream=seed is None)
        meta = {"id": f"chatcmpl-{uuid.uuid4()}", "object": "chat.completion", "created": int(time.time()),
                "model": model or self.model_path}
        if stream:
            return self._chat_chunks({**meta, "object": "chat.completion.chunk"}, pieces, run)
        text = "".join(pieces)
        lp = None
        if n_top is not None:  # llama-cpp-python's conversion of the completion's logprobs
            c = self._completion_logprobs(tokens, self.generator.last_stats.tokens, text, False, 0, n_top)
            lp = {"content": [{"token": t, "bytes": None, "logprob": p,
                               "top_logprobs": [{"token": k, "logprob": v, "bytes": None} for k, v in top.items()]}
                              for t, p, top in zip(c["tokens"], c["token_logprobs"], c["top_logprobs"])],
                  "refusal": None}
        return {**meta, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "logprobs": lp, "finish_reason": _finish_reason(run)}],
                "usage": _usage(run)}

    def _chat_chunks(self, meta: dict, pieces: Iterator[str], run: dict):
        def chunk(delta, finish_reason=None):
            return {**meta, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        try:
            yield chunk({"role": "assistant"})
            for piece in pieces:
                yield chunk({"content": piece})
        finally:
            pieces.close()  # a reader that stops early frees the model at once
        yield chunk({}, _finish_reason(run))

    def create_chat_completion_openai_v1(self, *args, **kwargs):
        """create_chat_completion's answer as the `openai` package's types (ChatCompletion, or
        with stream=True an iterator of ChatCompletionChunk), as llama-cpp-python gives it."""
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError:
            raise ImportError("To use create_chat_completion_openai_v1, you must install the openai package. "
                              "You can install it with `pip install openai`.") from None
        if kwargs.get("stream", False):
            return (ChatCompletionChunk(**chunk) for chunk in self.create_chat_completion(*args, **kwargs))
        return ChatCompletion(**self.create_chat_completion(*args, **kwargs))

    @property
    def chat_template(self):
        if self._chat_template is None:
            from ..tokenizer.chat_template import ChatTemplate

            name = self.metadata.get("general.name") or Path(self.model_path).stem
            source = self._gguf if self._gguf is not None else self.model.metadata
            self._chat_template = ChatTemplate.for_model(source, self._tok, override=self.chat_format, model_name=name,
                                                         fallback=True)  # notice: self._chat_template.take_notice()
        return self._chat_template

    # -- the shared part ---------------------------------------------------------------------------

    def _warn_unimplemented(self, method: str, table: dict, given: dict) -> None:
        """One warning naming the llama-cpp-python parameters given a value this engine would
        ignore; each name once per Llama, so a loop of calls is not flooded."""
        names = [name for name, value in given.items() if not table[name](value) and name not in self._warned]
        if not names:
            return
        self._warned.update(names)
        listed = ", ".join(names)
        warnings.warn(f"Llama.{method}: llamachat does not implement {listed}; "
                      f"{'it is' if len(names) == 1 else 'they are'} ignored", UserWarning, stacklevel=3)


    def _seed_for(self, seed: int | None) -> int:
        """A call's own seed restarts the random stream; without one, a fixed Llama(seed=...)
        stream goes on across calls (llama.cpp seeds once), so a regenerated reply differs."""
        return self.seed if seed is None else seed

    def _prompt_tokens(self, prompt: str) -> list[int]:
        """As llama-cpp-python: special tokens in the text parsed, BOS as the vocabulary says;
        an empty prompt is just the BOS token."""
        tokens = self._tok.encode(prompt, add_special=True, parse_special=True) if prompt else []
        if not tokens and self._tok.bos_id is not None:
            tokens = [self._tok.bos_id]
        return tokens

    def _run(self, tokens: list[int], params: SamplingParams, max_tokens, stop,
             continue_stream: bool = False) -> tuple[Iterator[str], dict]:
        """Start a generation (one at a time per model: the KV cache is shared). The returned
        iterator holds the model until it is exhausted, closed or dropped; the dict gets this
        run's statistics when it ends."""
        run: dict = {}
        n_predict = -1 if max_tokens is None or max_tokens <= 0 else int(max_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self._end_own_stream()
        gen = self.generator.generate(tokens, params, n_predict=n_predict, stop=stops,
                                      context_shift=self.context_shift, n_keep=self.n_keep,
                                      continue_stream=continue_stream)
        self._lock.acquire()
        try:
            first = next(gen, None)  # the checks (prompt length...) raise here, not mid-stream
        except BaseException:
            self._finish()
            self._lock.release()
            raise
        pieces = self._pieces(first, gen, run)
        next(pieces)  # enter its try block now, so dropping it unread still releases the model
        # weakly: a stream dropped unread must be collected (its cleanup frees the model)
        self._active = (weakref.ref(pieces), threading.get_ident())
        return pieces, run

    def _end_own_stream(self) -> None:
        active = self._active
        if active is not None and active[1] == threading.get_ident():
            unfinished = active[0]()
            if unfinished is not None:  # this thread's unfinished stream: it ends here, as if its reader stopped
                unfinished.close()

    def _pieces(self, first, gen, run: dict) -> Iterator[str]:
        try:
            yield None  # the priming step taken by _run
            if first is not None:
                yield first
            yield from gen
        finally:
            gen.close()
            self._active = None
            run.update(self._finish())
            self._lock.release()

    def _finish(self) -> dict:
        stats = self.generator.last_stats
        self.last_stats = {
            "prompt_tokens": stats.prompt_tokens, "prompt_ms": stats.prompt_ms,
            "completion_tokens": stats.completion_tokens, "eval_ms": stats.eval_ms,
            "stop_reason": stats.stop_reason, "n_past": stats.n_past, "n_ctx": stats.n_ctx,
            "prompt_eval_tokens": stats.prompt_eval_tokens, "eval_runs": stats.eval_runs,
            "sample_ms": stats.sample_ms, "seed": stats.seed, "context_shifts": stats.context_shifts,
        }
        if self.verbose:
            print("\n".join(timing_lines(self.load_ms, stats)), file=sys.stderr)
        return self.last_stats


def _finish_reason(run: dict) -> str:
    return FINISH_REASON.get(run.get("stop_reason"), "stop")


def _usage(run: dict) -> dict:
    return {"prompt_tokens": run.get("prompt_tokens", 0), "completion_tokens": run.get("completion_tokens", 0),
            "total_tokens": run.get("prompt_tokens", 0) + run.get("completion_tokens", 0)}
