"""A llama-architecture model loaded from a GGUF file: its configuration (from the metadata),
its weights (views of the memory map, never dequantized as a whole), the checks that turn a
file we cannot run into one clear sentence, and the evaluation state (KV cache, n_past).

    m = load_model(path, n_ctx=2048, n_threads=None, n_batch=512, progress=None)
    m.eval(tokens, logits="last" | "all", cancel=None)   # appends at m.n_past
    m.truncate(n); m.shift(n_keep, n_discard); m.set_threads(n)

The forward pass itself is runtime/model/forward.py; what loading does to the weights (repacking,
stacking) runtime/model/loading.py; products on quantized weights runtime/quants/matmul.py.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from llamachat.runtime.gguf.constants import GGMLQuantizationType as T

from ..errors import ModelError, UserError, shown
from .kv_cache import KVCache
from ..quants.matmul import SUPPORTED_TYPES, QuantWeight, decode_context, dequantize_rows, kernel_context

log = logging.getLogger("llamachat")

SUPPORTED_ARCHITECTURES = ("llama",)
MAX_CTX = 1 << 20  # runtime.params' upper bound for n_ctx


class EvalCancelled(Exception):
    """`eval` stopped between chunks because `cancel` was set. The chunks before it stay in the
    cache (`n_done` tokens of the call, reflected in `m.n_past`); no logits are returned."""

    def __init__(self, n_done: int):
        super().__init__(f"evaluation cancelled after {n_done} tokens")
        self.n_done = n_done


class ContextFull(UserError):
    """More tokens than the context has room for."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_rot: int
    rope_freq_base: float
    rope_scaling_type: str  # "none" | "linear"
    rope_scaling_factor: float
    rms_eps: float
    n_ctx_train: int
    tied_output: bool
    rope_freqs: np.ndarray | None = None  # llama 3.1 style per-dimension frequency divisors
    notes: tuple[str, ...] = ()  # what was adjusted while reading the file (shown as warnings)

    @property
    def rope_freq_scale(self) -> float:
        return 1.0 / self.rope_scaling_factor if self.rope_scaling_type == "linear" else 1.0


# The largest count a metadata key may hold: llama.cpp reads these as uint32; a layer, head or
# embedding count beyond this could never match tensors a file can hold.
MAX_META_INT = (1 << 31) - 1


def _meta_int(md: dict, key: str, default=None, *, path, low: int = 1, high: int = MAX_META_INT) -> int:
    """A whole-number metadata value in [low, high], else ModelError naming the key."""
    v = md.get(key, default)
    if v is None:
        raise ModelError(f"{path}: metadata key {key} is missing")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ModelError(f"{path}: metadata key {key} should be an integer, not {shown(v)}")
    if not low <= v <= high:
        raise ModelError(f"{path}: metadata key {key} is {v}; it must be between {low} and {high}")
    return int(v)


def _meta_float(md: dict, key: str, default=None, *, path) -> float:
    """A finite, positive metadata number (every float the forward pass reads is a base, a
    scale or an epsilon: zero, negative, NaN or infinite ones give NaN logits or a crash)."""
    v = md.get(key, default)
    if v is None:
        raise ModelError(f"{path}: metadata key {key} is missing")
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ModelError(f"{path}: metadata key {key} should be a number, not {shown(v)}")
    if not np.isfinite(v) or v <= 0:
        raise ModelError(f"{path}: metadata key {key} is {float(v):g}; it must be a positive finite number")
    return float(v)


def _meta_text(md: dict, key: str, default=None, *, path) -> str | None:
    v = md.get(key, default)
    if v is not None and not isinstance(v, str):
        raise ModelError(f"{path}: metadata key {key} should be text, not {shown(v)}")
    return v


def _block_count_in_tensors(g) -> int:
    """How many blk.N layers the file has tensors for (N from 0 up, without gaps)."""
    present = set()
    for name in g.tensors:
        if name.startswith("blk."):
            head = name[4:].split(".", 1)[0]
            if head.isdigit():
                present.add(int(head))
    n = 0
    while n in present:
        n += 1
    return n


def trained_context_length(g) -> int:
    """The context the file says the model was trained with, as a context size this engine can
    give (llama-cpp-python's n_ctx=0): checked, at most MAX_CTX, 2048 when absent."""
    return min(config_from_gguf(g, tensors=False).n_ctx_train, MAX_CTX)


def config_from_gguf(g, tensors: bool = True) -> ModelConfig:
    """ModelConfig from a GGUFFile's metadata, every key checked for type and range before use
    and against the tensors present (unless `tensors` is False); ModelError names the key."""
    path = g.path
    md = g.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        if arch is None:
            raise ModelError(f"{path}: metadata key general.architecture is missing; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        raise ModelError(f"{path}: architecture not supported: {arch if isinstance(arch, str) and len(arch) <= 60 else shown(arch)}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if "general.file_type" in md:
        _meta_int(md, "general.file_type", path=path, low=0)
    p = f"{arch}."
    n_embd = _meta_int(md, p + "embedding_length", path=path)
    n_layer = _meta_int(md, p + "block_count", path=path)
    n_head = _meta_int(md, p + "attention.head_count", path=path)
    n_head_kv = _meta_int(md, p + "attention.head_count_kv", n_head, path=path)
    n_ff = _meta_int(md, p + "feed_forward_length", path=path)
    if n_embd % n_head:
        raise ModelError(f"{path}: embedding length {n_embd} is not a multiple of the head count {n_head}")
    if n_head % n_head_kv:
        raise ModelError(f"{path}: head count {n_head} is not a multiple of the KV head count {n_head_kv}")
    head_dim = _meta_int(md, p + "attention.key_length", n_embd // n_head, path=path)
    if head_dim != _meta_int(md, p + "attention.value_length", head_dim, path=path) or head_dim % 2:
        raise ModelError(f"{path}: unsupported attention head size (key/value length {head_dim}); RoPE needs an even size, the same for keys and values")
    n_rot = _meta_int(md, p + "rope.dimension_count", head_dim, path=path)
    if n_rot > head_dim or n_rot % 2:
        raise ModelError(f"{path}: rope dimension count {n_rot} must be even and at most the head size {head_dim}")
    emb = g.tensors.get("token_embd.weight")
    n_vocab_default = emb.shape[1] if emb is not None and len(emb.shape) == 2 else None
    tokens = md.get("tokenizer.ggml.tokens")
    if n_vocab_default is None and isinstance(tokens, list):
        n_vocab_default = len(tokens)
    n_vocab = _meta_int(md, p + "vocab_size", n_vocab_default, path=path)
    if tensors:
        blocks = _block_count_in_tensors(g)
        if n_layer > blocks:
            raise ModelError(f"{path}: metadata key {p}block_count is {n_layer}, but the file has tensors for {blocks} layers")
        if isinstance(tokens, list) and emb is not None and len(emb.shape) == 2 and emb.shape[1] != len(tokens):
            raise ModelError(f"{path}: tensor token_embd.weight has {emb.shape[1]} rows, but the vocabulary "
                             f"(tokenizer.ggml.tokens) has {len(tokens)} tokens; they must agree")

    scaling_type = _meta_text(md, p + "rope.scaling.type", "none", path=path)
    factor = 1.0
    if scaling_type == "none" and p + "rope.scale_linear" in md:  # older files
        scaling_type, factor = "linear", _meta_float(md, p + "rope.scale_linear", path=path)
    elif scaling_type == "linear":
        factor = _meta_float(md, p + "rope.scaling.factor", path=path)
    if scaling_type not in ("none", "linear"):
        raise ModelError(f"{path}: rope scaling type {shown(scaling_type)} is not supported; supported: none, linear")
    if scaling_type == "linear" and factor == 1.0:
        scaling_type = "none"

    n_ctx_train = _meta_int(md, p + "context_length", 2048, path=path, high=(1 << 64) - 1)  # any u64: clamped below
    notes = []
    if n_ctx_train > MAX_CTX:
        notes.append(f"{path}: metadata key {p}context_length is {n_ctx_train}, more than the {MAX_CTX} tokens "
                     f"a context can hold here; using {MAX_CTX}")
        n_ctx_train = MAX_CTX

    rope_freqs = None
    if tensors and "rope_freqs.weight" in g.tensors:
        t = g.tensors["rope_freqs.weight"]
        if t.shape != (n_rot // 2,) or t.ggml_type not in (T.F32, T.F16):
            raise ModelError(f"{path}: tensor rope_freqs.weight should be {n_rot // 2} floats")
        rope_freqs = dequantize_rows(t.rows(), t.ggml_type, t.shape[0])[0].copy()
        if not (np.isfinite(rope_freqs).all() and (rope_freqs > 0).all()):
            raise ModelError(f"{path}: tensor rope_freqs.weight holds values that are not positive finite numbers")

    return ModelConfig(
        arch=arch, n_vocab=n_vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, n_ff=n_ff, n_rot=n_rot,
        rope_freq_base=_meta_float(md, p + "rope.freq_base", 10000.0, path=path),
        rope_scaling_type=scaling_type, rope_scaling_factor=factor if scaling_type == "linear" else 1.0,
        rms_eps=_meta_float(md, p + "attention.layer_norm_rms_epsilon", 1e-5, path=path),
        n_ctx_train=n_ctx_train,
        tied_output="output.weight" not in g.tensors,
        rope_freqs=rope_freqs,
        notes=tuple(notes),
    )


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    wq: QuantWeight
    wk: QuantWeight
    wv: QuantWeight
    wo: QuantWeight
    ffn_norm: np.ndarray
    w_gate: QuantWeight
    w_up: QuantWeight
    w_down: QuantWeight

    @property
    def matrices(self) -> tuple:
        """The layer's seven weight matrices, in the forward pass's order."""
        return (self.wq, self.wk, self.wv, self.wo, self.w_gate, self.w_up, self.w_down)


@dataclass
class Weights:
    token_embd: QuantWeight
    output_norm: np.ndarray
    output: QuantWeight  # token_embd itself when the output is tied
    layers: list[LayerWeights]

    @property
    def nbytes(self) -> int:
        total = self.token_embd.nbytes + (0 if self.output is self.token_embd else self.output.nbytes)
        for layer in self.layers:
            total += sum(w.nbytes for w in layer.matrices)
        return total


def _tensor(g, name: str, shape: tuple[int, ...]):
    t = g.tensors.get(name)
    if t is None:
        raise ModelError(f"{g.path}: tensor {name} is missing")
    if tuple(t.shape) != shape:
        raise ModelError(f"{g.path}: tensor {name} has shape {list(t.shape)}, but the metadata says {list(shape)}")
    if t.ggml_type not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(x.name for x in SUPPORTED_TYPES))
        raise ModelError(f"{g.path}: tensor {name} has type {t.ggml_type.name}, which llamachat cannot run (supported: {supported})")
    return t


def _matrix(g, name: str, n_in: int, n_out: int) -> QuantWeight:
    t = _tensor(g, name, (n_in, n_out))
    return QuantWeight(name, t.ggml_type, n_in, n_out, t.rows())


def _vector(g, name: str, n: int) -> np.ndarray:
    t = _tensor(g, name, (n,))
    # norm weights are tiny: float32 copies
    return np.ascontiguousarray(dequantize_rows(t.rows(), t.ggml_type, n)[0], dtype=np.float32)


def weights_from_gguf(g, cfg: ModelConfig, progress: Callable[[float], None] | None = None) -> Weights:
    e, hd = cfg.n_embd, cfg.head_dim
    token_embd = _matrix(g, "token_embd.weight", e, cfg.n_vocab)
    output = token_embd if cfg.tied_output else _matrix(g, "output.weight", e, cfg.n_vocab)
    output_norm = _vector(g, "output_norm.weight", e)
    layers = []
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=_vector(g, b + "attn_norm.weight", e),
            wq=_matrix(g, b + "attn_q.weight", e, cfg.n_head * hd),
            wk=_matrix(g, b + "attn_k.weight", e, cfg.n_head_kv * hd),
            wv=_matrix(g, b + "attn_v.weight", e, cfg.n_head_kv * hd),
            wo=_matrix(g, b + "attn_output.weight", cfg.n_head * hd, e),
            ffn_norm=_vector(g, b + "ffn_norm.weight", e),
            w_gate=_matrix(g, b + "ffn_gate.weight", e, cfg.n_ff),
            w_up=_matrix(g, b + "ffn_up.weight", e, cfg.n_ff),
            w_down=_matrix(g, b + "ffn_down.weight", cfg.n_ff, e),
        ))
        if progress:
            progress((i + 1) / cfg.n_layer)
    return Weights(token_embd, output_norm, output, layers)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_threads(n_threads) -> int:
    import numba

    if n_threads is None or n_threads == 0:  # runtime.params: 0 = all cores
        return numba.config.NUMBA_NUM_THREADS
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)) or n_threads < 0:
        raise ModelError(f"threads must be a positive number, not {n_threads!r}")
    return min(int(n_threads), numba.config.NUMBA_NUM_THREADS)


@contextlib.contextmanager
def one_thread():
    """numba's parallel kernels run on one thread (the calling thread's setting) while open."""
    import numba

    n = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(n)


class LlamaModel:
    """A loaded model with its KV cache: evaluate tokens, keep or drop cached positions."""

    def __init__(self, gguf_file, config: ModelConfig, weights: Weights, n_ctx: int, n_batch: int, n_threads: int,
                 fused=None, layer_stack=None, isa: str | None = None):
        self.gguf = gguf_file
        self.path = Path(gguf_file.path)
        self.config = config
        self.weights = weights
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.isa = isa  # the instruction set its kernels run with (None: this CPU's best, simd.HOST_ISA)
        try:
            self.cache = KVCache(config.n_layer, n_ctx, config.n_head_kv * config.head_dim)
        except MemoryError:
            need = 2 * 4 * config.n_layer * n_ctx * config.n_head_kv * config.head_dim
            raise ModelError(f"a context of {n_ctx} tokens needs {need / 2**30:.1f} GiB for its key/value cache, "
                             f"more than this machine can reserve; use a smaller context size") from None
        self.warnings: list[str] = []
        self._lock = threading.Lock()
        # runtime.model.loading.fused_layers' plan: single-token decode in one compiled call per layer
        # when every matrix has a fused kernel (fused), in one call per token when the layers are
        # also alike (layer_stack); None: decode runs the batch forward pass
        self.fused = fused
        self.layer_stack = layer_stack
        # the stack decode_token finishes a token with: the layers' when they are alike, else
        # one of no layers holding the output product (so that runs in compiled code too)
        self._decode_stack = layer_stack
        if fused is not None and layer_stack is None:
            from .forward import head_stack

            self._decode_stack = head_stack(weights)
        if fused is not None:  # the kernels this model decodes with: only those are compiled
            st = self._decode_stack
            self._decode_ctx = decode_context(st.types + (st.head.types,) + tuple(types for _, _, types in fused), isa)
        self._decode_gate: threading.Event | None = None  # see defer_decode

    def defer_decode(self, ready: threading.Event) -> None:
        """Run single tokens through the batch forward pass (the same floats: one arithmetic)
        until `ready` is set, then through the one-call decode kernels: a cold start's warm-up
        lets a second process compile those (tui/compile_ahead) while the first reply already
        runs on the prompt kernels, compiled and in hand, instead of waiting for them."""
        self._decode_gate = ready

    def decode_deferred(self) -> bool:
        """Whether single tokens still go through the batch forward pass (defer_decode)."""
        gate = self._decode_gate
        if gate is not None and gate.is_set():
            self._decode_gate = gate = None
        return gate is not None

    @property
    def decode_context(self):
        """The KernelContext this model decodes with (only its kernels are compiled), or None
        when it decodes through the batch forward pass."""
        return self._decode_ctx if self.fused is not None else None

    @property
    def n_past(self) -> int:
        """Tokens in the KV cache (the position the next token gets)."""
        return self.cache.n_past

    @property
    def metadata(self) -> dict:
        return self.gguf.metadata

    def set_threads(self, n: int | None) -> None:
        """numba's thread count for the calling thread (numba keeps it per thread)."""
        import numba

        self.n_threads = _check_threads(n)
        numba.set_num_threads(self.n_threads)

    def eval(self, tokens: Sequence[int], logits: str = "last", cancel: threading.Event | None = None) -> np.ndarray:
        """Append tokens at n_past, in chunks of n_batch; return float32 logits of the last
        token [n_vocab] (logits="last") or of every token [len(tokens), n_vocab] ("all"), or the
        final-norm hidden states of every token [len(tokens), n_embd] ("hidden": embeddings).
        If `cancel` is set when a chunk ends, raises EvalCancelled (finished chunks stay)."""
        from .forward import decode_token, forward

        if logits not in ("last", "all", "hidden"):
            raise ValueError("logits must be 'last', 'all' or 'hidden'")
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("eval needs at least one token")
        if ids.min() < 0 or ids.max() >= self.config.n_vocab:
            bad = int(ids[(ids < 0) | (ids >= self.config.n_vocab)][0])
            raise UserError(f"token id {bad} is outside the vocabulary (0..{self.config.n_vocab - 1})")
        if self.n_past + ids.size > self.n_ctx:
            raise ContextFull(f"the context is full: {self.n_past} + {ids.size} tokens do not fit in n_ctx = {self.n_ctx}")
        want_all, hidden = logits != "last", logits == "hidden"
        outs = []
        with self._lock:
            for start in range(0, ids.size, self.n_batch):
                if start and cancel is not None and cancel.is_set():
                    raise EvalCancelled(start)
                chunk = ids[start:start + self.n_batch]
                last = start + self.n_batch >= ids.size
                # a single token decoded through the batch pass (defer_decode) runs on one thread:
                # the other core is compiling the decode kernels, and a parallel product would
                # wait for its second thread at every step
                deferred = len(chunk) == 1 and self.decode_deferred()
                if len(chunk) == 1 and not hidden and self.fused is not None and not deferred:
                    logits_1 = decode_token(self.config, self.weights, self.fused, self._decode_stack, self._decode_ctx,
                                            self.cache, int(chunk[0]))
                    outs.append(logits_1[None, :] if want_all else logits_1)
                elif want_all or last:
                    with one_thread() if deferred else contextlib.nullcontext():
                        outs.append(forward(self.config, self.weights, self.cache, chunk, want_all, hidden))
                else:
                    forward(self.config, self.weights, self.cache, chunk, False)
        return np.concatenate(outs) if want_all else outs[-1]

    def truncate(self, n: int) -> None:
        """Keep the first n cached positions (prefix reuse)."""
        self.cache.truncate(n)

    def shift(self, n_keep: int, n_discard: int) -> None:
        """Context shift as llama.cpp does it: drop positions [n_keep, n_keep+n_discard), move
        the rest down and re-rotate their keys to their new positions."""
        from .forward import rerotate_keys

        n_keep, n_discard = int(n_keep), int(n_discard)
        if n_keep < 0 or n_discard < 0 or n_keep + n_discard > self.n_past:
            raise ValueError(f"cannot discard {n_discard} positions after {n_keep} of {self.n_past}")
        if n_discard == 0:
            return
        with self._lock:
            self.cache.remove(n_keep, n_discard)
            rerotate_keys(self.config, self.cache, n_keep, self.n_past, -n_discard)

    def close(self) -> None:
        self.gguf.close()


def load_model(path, n_ctx: int = 2048, n_threads: int | None = None, n_batch: int = 512,
               progress: Callable[[float], None] | None = None, isa: str | None = None) -> LlamaModel:
    """Open and check a llama GGUF; weights stay in the memory map. ModelError/GGUFError/UserError
    for anything wrong with the file or the settings; a too-large model only warns (m.warnings).
    isa: the instruction set to run the kernels with ("avx512vnni", "avx2", "portable"; None:
    the best this CPU has), one this CPU can run: the same floats on every one, only the speed
    differs (how an older CPU's path is measured on a newer one)."""
    from ..gguf.reader import GGUFFile

    if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx <= 0:
        raise ModelError(f"context size must be a positive number of tokens, not {n_ctx!r}")
    if n_ctx > MAX_CTX:
        raise ModelError(f"context size {n_ctx} is too large (at most {MAX_CTX} tokens)")
    if isinstance(n_batch, bool) or not isinstance(n_batch, (int, np.integer)) or n_batch <= 0:
        raise ModelError(f"batch size must be a positive number of tokens, not {n_batch!r}")
    threads = _check_threads(n_threads)
    if isa is not None:
        try:
            kernel_context(isa)
        except ValueError as err:
            raise ModelError(str(err)) from None

    g = path if hasattr(path, "tensors") else GGUFFile(path)
    try:
        if progress:
            progress(0.0)
        cfg = config_from_gguf(g)
        weights = weights_from_gguf(g, cfg, progress)
        for w in (weights.token_embd, weights.output, *(m for layer in weights.layers for m in layer.matrices)):
            w.isa = isa  # (before fused_layers: which layout a matrix is repacked into depends on it)
        from .loading import fused_layers

        fused, layer_stack = fused_layers(weights)
        model = LlamaModel(g, cfg, weights, int(n_ctx), int(n_batch), threads, fused, layer_stack, isa)
    except BaseException:
        if g is not path:
            g.close()
        raise
    for note in cfg.notes:
        model.warnings.append(note)
        log.warning(note)
    kv_bytes = model.cache.nbytes  # float32 holding half-float values (filled as the context grows)
    need = g.file_size + kv_bytes
    avail = available_memory()
    if avail is not None and need > avail:
        msg = (f"{g.path}: the model and its context need about {need / 2**30:.1f} GiB but only "
               f"{avail / 2**30:.1f} GiB of memory is free; it may run very slowly")
        model.warnings.append(msg)
        log.warning(msg)
    if n_ctx > cfg.n_ctx_train:
        msg = f"context size {n_ctx} is larger than the {cfg.n_ctx_train} tokens the model was trained with"
        model.warnings.append(msg)
        log.warning(msg)
    model.set_threads(threads)
    if progress:
        progress(1.0)
    return model
