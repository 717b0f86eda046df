"""The GGUF format's numbers the engine reads and writes (GGMLQuantizationType,
GGML_QUANT_SIZES, GGUFValueType, LlamaFileType, TokenType, QK_K): gguf-py's own
gguf/constants.py, loaded as a module of its own. Importing it as `gguf.constants` runs gguf-py's
whole package first (its reader, writer, vocabulary and metadata modules: 44-67 ms measured,
against 7 ms for this file alone) in every start of the app and of every command; the importers,
which use gguf-py's writer and vocabulary, still import the package. Its IntEnums compare and
hash as their ints, so these and the package's are interchangeable as values and dict keys."""

from __future__ import annotations

import importlib.util
import os
import sys


def _load_gguf_constants():
    name = __name__ + "._gguf_py"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("gguf")  # (finds the package without running it)
    path = os.path.join(os.path.dirname(package.origin), "constants.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses and enums look their module up while it runs)
    spec.loader.exec_module(module)
    return module


_C = _load_gguf_constants()
GGMLQuantizationType = _C.GGMLQuantizationType
GGML_QUANT_SIZES = _C.GGML_QUANT_SIZES
GGUFValueType = _C.GGUFValueType
LlamaFileType = _C.LlamaFileType
TokenType = _C.TokenType
QK_K = _C.QK_K
