"""A second process that compiles a model's one-token (decode) kernels into numba's cache while
this one compiles its prompt kernels: on a first run, or a format's first use, the two halves of
the compile run on two cores at once, and the first reply starts about as soon as the slower
half is done instead of after both.

numba compiles in the thread that first calls a kernel and holds a process-wide lock while it
does, so threads cannot share the work; processes can, through the cache folder: each writes
what it compiled there (numba writes its cache files under temporary names and renames them
into place), and a kernel called for the first time is looked up there before it is compiled.
The helper loads the same file with the same settings (same kernels, same instruction set),
evaluates the sizes it was given, says "ready N" on stdout after each, and exits.
The kernels both halves call (attention's one-row kernel: the longest compile of the decode
chain) are compiled by the caller, first; the helper compiles what only decode calls, loads the
model, and waits for the caller's `go` (its stdin closed) before its decode step, which then reads
them from the cache: the two halves of the work stay about even, and no kernel is compiled by
both processes, as a race between them could do. The caller
waits for the decode half before running it itself (so it reads it from the cache instead of
compiling it a second time), and leaves the rest (ggml's tiled attention for long prompts) to
finish in the background; a helper that fails or is killed costs nothing but the wait: the
caller then compiles what is missing itself.

Started only where it can help: two cores or more for this process, and memory for a second
copy of the weights (the helper loads the model too, for a few seconds).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from llamachat.runtime.model.model import available_memory as _available_memory

READY = "ready"
MEMORY_SHARE = 0.4  # the helper's copy of the weights must fit in this share of the available memory


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Helper:
    """A running helper process; `wait_for(n)` blocks until it has evaluated n tokens (True), or
    has ended without doing so (False)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._done: set[int] = set()
        self._cond = threading.Condition()
        self._ended = False
        threading.Thread(target=self._read, name="llamachat-compile-ahead", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                parts = line.split()
                if len(parts) == 2 and parts[0] == READY and parts[1].isdigit():
                    with self._cond:
                        self._done.add(int(parts[1]))
                        self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            self.proc.wait()
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def wait_for(self, n: int, timeout: float | None = None) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: n in self._done or self._ended, timeout)
            return n in self._done

    def go(self) -> None:
        """Let the helper start its decode step: the kernels it shares with this process are in
        numba's cache (closing its stdin; an end of this process does the same)."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass

    def close(self) -> None:
        """Stop the helper if it still runs (what it has cached stays cached)."""
        self.go()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start(llm, sizes: tuple[int, ...]) -> Helper | None:
    """Start a helper evaluating `sizes` (token counts, in this order) with llm's model file, or
    None where it cannot help (one core, too little memory, not a local model file, not
    startable)."""
    path = getattr(llm, "model_path", None)
    model = getattr(llm, "model", None)
    if not sizes or not path or model is None or not os.path.isfile(path) or _cores() < 2:
        return None
    memory = _available_memory()  # (a module name: tests replace it)
    if memory is not None and os.path.getsize(path) > MEMORY_SHARE * memory:
        return None
    cmd = [sys.executable, "-m", "llamachat.tui.compile_ahead", str(path), *(str(n) for n in sizes)]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=dict(os.environ))
    except OSError:
        return None
    return Helper(proc)


def main(argv: list[str]) -> int:
    """The helper: load argv[0], evaluate each size in argv[1:], saying "ready N" after each;
    the first only after stdin ends (the caller's `go`)."""
    path, sizes = argv[0], [int(a) for a in argv[1:]]
    from llamachat.runtime.generation.llama_api import Llama

    from llamachat.runtime.model.forward import compile_decode_kernels

    llm = Llama(path, n_ctx=max(sizes) + 8, n_threads=1, verbose=False)
    compile_decode_kernels(llm.model.weights, llm.model.decode_context)  # while the caller compiles the shared ones
    from .engine_worker import sample_tokens

    ids = sample_tokens(llm, max(sizes))
    try:
        sys.stdin.read()  # until the caller's go: the shared kernels are then in the cache
    except (OSError, ValueError, AttributeError):
        pass
    for n in sizes:
        llm.reset()
        llm.model.eval(ids[:n], logits="last")
        print(READY, n, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
