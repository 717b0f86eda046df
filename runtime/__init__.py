"""llamachat's inference engine, in one subpackage per part:

    gguf/        GGUF files: read and validate (GGUFFile), write, convert to another quantization
    tokenizer/   text <-> tokens as llama.cpp does (SPM, BPE + pre-tokenizers, WPM), chat templates
    quants/      one module per weight format, TRAITS (the type -> kernels table), the shared
                 vector IR (simd) and the quantized products (matmul)
    model/       config and weights (load_model), loading-time packing, the forward pass, KV cache
    generation/  samplers, the generator, perplexity, bench, and `Llama` (llama-cpp-python's API)

and, at this level, what every part and the app share: errors, params (the generation settings),
thread_env, numba_cache, atomic_file.

Imports nothing from the UI. Heavy modules (numba kernels) load lazily, on first use of the
name that needs them, so `import llamachat.runtime` stays cheap.
"""

from importlib import import_module

# (OpenMP/OpenBLAS settings are not made here: the `llamachat` command and `Llama(...)` apply
# them, see thread_env)
from .thread_env import USER_OMP_ENV, apply_thread_env  # noqa: F401 (public: bench, entry points)
from .numba_cache import drop_stale_engine_caches

# a kernel's cache entry holds the code of the kernels it calls, in any of the engine's
# folders: an edit to any of them must recompile the lot (see numba_cache)
drop_stale_engine_caches()

from .errors import ConfigError, GGUFError, ModelError, UserError

# public name -> module that defines it (imported on first access)
_LAZY = {
    "GGUFFile": ".gguf.reader",
    "Tokenizer": ".tokenizer.tokenizer",
    "Llama": ".generation.llama_api",
    "LlamaState": ".generation.llama_api",
    "load_model": ".model.model",
}

__all__ = ["UserError", "GGUFError", "ModelError", "ConfigError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
