"""The OpenMP and OpenBLAS settings llamachat runs with, applied by the `llamachat` command
(before numpy loads) and by `Llama(...)` before it starts numba's threads; importing
llamachat.runtime changes nothing in os.environ.

numba's OpenMP workers spin after each parallel region by default (libgomp: 300000 rounds);
while numpy's BLAS runs they then fight its threads for the cores. Fully passive workers cost
a futex wake-up per region instead, and a token runs more than a hundred regions (4 products
and the attention per layer): on 2 cores the wake-ups cost more than the products of a small
model (SmolLM2 Q4_K_M decode: 20 ms a token with a spin of 1000 rounds, 9 ms spinning without
end). Since prompts go through numba's integer kernels for the common formats (BLAS only
multiplies Q2_K/Q3_K/BF16 tiles), the workers spin 200000 rounds (a fraction of a
millisecond, so between the regions of one token and of the next), then sleep: an idle app
costs no CPU. libgomp reads these when numba first loads it.

The other way round: numpy's OpenBLAS workers spin about 0.1 s after each product before
sleeping, and a prompt alternates BLAS products with numba's parallel kernels, which then share
the cores with a spinning thread; OPENBLAS_THREAD_TIMEOUT 12 (2**12 cycles) puts them to sleep
soon. Read when numpy loads OpenBLAS: effective only if applied before numpy is imported.

A user's own settings win.
"""

from __future__ import annotations

import os

NAMES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT")
# what the user had before llamachat set anything (bench passes it on to llama-bench unchanged)
USER_OMP_ENV = {name: os.environ.get(name) for name in NAMES}


def apply_thread_env(environ=None) -> None:
    """Set OMP_WAIT_POLICY/GOMP_SPINCOUNT (unless either is set) and OPENBLAS_THREAD_TIMEOUT
    (unless set) in `environ` (os.environ by default)."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_WAIT_POLICY") is None and environ.get("GOMP_SPINCOUNT") is None:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
        environ["GOMP_SPINCOUNT"] = "200000"  # overrides PASSIVE's zero: spin a while, then sleep
    environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")
