"""llamachat's inference engine: GGUF loading, tokenizers, quantized kernels, the llama
forward pass, samplers, generation and the llama-cpp-python shaped `Llama` API.

Imports nothing from the UI. Heavy modules (numba kernels) load lazily, on first use of the
name that needs them, so `import llamachat.runtime` stays cheap.
"""

import os
from importlib import import_module

# numba's OpenMP workers spin after each parallel region by default (libgomp: 300000 rounds);
# during prompt processing they then fight numpy's BLAS threads for the 2 cores (a 256-token
# prefill ran 20x slower). Fully passive workers cost a futex wake-up per region instead,
# about 10 us: 120+ regions per generated token, 1.4 ms of an 8 ms token. A short spin
# (1000 rounds, some microseconds) keeps the workers awake between the regions of one token
# and asleep while BLAS runs: SmolLM2 Q4_1 tg64 127 -> 158 tokens/s, pp256 unchanged (3000
# rounds already cost prefill 5-10%). Read by libgomp when numba first loads it, so set here,
# before any kernel runs; a user's own OpenMP settings win (USER_OMP_ENV: what they were).
USER_OMP_ENV = {name: os.environ.get(name) for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT")}
if USER_OMP_ENV["OMP_WAIT_POLICY"] is None and USER_OMP_ENV["GOMP_SPINCOUNT"] is None:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "1000"  # overrides PASSIVE's zero: spin briefly, then sleep
# The other way round: numpy's OpenBLAS workers spin 2**28 cycles (about 0.1 s) after each
# product before sleeping, and a prompt alternates BLAS products with numba's parallel kernels
# (tile dequantization, SwiGLU, activation rounding), which then share the 2 cores with a
# spinning thread. 2**12 cycles: SmolLM2 Q4_1 pp256 335-343 -> 385-396 tokens/s (8 to 20 all
# alike). Read when numpy loads OpenBLAS: effective when llamachat (CLI, or this package
# imported first) loads numpy; a user's own setting wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")

from .numba_cache import drop_stale_numba_cache

# forward.py's kernels link matmul.py's and simd.py's (and the quants'): any edit to any of
# them must recompile the lot (see numba_cache)
drop_stale_numba_cache(os.path.dirname(os.path.abspath(__file__)), ("", "quants"))

from .errors import ConfigError, GGUFError, ModelError, UserError

# public name -> module that defines it (imported on first access)
_LAZY = {
    "GGUFFile": ".gguf_file",
    "Tokenizer": ".tokenizer",
    "Llama": ".llama_api",
    "LlamaState": ".llama_api",
    "load_model": ".model",
}

__all__ = ["UserError", "GGUFError", "ModelError", "ConfigError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
