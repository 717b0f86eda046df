"""A second process that compiles half of a model's kernels into numba's cache while this one
compiles the other half: on a first run, or a format's first use, the compile runs on two
cores at once, and the first reply starts about as soon as this process's half is done.

numba compiles in the thread that first calls a kernel and holds a process-wide lock while it
does, so threads cannot share the work; processes can, through the cache folder: each writes
what it compiled there (numba writes its cache files under temporary names and renames them
into place), and a kernel called for the first time is looked up there before it is compiled.
The helper loads the same file with the same settings (same kernels, same instruction set) and
works in three steps, saying on stdout when each is done (and, after the second, noting the
model warm: compile_progress.note_warm):
1. a prompt's per-token passes (norms, RoPE, SwiGLU, the activations' rounding) and one share
   of its batch products ("ready prompt"), while the caller compiles the kernels prompts and
   decode share (attention's one-row kernel), the samplers and the other share; the caller
   then waits for this step and runs its first prompt, reading this step's kernels from the
   cache;
2. after the caller's `go` (its stdin closed: the shared kernels are in the cache), the
   one-token decode chain, what only decode calls first, then one decode step ("ready 1"); the
   caller meanwhile decodes through the prompt kernels (LlamaModel.defer_decode: the same
   floats) and switches when this step is done;
3. the other sizes it was given ("ready N" after each: ggml's tiled attention of long prompts).
So no kernel is compiled by both processes, as a race between them could do, and the caller's
first reply waits for neither step 2 nor 3. A helper that fails or is killed costs nothing but
the wait: the caller then compiles what is missing itself.

Started only where it can help: two cores or more for this process, and memory for a second
copy of the weights (the helper loads the model too, for a few seconds).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from llamachat.runtime.model.model import available_memory as _available_memory
from llamachat.runtime.quants import available_cores

READY = "ready"
PROMPT = "prompt"  # the step after which the helper says "ready prompt"
MEMORY_SHARE = 0.4  # the helper's copy of the weights must fit in this share of the available memory


def _cores() -> int:  # (a module name: tests replace it)
    return available_cores()


class Helper:
    """A running helper process; `wait_for(n)` blocks until it has evaluated n tokens (or done
    step n: PROMPT) (True), or has ended without doing so (False); `when_done(n, fn)` calls fn
    with the same answer, from another thread, without blocking."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._done: set[str] = set()
        self._cond = threading.Condition()
        self._ended = False
        threading.Thread(target=self._read, name="llamachat-compile-ahead", daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                parts = line.split()
                if len(parts) == 2 and parts[0] == READY:
                    with self._cond:
                        self._done.add(parts[1])
                        self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            self.proc.wait()
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def wait_for(self, n: int | str, timeout: float | None = None) -> bool:
        key = str(n)
        with self._cond:
            self._cond.wait_for(lambda: key in self._done or self._ended, timeout)
            return key in self._done

    def when_done(self, n: int | str, fn) -> None:
        """Call fn(True) once step n is done, or fn(False) if the helper ends first."""
        threading.Thread(target=lambda: fn(self.wait_for(n)), name="llamachat-compile-ahead-wait", daemon=True).start()

    def go(self) -> None:
        """Let the helper start its decode step: the kernels it shares with this process are in
        numba's cache (closing its stdin; an end of this process does the same)."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass

    def release(self) -> None:
        """At this process's end: let the helper finish its steps on its own (the decode
        kernels go into the cache and the model is noted warm, then the long-prompt kernels),
        so that a short first run, a one-shot or a piped question, leaves the next start warm;
        it then ends."""
        self.go()

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
    """The helper: load argv[0], compile a prompt's passes and its share of the products ("ready
    prompt"), then evaluate each size in argv[1:], saying "ready N" after each, the first only
    after stdin ends (the caller's `go`)."""
    path, sizes = argv[0], [int(a) for a in argv[1:]]
    from llamachat.runtime.generation.llama_api import Llama

    from llamachat.runtime.model.forward import compile_decode_kernels, compile_products, compile_prompt_passes

    llm = Llama(path, n_ctx=max(sizes) + 8, n_threads=1, verbose=False)
    model = llm.model
    compile_prompt_passes(model.config, model.weights, model.cache)  # while the caller compiles the shared ones
    compile_products(model.weights, part=1)  # (the caller compiles part 0)
    print(READY, PROMPT, flush=True)
    try:
        sys.stdin.read()  # until the caller's go: the shared kernels are then in the cache
    except (OSError, ValueError, AttributeError):
        pass
    compile_decode_kernels(model.weights, model.decode_context)
    from .compile_progress import note_warm
    from .engine_worker import sample_tokens

    ids = sample_tokens(llm, max(sizes))
    heard = True
    for n in sizes:
        llm.reset()
        llm.model.eval(ids[:n], logits="last")
        if n == 1:  # the decode kernels are in the cache: the next start needs no helper
            note_warm(llm)
        if heard:
            try:
                print(READY, n, flush=True)
            except (BrokenPipeError, ValueError):  # the caller has ended (release): go on unheard,
                heard = False  # so that its next start finds every kernel of its warm-up cached
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
