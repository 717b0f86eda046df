"""A batch's per-token steps split over threads from Python: `over_rows(kernel, n, *args)` runs
a serial compiled kernel `kernel(start, stop, *args)` on contiguous spans of the n tokens, one
span per thread (numba's thread count of the calling thread, as a `prange` loop would use),
the first in the calling thread, the others in a small pool of Python threads.

Why not `prange`: numba's parallel lowering costs one to three seconds of compile per parallel
kernel, and a cold start compiles the prompt's per-token steps (the residual add and norm, RoPE,
SwiGLU, the activations' rounding) before its first token. A serial kernel compiled with
`nogil=True` releases the GIL while it runs, so the spans run on the cores at once; handing
a span to a pool thread costs some tens of microseconds, a few milliseconds for a whole prompt
of 30 layers (the products, which stay numba's parallel kernels, take hundreds).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numba

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _executor(n: int) -> ThreadPoolExecutor:
    """A pool of at least n threads (made on first use, grown if a caller asks for more)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="llamachat-rows")
            _pool_size = n
        return _pool


def spans(n_rows: int, n_threads: int) -> list[tuple[int, int]]:
    """[0, n_rows) cut into n_threads contiguous spans of sizes differing by at most one."""
    n = max(1, min(n_threads, n_rows))
    bounds = [n_rows * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def over_rows(kernel, n_rows: int, *args) -> None:
    """kernel(start, stop, *args) for spans covering [0, n_rows), one per thread of
    numba.get_num_threads(); returns when every span is done (re-raising a span's error)."""
    parts = spans(n_rows, numba.get_num_threads())
    if len(parts) == 1:
        kernel(0, n_rows, *args)
        return
    pool = _executor(len(parts) - 1)
    futures = [pool.submit(kernel, start, stop, *args) for start, stop in parts[1:]]
    try:
        kernel(parts[0][0], parts[0][1], *args)
    finally:
        for f in futures:  # (all of them, even after an error: none may still write into the arrays)
            f.exception()
    for f in futures:
        f.result()
