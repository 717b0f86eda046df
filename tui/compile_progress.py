"""What the engine is doing while numba compiles its kernels, for the front ends to show.

The first use of the engine on a machine (or after an upgrade), and the first use of a weight
format, compile its kernels for this CPU (those of the model's formats only): tens of seconds on
a 2-core machine, during which nothing else happens. numba announces each compile that
misses its on-disk cache ("numba:compile" events); `CompileWatch` counts them, so the app can
say "Compiling the engine for this CPU" in the chat and the command line can draw a progress
line on stderr. A warm start compiles nothing and shows nothing.

The line tells what is measured, not a forecast: the kernels compiled so far and the seconds
since compiling began. How long a cold compile takes depends on the formats, the machine and
its load, and it changes whenever the engine's kernels do, so a figure written here goes wrong
(one did: "about 15 s" for a wait three times as long). The count of a previous cold compile is no
guide either: the notes beside the cache go with it when an upgrade empties it, and a first run
has none.

Imports numba only when installed (the engine has imported it by then), never at import time.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

QUIET_SECONDS = 1.0  # a compile shorter than this is not worth a message
PAUSE_SECONDS = 1.5  # nothing compiling for this long: the wait is over (between two kernels it is not)


class CompileWatch:
    """Counts numba's compiles (cache misses) from any thread; read with `status()`."""

    def __init__(self):
        self._lock = threading.Lock()
        self._installed = False
        self._holding = 0  # warm-ups in progress (`holding`): their pauses are part of the wait
        self.reset()

    def reset(self) -> None:
        self.started: float | None = None  # when the first compile of this episode began
        self.last: float = 0.0  # when a compile last began or ended
        self.done = 0
        self.depth = 0  # compiles in progress (a kernel compiles the kernels it calls inside its own)
        self.current = ""
        self._ours: list[bool] = []  # per compile in progress: one of the engine's kernels (not numba's own helpers)

    def install(self) -> "CompileWatch":
        """Listen to numba's compile events (once per process; a no-op without numba)."""
        if self._installed:
            return self
        try:
            from numba.core import event
        except ImportError:
            return self
        watch = self

        class _Listener(event.Listener):
            def on_start(self, ev):
                watch._started(ev.data.get("dispatcher") if isinstance(ev.data, dict) else None)

            def on_end(self, ev):
                watch._ended()

        event.register("numba:compile", _Listener())
        self._installed = True
        return self

    def _started(self, dispatcher) -> None:
        func = getattr(dispatcher, "py_func", None)
        module = getattr(func, "__module__", "") or ""
        # numba compiles its own numpy helpers on the way (arrayobj.impl...): they are not counted
        ours = func is None or module.startswith("llamachat.")
        name = f"{module.rsplit('.', 1)[-1]}.{func.__name__}" if func is not None else "a kernel"
        self._begin(name if ours else None, counted=ours)

    def _begin(self, current: str | None, counted: bool) -> None:
        """A compile began (current: what to name now, None: keep the last name); `counted`: it
        adds to the kernels done when it ends."""
        with self._lock:
            now = time.monotonic()
            if self.started is None:  # the first since reset(): the front end resets per load
                self.started = now
            self.depth += 1
            self._ours.append(counted)
            if current is not None:
                self.current = current
            self.last = now

    def _ended(self) -> None:
        with self._lock:
            self.depth = max(0, self.depth - 1)
            if self._ours.pop() if self._ours else True:
                self.done += 1
            self.last = time.monotonic()

    @contextlib.contextmanager
    def elsewhere(self, what: str):
        """While open, a compile goes on in another process (`what` names it), and the wait
        shows as this one's."""
        self._begin(what, counted=False)  # the other process's kernels are not counted here
        try:
            yield
        finally:
            self._ended()

    @contextlib.contextmanager
    def holding(self):
        """While open (a warm-up, which compiles kernel after kernel with plain Python between
        them), the notice of a compile that began in it stays up through any pause, until the
        warm-up ends. Outside one, a pause over PAUSE_SECONDS ends the notice (a kernel compiled
        in the middle of a reply)."""
        with self._lock:
            self._holding += 1
        try:
            yield
        finally:
            with self._lock:
                self._holding -= 1

    def status(self, compact: bool = False) -> str | None:
        """A sentence for the user while compiling has gone on for over a second, else None
        (compact: short enough for one 80-column line after "llamachat: ")."""
        with self._lock:
            now = time.monotonic()
            # between two kernels nothing compiles for a moment: still the same wait (in a
            # warm-up, however long the moment: a cold start's pauses reached 1.5 s under load)
            paused = self.depth == 0 and not self._holding and now - self.last > PAUSE_SECONDS
            if self.started is None or paused:
                return None
            # since the first compile of the episode: a cold start has pauses of plain Python
            # between its kernels (seen: over 1.5 s under load), and the user's wait goes on
            elapsed = now - self.started
            if elapsed < QUIET_SECONDS:
                return None
            kernels = f"{self.done} kernel{'s' if self.done != 1 else ''}"
            if compact:
                return f"compiling the engine for this CPU, once: {kernels} done, {elapsed:.0f} s"
            return (f"Compiling the engine for this CPU, once (later starts reuse it): {kernels} done, "
                    f"{elapsed:.0f} s so far, now {self.current or 'starting'}")

    def summary(self) -> tuple[int, float]:
        """(kernels compiled, seconds) of the latest episode."""
        with self._lock:
            if self.started is None:
                return 0, 0.0
            return self.done, self.last - self.started


WATCH = CompileWatch()


class StderrProgress:
    """While it is open, redraws `WATCH.status()` as one line on stderr (a terminal only), and
    clears it at the end, so a command-line user sees why the first run is slow."""

    def __init__(self, stream=None, interval: float = 0.5):
        self.stream = stream or sys.stderr
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hold = contextlib.ExitStack()
        self._shown = False

    def __enter__(self):
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        if tty:
            WATCH.install()
            self._hold.enter_context(WATCH.holding())  # what runs inside is one wait: the line stays through its pauses
            self._thread = threading.Thread(target=self._run, name="llamachat-compile-progress", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.draw(WATCH.status(compact=True))

    def draw(self, text: str | None) -> None:
        if text:
            width = 79
            self.stream.write("\r\x1b[K" + ("llamachat: " + text)[:width])
            self.stream.flush()
            self._shown = True
        elif self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._hold.close()
        self.draw(None)
        return False


def _warm_note(llm) -> str | None:
    """The file noting that numba's cache holds the kernels of llm's model: named by what decides
    them (its weights' layouts, whether its layers decode as one stack, the instruction set), in
    the engine's cache folder, which runtime.numba_cache empties with it. None if unknown."""
    import os

    from llamachat.runtime import numba_cache
    from llamachat.runtime.quants.simd import HOST_ISA

    model = getattr(llm, "model", None)
    weights = getattr(model, "weights", None)
    if weights is None:
        return None
    matrices = [weights.token_embd, weights.output, *(w for layer in weights.layers for w in layer.matrices)]
    layouts = {f"{w.ggml_type.name}{'x8' if w.packed else ''}" for w in matrices}
    shape = "stack" if model.layer_stack is not None else "layers"
    key = "-".join([getattr(model, "isa", None) or HOST_ISA.name, shape, *sorted(layouts)])  # (its forced instruction set: its own kernels)
    folder = numba_cache.cache_dir_for(os.path.dirname(os.path.abspath(numba_cache.__file__)))
    return os.path.join(folder, key + numba_cache.WARM_SUFFIX)


def model_is_warm(llm) -> bool:
    """True if numba's cache already holds the kernels llm's model runs (noted by `note_warm`
    after a warm-up): a first run, or the first use of a format, is not. A model whose kernels
    cannot be named (not the local engine's) counts as warm: there is nothing to compile."""
    import os

    note = _warm_note(llm)
    return note is None or os.path.exists(note)


def note_warm(llm) -> None:
    """Note that the kernels of llm's model are now in numba's cache (a read-only install: not)."""
    import os

    note = _warm_note(llm)
    if note is not None:
        try:
            os.makedirs(os.path.dirname(note), exist_ok=True)
            with open(note, "w"):
                pass
        except OSError:
            pass
