"""The cold start's second process (tui/compile_ahead): its protocol, when it is not started,
and how warm_up shares the sizes with it. (The time it saves is measured by a cold start on an
empty cache, in the README's figures, not here.)"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from llamachat.tui import compile_ahead, engine_worker


def _helper(code: str) -> compile_ahead.Helper:
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    return compile_ahead.Helper(proc)


def test_helper_reports_each_size_as_it_is_ready():
    helper = _helper("import time\nprint('ready 1', flush=True)\ntime.sleep(0.3)\nprint('ready 64', flush=True)")
    assert helper.wait_for(1, timeout=30)
    assert helper.wait_for(64, timeout=30)
    helper.close()


def test_the_helper_waits_for_go_and_close_lets_it_go():
    """The helper's decode step waits for the caller's go (its stdin closed), so that it reads
    the kernels the caller compiles first from the cache instead of compiling them too."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys\nsys.stdin.read()\nprint('ready 1', flush=True)"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    helper = compile_ahead.Helper(proc)
    assert not helper.wait_for(1, timeout=0.5)  # not before the go
    helper.go()
    assert helper.wait_for(1, timeout=30)
    helper.go()  # twice: harmless
    helper.close()


def test_a_helper_that_ends_early_is_not_waited_for():
    helper = _helper("import sys\nprint('loading', flush=True)\nsys.exit(3)")
    start = time.monotonic()
    assert not helper.wait_for(1, timeout=60)
    assert time.monotonic() - start < 30  # returned when the process ended, not at the timeout
    helper.close()


def test_close_stops_a_running_helper():
    helper = _helper("import time\ntime.sleep(60)")
    helper.close()
    assert helper.proc.poll() is not None


class _Model:
    eval = None


class _Llm:
    def __init__(self, path):
        self.model_path, self.model = path, _Model()


def test_no_helper_where_it_cannot_help(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"0" * 1000)
    assert compile_ahead.start(_Llm(None), (1,)) is None  # no file behind the model
    assert compile_ahead.start(_Llm(str(tmp_path / "gone.gguf")), (1,)) is None
    monkeypatch.setattr(compile_ahead, "_cores", lambda: 1)
    assert compile_ahead.start(_Llm(str(path)), (1,)) is None  # one core: it would only slow this one
    monkeypatch.setattr(compile_ahead, "_cores", lambda: 2)
    monkeypatch.setattr(compile_ahead, "_available_memory", lambda: 2000)
    assert compile_ahead.start(_Llm(str(path)), (1,)) is None  # no room for a second copy of the weights


def test_the_helper_process_evaluates_its_sizes(smollm2_path, capsys):
    assert compile_ahead.main([str(smollm2_path), "1", "8"]) == 0
    assert capsys.readouterr().out.split("\n") == ["ready prompt", "ready 1", "ready 8", ""]


class _ReaderGone:
    """The helper's stdout once the caller has ended after reading "ready prompt"."""

    def __init__(self):
        self.lines = []

    def write(self, text):
        if any(line.endswith("\n") for line in self.lines):
            raise BrokenPipeError(32, "Broken pipe")
        self.lines.append(text)
        return len(text)

    def flush(self):
        pass


def test_a_released_helper_notes_the_model_warm_and_finishes(smollm2_path, monkeypatch):
    """The caller ended (a short one-shot: `release` at its exit): the helper still finishes the
    decode kernels and notes the model warm, so the next start needs no helper, then the
    long-prompt kernels, which that start's warm-up runs (unheard: nobody reads it any more)."""
    from llamachat.tui import compile_progress

    noted, evaluated = [], []
    monkeypatch.setattr(compile_progress, "note_warm", lambda llm: noted.append(llm.model.n_past))
    out = _ReaderGone()
    monkeypatch.setattr(sys, "stdout", out)
    from llamachat.runtime.model.model import LlamaModel

    real_eval = LlamaModel.eval
    monkeypatch.setattr(LlamaModel, "eval", lambda self, ids, **kw: evaluated.append(len(ids)) or real_eval(self, ids, **kw))
    assert compile_ahead.main([str(smollm2_path), "1", "64"]) == 0
    assert "".join(out.lines) == "ready prompt\n"
    assert noted == [1] and evaluated == [1, 64]  # noted after its decode step


def test_when_done_calls_back_with_the_answer():
    helper = _helper("import time\nprint('ready prompt', flush=True)\ntime.sleep(0.3)\nprint('ready 1', flush=True)")
    got = []
    done = threading.Event()
    helper.when_done(1, lambda ok: got.append(ok) or done.set())
    assert done.wait(30) and got == [True]
    assert helper.wait_for(compile_ahead.PROMPT, timeout=30)
    helper.close()
    failed = _helper("import sys\nsys.exit(3)")
    done.clear()
    failed.when_done(1, lambda ok: got.append(ok) or done.set())
    assert done.wait(30) and got == [True, False]
    failed.close()


class _FakeHelper:
    def __init__(self, sizes):
        self.sizes, self.waited, self.went, self.callbacks = sizes, [], 0, {}

    def go(self):
        self.went += 1

    def wait_for(self, n, timeout=None):
        assert self.went, "the helper was not let go before it was waited for"
        self.waited.append(n)
        return True

    def when_done(self, n, fn):
        self.callbacks[str(n)] = fn

    def release(self):
        pass


@pytest.mark.parametrize("sizes, here, ahead", [
    (None, [8, 1], (1, 64)),  # the app: the short prompt here, decode and the tiled prompt there
    ((30, 1), [30, 1], (1,)),  # a one-shot's prompt and decode
    ((100, 1), [100, 1], (1,)),  # a long one-shot prompt stays here: it is needed now
])
@pytest.mark.parametrize("helper_ok", [True, False])
def test_warm_up_leaves_decode_to_the_helper_when_cold(smollm2_path, monkeypatch, sizes, here, ahead, helper_ok):
    """Cold: the helper compiles a prompt's passes and half its products while this process
    compiles the shared kernels (it is let go first) and the other half, this process waits for
    the helper's prompt kernels only, and decodes through
    the prompt kernels until the helper says its decode step is done (or has failed); the model
    is noted warm by the helper, when its decode kernels are in the cache, not here."""
    from llamachat.runtime import Llama
    from llamachat.tui import compile_progress

    llm = Llama(str(smollm2_path), n_ctx=256, verbose=False)
    started, noted, evaluated = [], [], []
    monkeypatch.setattr(compile_progress, "model_is_warm", lambda _: False)
    monkeypatch.setattr(compile_progress, "note_warm", lambda _: noted.append(True))
    monkeypatch.setattr(compile_ahead, "start", lambda _, s: started.append(_FakeHelper(s)) or started[-1])
    monkeypatch.setattr(engine_worker.atexit, "register", lambda f: None)
    real_eval = llm.model.eval
    monkeypatch.setattr(llm.model, "eval", lambda ids, **kw: evaluated.append(len(ids)) or real_eval(ids, **kw))
    engine_worker.warm_up(llm, sizes)
    (helper,) = started
    assert evaluated == here
    assert helper.sizes == ahead and helper.waited == [compile_ahead.PROMPT]  # not its decode step
    assert helper.went == 1  # let go once, after the kernels both processes call were compiled here
    assert noted == [] and llm.model.n_past == 0
    assert llm.model.decode_deferred()  # single tokens through the prompt kernels, for now
    helper.callbacks["1"](helper_ok)
    assert not llm.model.decode_deferred()  # then the one-call decode (compiled here if the helper failed)
    assert noted == []


def test_warm_up_starts_no_helper_when_warm(smollm2_path, monkeypatch):
    from llamachat.runtime import Llama
    from llamachat.tui import compile_progress

    llm = Llama(str(smollm2_path), n_ctx=256, verbose=False)
    monkeypatch.setattr(compile_progress, "model_is_warm", lambda _: True)
    monkeypatch.setattr(compile_ahead, "start", lambda *_: pytest.fail("a helper for a warm model"))
    engine_worker.warm_up(llm)
    assert llm.model.n_past == 0
