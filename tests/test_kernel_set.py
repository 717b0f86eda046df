"""What a model compiles: matvec_fused switches over the KernelSet in its context's type only
(runtime.quants.matmul), the row converters over one Literal block kind (runtime.quants), and each
variant is cached on disk apart and found again by the next process."""

import os
import subprocess
import sys

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from llamachat.runtime.quants import matmul as mm
from llamachat.runtime.quants import TRAITS, quantize


def _q8_0_weight(rows=8, k=64):
    x = np.random.default_rng(7).standard_normal((rows, k)).astype(np.float32)
    return mm.QuantWeight("w", T.Q8_0, k, rows, quantize(x, T.Q8_0))


def test_matvec_fused_runs_the_kernels_of_its_set_only():
    w = _q8_0_weight()
    x = np.random.default_rng(8).standard_normal((1, w.n_in)).astype(np.float32)
    act = mm.quantize_for(x, w)
    want = mm.matmul(w, act)[0]
    q8 = TRAITS[T.Q8_0].kernel
    rows = mm.read_only_view(w.rows)
    out = np.empty(w.n_out, np.float32)
    mm.matvec_fused(q8, rows, mm.kernel_context(kernels=(q8,)), act.xq[0], act.xd[0], act.xs[0], act.xhat[0], out)
    assert np.array_equal(out, want)
    # a number outside the set is refused, not run through another format's kernel
    q6 = TRAITS[T.Q6_K].kernel
    with pytest.raises(ValueError, match="KernelSet"):
        mm.matvec_fused(q6, rows, mm.kernel_context(kernels=(q8,)), act.xq[0], act.xd[0], act.xs[0], act.xhat[0], out)
    # one signature per set: the kernel's own signature does not depend on the set
    sigs = [s for s in TRAITS[T.Q8_0].decode.signatures if "KernelSet" in str(s)]
    assert sigs == []


def test_decode_context_is_made_once_per_set():
    a = mm.decode_context((np.array([3, 3, 5]), np.array([-1])))
    b = mm.decode_context((np.array([5]), np.array([3])))
    assert a is b and a.kernels.numbers == (3, 5)
    assert mm.kernel_context() is mm.HOST_CONTEXT and mm.HOST_CONTEXT.kernels is None


_CHILD = """
import numpy as np
from numba.core import event
from gguf.constants import GGMLQuantizationType as T
from llamachat.runtime.quants import matmul as mm
from llamachat.runtime import quants
compiled = []
class L(event.Listener):
    def on_start(self, ev):
        f = ev.data["dispatcher"].py_func
        compiled.append(f"{(f.__module__ or '').rsplit('.', 1)[-1]}.{f.__qualname__}")
    def on_end(self, ev):
        pass
event.register("numba:compile", L())
x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
w = mm.QuantWeight("w", T.Q8_0, 64, 8, quants.quantize(x, T.Q8_0))
mm.matmul(w, x[:1])
print(sorted(set(compiled)))
"""


def test_only_the_formats_used_compile_and_are_found_again(tmp_path):
    """A fresh cache: a Q8_0 product compiles Q8_0's kernels and converters only; a second
    process compiles nothing."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first = eval(runs[0].stdout.strip().splitlines()[-1])  # noqa: S307 - our own child's list of names
    assert {"q8_0.matvec", "q8_0.quantize_row", "matmul.matvec_fused"} <= set(first)
    other_formats = {"plain", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}
    assert not [name for name in first if name.split(".")[0] in other_formats]
    assert eval(runs[1].stdout.strip().splitlines()[-1]) == []  # noqa: S307


_CONVERT_CHILD = """
import sys
import numpy as np
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T
from llamachat.runtime import quants
x = np.random.default_rng(3).standard_normal((8, 256)).astype(np.float32)
for name in sys.argv[1:]:
    t = T[name]
    q = quants.quantize(x, t)
    y = quants.dequantize(q, t, 256)
    assert np.array_equal(y, gq.dequantize(q, t).reshape(8, -1)), name
    if name.endswith("_K"):  # (gguf-py does not quantize these: another format's code is far off)
        assert np.sqrt(np.mean((y - x) ** 2) / np.mean(x ** 2)) < {"Q4_K": 0.143, "Q5_K": 0.0736}[name], name
    else:
        assert np.array_equal(q, gq.quantize(x, t).reshape(8, -1)), name
print("ok")
"""


def test_converters_compiled_apart_are_found_again_apart(tmp_path):
    """Row converters made by one factory for several formats (runtime.quants.block32.
    row_converters, ksearch.k4_row_converters): compiled in different processes, in the same
    order, then loaded together from the cache, each must still run its own format's code
    (ggml's bytes and floats, as gguf-py's reference gives them)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    for formats in (["Q4_0", "Q5_0", "Q4_K"], ["Q4_1", "Q5_1", "Q5_K"], ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K"]):
        run = subprocess.run([sys.executable, "-c", _CONVERT_CHILD, *formats], env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0 and run.stdout.strip() == "ok", (formats, run.stderr[-2000:])
