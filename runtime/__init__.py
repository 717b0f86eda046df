"""llamachat's inference engine: GGUF loading, tokenizers, quantized kernels, the llama
forward pass, samplers, generation and the llama-cpp-python shaped `Llama` API.

Imports nothing from the UI. Heavy modules (numba kernels) load lazily, on first use of the
name that needs them, so `import llamachat.runtime` stays cheap.
"""

import os
from importlib import import_module

# numba's OpenMP workers spin after each parallel region by default; during prompt processing
# they then fight numpy's BLAS threads for the 2 cores (a 256-token prefill ran 20x slower).
# Sleeping workers cost a few microseconds per region instead. Read by libgomp when numba
# first loads it, so it is set here, before any kernel runs; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import ConfigError, GGUFError, ModelError, UserError

# public name -> module that defines it (imported on first access)
_LAZY = {
    "GGUFFile": ".gguf_file",
    "Tokenizer": ".tokenizer",
    "Llama": ".llama_api",
    "load_model": ".model",
}

__all__ = ["UserError", "GGUFError", "ModelError", "ConfigError", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
