"""`llamachat import` of GGUF files, and the import's promises on failure: a full disk,
Ctrl-C, a taken name or file: nothing half-written, the source and the library untouched."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from llamachat.model_store import importers, paths
from llamachat.model_store.importers import run_import
from llamachat.model_store.library import Library
from llamachat.runtime import atomic_file
from llamachat.runtime.gguf import writer as gguf_writer
from llamachat.runtime.errors import ModelError, UserError
from test_import_hf import sentencepiece_model


def leftovers() -> list[str]:
    d = paths.models_dir()
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.mark.real_model
def test_gguf_file_is_stored_and_registered(smollm2_path):
    before = smollm2_path.stat()
    result = run_import(smollm2_path)
    assert result.entry.name == "smollm2-135m-instruct-q4_1" and result.kind == "GGUF"
    assert result.path == paths.models_dir() / "smollm2-135m-instruct-q4_1.gguf"
    assert result.path.stat().st_size == before.st_size == result.size
    with open(result.path, "rb") as a, open(smollm2_path, "rb") as b:
        assert a.read(1 << 20) == b.read(1 << 20)
    assert Library.load().models[result.entry.name].path == result.path
    assert smollm2_path.stat().st_mtime == before.st_mtime
    assert leftovers() == [result.path.name]


def test_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"notes\.txt: not a GGUF file; import takes a \.gguf file, a Hugging Face model folder"):
        run_import(tmp_path / "notes.txt")
    with pytest.raises(UserError, match="no such file or folder"):
        run_import(tmp_path / "nothing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match=r"neither config\.json \(Hugging Face\) nor params\.json \(Meta\)"):
        run_import(tmp_path / "folder")


def test_truncated_gguf_is_refused(tmp_path):
    sentencepiece_model(tmp_path / "base", added=False)
    good = run_import(tmp_path / "base", name="base").path
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(UserError, match=r"bad\.gguf: not a valid GGUF file"):
        run_import(bad)
    assert leftovers() == ["base.gguf"]


def test_other_architecture_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    gguf_writer.write_gguf(path, {"general.architecture": "gpt2"}, [("w", (32,), 0, np.zeros(32, np.float32))])
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported"):
        run_import(path)


def test_existing_file_in_the_data_dir_is_never_replaced(tmp_path):
    sentencepiece_model(tmp_path / "base", added=False)
    paths.models_dir().mkdir(parents=True)
    precious = paths.models_dir() / "base.gguf"
    precious.write_bytes(b"someone else's file")
    with pytest.raises(UserError, match=r"base\.gguf already exists; choose another name with --name"):
        run_import(tmp_path / "base", name="base")
    assert precious.read_bytes() == b"someone else's file" and leftovers() == ["base.gguf"]


def test_not_enough_space_is_said_before_writing(tmp_path, monkeypatch):
    sentencepiece_model(tmp_path / "base", added=False)
    monkeypatch.setattr(importers, "free_bytes", lambda folder: 1000)
    with pytest.raises(UserError, match=r"not enough space on the disk holding .* for base \(about 0\.\d MB needed, 0\.0 MB free\); nothing was imported"):
        run_import(tmp_path / "base", name="base")
    assert leftovers() == [] and Library.load().models == {}


class _FullDisk:
    """Files opened through it fail with ENOSPC once `limit` bytes were written."""

    def __init__(self, limit: int):
        self.limit, self.written = limit, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, mode="rb", *args, **kwargs):
        f = os.fdopen(fd, mode, *args, **kwargs)
        disk = self

        class Writer:
            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                n = memoryview(data).nbytes
                if disk.written + n > disk.limit:
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.written += n
                return f.write(data)

        return Writer()


def test_full_disk_while_writing_leaves_nothing(tmp_path, monkeypatch):
    sentencepiece_model(tmp_path / "base", added=False)
    Library.load().ensure_file()
    config_before = paths.config_file().read_bytes()
    with monkeypatch.context() as m:  # (not monkeypatch.undo(): that would drop LLAMACHAT_HOME too)
        m.setattr(atomic_file, "os", _FullDisk(limit=60_000))  # (GGUF files are written through atomic_file)
        with pytest.raises(UserError, match=r"no space left on the disk holding .* while writing base; nothing was imported"):
            run_import(tmp_path / "base", name="base")
    assert leftovers() == []
    assert paths.config_file().read_bytes() == config_before and Library.load().models == {}
    assert run_import(tmp_path / "base", name="base").path.is_file()  # the source is intact


def test_ctrl_c_during_conversion_leaves_nothing(tmp_path):
    sentencepiece_model(tmp_path / "base", added=False)

    def progress(stage, done, total, what):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_import(tmp_path / "base", name="base", progress=progress)
    assert leftovers() == [] and Library.load().models == {}


def test_library_failure_removes_the_stored_file(tmp_path, monkeypatch):
    sentencepiece_model(tmp_path / "base", added=False)

    def refuse(self, *a, **k):
        raise UserError("the library is locked by a test")

    monkeypatch.setattr(Library, "add", refuse)
    with pytest.raises(UserError, match="locked by a test"):
        run_import(tmp_path / "base", name="base")
    assert leftovers() == []


def test_bad_name(tmp_path):
    sentencepiece_model(tmp_path / "base", added=False)
    with pytest.raises(UserError, match="is not a usable model name"):
        run_import(tmp_path / "base", name="../escape")


def test_without_hard_links_the_file_is_still_placed_safely(tmp_path, monkeypatch):
    sentencepiece_model(tmp_path / "base", added=False)

    def no_links(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(importers.os, "link", no_links)
    result = run_import(tmp_path / "base", name="base")
    assert result.path.stat().st_size == result.size > 0 and leftovers() == ["base.gguf"]


def test_unwritable_models_dir_is_one_sentence(tmp_path, monkeypatch):
    sentencepiece_model(tmp_path / "base", added=False)

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(importers.tempfile, "mkdtemp", refuse)
    with pytest.raises(UserError, match=r"models: cannot write there \(Permission denied\); nothing was imported"):
        run_import(tmp_path / "base", name="base")


def test_cancel_from_another_thread_leaves_nothing(tmp_path):
    import threading

    from llamachat.model_store.importers import ImportCancelled, import_model

    sentencepiece_model(tmp_path / "base", added=False)
    cancel = threading.Event()
    seen = []

    def progress(stage, done, total, what):
        seen.append(done)
        if done == 3:
            threading.Thread(target=cancel.set).start()
            threading.Event().wait(0.2)

    with pytest.raises(ImportCancelled, match=r"the import of .*base was cancelled; nothing was imported"):
        import_model(tmp_path / "base", name="base", quant="Q8_0", progress=progress, cancel=cancel)
    assert max(seen) == 3 and leftovers() == [] and Library.load().models == {}
