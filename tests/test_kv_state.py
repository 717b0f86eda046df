"""Saved evaluation states (runtime/model/kv_state.py, Llama.save_state / load_state and their files)
with the real SmolLM2: a loaded state gives the very logits that processing the prompt again
gives, and a state made for another model file, context size or engine is refused, leaving the
cache as it was; files are written atomically and a damaged one is never used."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from llamachat.runtime import Llama, LlamaState
from llamachat.runtime.model import kv_state
from llamachat.runtime.errors import UserError
from llamachat.runtime.model.kv_state import StateError, StateMismatch
from faults import writes_fail_halfway

pytestmark = [pytest.mark.real_model]

TEXT = (b"The old lighthouse keeper climbed the stairs every evening, counting the steps as his "
        b"father had taught him. At the top he lit the lamp, wound the clockwork and watched the "
        b"ships pass the reef. One night the lamp would not light. He checked the wick, the oil and "
        b"the little brass valve, and found them all as they should be. Out on the water a bell "
        b"was ringing, slow and steady, and he knew a boat was coming in blind.")


def _llm(path, n_ctx=512, **kw) -> Llama:
    return Llama(str(path), n_ctx=n_ctx, verbose=False, **kw)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return _llm(smollm2_path)


def _tokens(llm):
    ids = llm.tokenize(TEXT, add_bos=True)
    # more than 64 tokens, so the prefix takes the tiled prompt path a long chat takes
    assert len(ids) > 64
    return ids[:-5], ids[-5:]


def test_loaded_state_gives_the_logits_of_processing_again(llm):
    prefix, rest = _tokens(llm)
    llm.reset()
    llm.eval(prefix)
    state = llm.save_state()
    assert isinstance(state, LlamaState) and state.n_tokens == len(prefix) == state.input_ids[:state.n_tokens].size
    assert state.llama_state_size == len(state.llama_state)
    assert list(state.input_ids[:state.n_tokens]) == prefix and len(state.input_ids) == llm.n_ctx()
    # only the used rows: keys and values of each layer for n_tokens positions, in half floats
    cfg = llm.model.config
    rows = 2 * 2 * cfg.n_layer * len(prefix) * cfg.n_head_kv * cfg.head_dim
    assert rows < state.llama_state_size < rows + 4 * cfg.n_vocab + 4 * len(prefix) + 2000

    llm.eval(rest)
    processed_again = llm._last_logits.copy()  # prefix evaluated, then the rest

    llm.reset()
    llm.eval([1, 2, 3])  # something else in the cache, to be replaced
    llm.load_state(state)
    assert llm.n_tokens == len(prefix) and list(llm._input_ids) == prefix
    llm.eval(rest)
    assert np.array_equal(llm._last_logits, processed_again)  # bit for bit


def test_state_file_resumes_a_completion_in_another_instance(llm, smollm2_path, tmp_path):
    prompt = TEXT.decode()
    llm.reset()
    first = llm.create_completion(prompt, max_tokens=8, temperature=0)
    path = tmp_path / "chat.kvstate"
    written = llm.save_state_file(path)
    assert path.stat().st_size == written and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    n_cached = llm.n_tokens
    # the same request again on the cache as it stands in memory (the prompt's last token is
    # evaluated again, alone: a prompt of 64+ tokens took the tiled path the first time, so
    # this reply may differ from the first one; a loaded state must give this one)
    in_memory = llm.create_completion(prompt, max_tokens=8, temperature=0)["choices"][0]["text"]
    assert llm.last_stats["prompt_eval_tokens"] == 1

    other = _llm(smollm2_path)
    n = other.load_state_file(path)
    assert n == n_cached > len(llm.tokenize(TEXT, add_bos=True))
    again = other.create_completion(prompt, max_tokens=8, temperature=0)
    assert again["choices"][0]["text"] == in_memory and first["choices"][0]["text"]
    # only the prompt's last token was evaluated: the rest came from the file
    assert other.last_stats["prompt_eval_tokens"] == 1
    other.close()


def test_other_context_size_is_refused_and_the_cache_kept(llm, smollm2_path, tmp_path):
    prefix, _ = _tokens(llm)
    llm.reset()
    llm.eval(prefix)
    path = tmp_path / "s.kvstate"
    llm.save_state_file(path)

    small = _llm(smollm2_path, n_ctx=256)
    small.eval([1, 2, 3])
    with pytest.raises(StateMismatch, match="n_ctx was 512, now 256"):
        small.load_state_file(path)
    assert isinstance(StateMismatch("x"), UserError)
    assert small.n_tokens == 3 and list(small._input_ids) == [1, 2, 3]  # left as it was
    # rebuilt: the prompt is processed in full
    small.create_completion(TEXT.decode(), max_tokens=1, temperature=0)
    assert small.last_stats["prompt_eval_tokens"] == small.last_stats["prompt_tokens"]
    small.close()


def test_changed_model_file_is_refused(smollm2_path, tmp_path):
    copy = tmp_path / "model.gguf"
    shutil.copyfile(smollm2_path, copy)
    a = _llm(copy, n_ctx=128)
    a.eval(a.tokenize(b"Hello there", add_bos=True))
    path = tmp_path / "s.kvstate"
    a.save_state_file(path)
    a.close()

    os.utime(copy, ns=(os.stat(copy).st_atime_ns, os.stat(copy).st_mtime_ns + 10**9))
    b = _llm(copy, n_ctx=128)
    with pytest.raises(StateMismatch, match="was modified since"):
        b.load_state_file(path)
    b.close()

    # other weights at the same size and with the same metadata: the last byte of tensor data
    with open(copy, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x01]))
    c = _llm(copy, n_ctx=128)
    with pytest.raises(StateMismatch, match="model file is not the same"):
        c.load_state_file(path)
    c.close()


def test_other_engine_version_is_refused(llm, monkeypatch):
    llm.reset()
    llm.eval(llm.tokenize(b"Hello there", add_bos=True))
    monkeypatch.setattr(kv_state, "_engine_version", "0.0.1+0123456789abcdef")
    old = llm.save_state()
    monkeypatch.undo()
    with pytest.raises(StateMismatch, match="made by engine '0.0.1"):
        llm.load_state(old)


def test_damaged_or_foreign_files_are_refused(llm, tmp_path):
    llm.reset()
    llm.eval(llm.tokenize(b"Hello there, old friend", add_bos=True))
    good = tmp_path / "good.kvstate"
    llm.save_state_file(good)
    data = good.read_bytes()
    cases = {
        "cut": data[:-100],
        "flipped": data[:-50] + bytes([data[-50] ^ 0x10]) + data[-49:],
        "foreign": b"not a state at all" * 10,
        "empty": b"",
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.kvstate"
        bad.write_bytes(content)
        with pytest.raises(StateError, match=f"{bad}"):
            llm.load_state_file(bad)
    assert llm.load_state_file(good) == llm.n_tokens


def test_a_crash_mid_write_leaves_the_old_file(llm, tmp_path):
    path = tmp_path / "chat.kvstate"
    llm.reset()
    llm.eval(llm.tokenize(b"First version", add_bos=True))
    llm.save_state_file(path)
    before = path.read_bytes()

    llm.eval(llm.tokenize(b" and more text after it", add_bos=False))
    with writes_fail_halfway(KeyboardInterrupt()), pytest.raises(KeyboardInterrupt):
        llm.save_state_file(path)
    assert path.read_bytes() == before  # the old state, whole
    assert [p.name for p in tmp_path.iterdir()] == ["chat.kvstate"]  # no temp file left behind
    assert kv_state.read_file(path).n_tokens == len(llm.tokenize(b"First version", add_bos=True))


def test_kill_9_while_writing_leaves_a_whole_state(llm, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    llm.reset()
    llm.eval(llm.tokenize(TEXT, add_bos=True))
    source = tmp_path / "source.kvstate"
    llm.save_state_file(source)
    target = tmp_path / "out" / "chat.kvstate"
    # a writer that rewrites the state again and again until it is killed mid-way
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys\nfrom llamachat.runtime.model import kv_state\n"
        "data = open(sys.argv[1], 'rb').read()\nprint('ready', flush=True)\n"
        "while True:\n    kv_state.write_file(sys.argv[2], data)\n"), str(source), str(target)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not target.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # whatever moment the kill came, the state there is whole and usable
    assert kv_state.read_file(target, llm.model).n_tokens == llm.n_tokens
    assert target.read_bytes() == source.read_bytes()
