"""Data safety (issue 17, item 8): a process killed with SIGKILL in the middle of a library
write, an import, a quantize or a pull leaves the previous state readable and nothing
half-written in view (the chat store's own kill test is in test_chat_store.py). Every writer
goes through a hidden temp file renamed into place; these tests hold them to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamachat.model_store import paths
from llamachat.model_store.library import Library
from llamachat.runtime.gguf.reader import GGUFFile

pytestmark = pytest.mark.slow


def killed_after(code: str, delay: float, *args: str) -> None:
    """Run `code` in a fresh interpreter (same LLAMACHAT_HOME), SIGKILL it `delay` s after it
    says it is ready (its imports done), and wait for it."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)


def visible_files(folder: Path) -> list[Path]:
    """What a user sees: files not hidden by a leading dot (temp files are)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def assert_models_whole(expected_size: int | None = None) -> Library:
    """models.toml reads, and every model file in view is a whole GGUF."""
    lib = Library.load()
    models = paths.models_dir()
    for path in visible_files(models) if models.is_dir() else []:
        with GGUFFile(path):  # a truncated file fails here (tensor data past the end)
            pass
        if expected_size is not None:
            assert path.stat().st_size == expected_size, path
    for entry in lib.models.values():
        assert not entry.missing, f"{entry.name} is listed but its file {entry.path} is not there"
    return lib


LIBRARY_WRITER = """
import sys
from llamachat.model_store.library import Library
lib = Library.load()
print("ready", flush=True)
i = 0
while True:  # change one model as fast as possible until killed
    i += 1
    lib.set("m", temp=(i % 100) / 100, description="x" * 20000 + str(i))
"""


def test_kill_during_library_writes_keeps_a_whole_library(tmp_path, smollm2_path):
    lib = Library.load()
    lib.add(smollm2_path, name="m", description="first")
    for delay in (0.2, 0.5, 0.9):
        killed_after(LIBRARY_WRITER, delay)
        lib = Library.load()  # never a half-written TOML
        (entry,) = lib.models.values()
        if entry.description != "first":
            n = int(entry.description.lstrip("x"))
            assert entry.description == "x" * 20000 + str(n) and entry.settings["temp"] == (n % 100) / 100
        backup = paths.config_file().with_name("models.toml.bak")
        if backup.exists():
            Library.from_text(backup.read_text(), backup)  # the backup is whole too
    assert [p.name for p in visible_files(paths.config_dir())] in (["models.toml"], ["models.toml", "models.toml.bak"],
                                                                  ["models.toml", "models.toml.bak", "models.toml.lock"],
                                                                  ["models.toml", "models.toml.lock"])


IMPORTER = """
import sys
from llamachat.model_store.importers import run_import
print("ready", flush=True)
run_import(sys.argv[1], name=sys.argv[2])
"""


def test_kill_during_an_import_leaves_nothing_half_written(tmp_path, smollm2_path):
    size = smollm2_path.stat().st_size
    for i, delay in enumerate((0.05, 0.3, 0.8, 1.5)):
        killed_after(IMPORTER, delay, str(smollm2_path), f"imp{i}")
        lib = assert_models_whole(expected_size=size)
        for entry in lib.models.values():
            assert entry.path.stat().st_size == size
    # and an import that is left alone still completes afterwards
    subprocess.run([sys.executable, "-c", IMPORTER.replace('print("ready", flush=True)\n', ""), str(smollm2_path), "final"], check=True, timeout=600)
    assert "final" in assert_models_whole(expected_size=size).models


QUANTIZER = """
import sys
from llamachat.runtime.gguf.quantize_model import quantize_model
print("ready", flush=True)
quantize_model(sys.argv[1], sys.argv[2], "Q8_0")
"""


def test_kill_during_quantize_leaves_no_partial_output(tmp_path, smollm2_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    previous = out_dir / "m.Q8_0.gguf"
    previous.write_bytes(b"the user's previous file")
    for delay in (0.5, 2.0, 5.0):
        killed_after(QUANTIZER, delay, str(smollm2_path), str(out_dir / "new.Q8_0.gguf"))
        for path in visible_files(out_dir):
            if path != previous:
                with GGUFFile(path):  # either absent or whole
                    pass
        assert previous.read_bytes() == b"the user's previous file"


PULLER = """
from llamachat.model_store.pull import pull
print("ready", flush=True)
pull("smollm2")
"""


def test_kill_during_pull_leaves_nothing_half_written(tmp_path, smollm2_path):
    size = smollm2_path.stat().st_size  # the cache already holds it (conftest): pull copies and registers
    for delay in (0.05, 0.2, 0.5, 1.0):
        killed_after(PULLER, delay)
        assert_models_whole(expected_size=size)
    subprocess.run([sys.executable, "-c", PULLER], check=True, timeout=600, capture_output=True)
    lib = assert_models_whole(expected_size=size)
    assert "smollm2-135m-instruct" in lib.models
