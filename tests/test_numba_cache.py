"""runtime.numba_cache: numba's on-disk cache is dropped when any watched source changes
(numba itself checks only the caching function's own file, and would keep running a changed
callee's old code)."""

import os

from llamachat.runtime.numba_cache import drop_stale_numba_cache


def _cache_files(pkg):
    return sorted(f for f in os.listdir(pkg / "__pycache__") if f.endswith((".nbi", ".nbc")))


def test_cache_dropped_when_a_watched_source_changes(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 1\n")
    drop_stale_numba_cache(str(pkg), ("", "sub"))
    (pkg / "__pycache__" / "a.f-1.py311.nbi").write_text("index")
    (pkg / "__pycache__" / "a.f-1.py311.1.nbc").write_text("code")
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_text("bytecode")

    drop_stale_numba_cache(str(pkg), ("", "sub"))  # nothing changed: kept
    assert _cache_files(pkg) == ["a.f-1.py311.1.nbc", "a.f-1.py311.nbi"]

    (pkg / "sub" / "b.py").write_text("y = 22\n")  # a callee's module, in a subfolder
    drop_stale_numba_cache(str(pkg), ("", "sub"))
    assert _cache_files(pkg) == []
    assert (pkg / "__pycache__" / "a.cpython-311.pyc").exists()  # Python's own cache untouched


def test_read_only_install_is_left_alone(tmp_path):
    drop_stale_numba_cache(str(tmp_path / "missing"))  # no such folder: no error
