"""runtime.numba_cache: numba's on-disk cache is dropped when any watched source changes
(numba itself checks only the caching function's own file, and would keep running a changed
callee's old code)."""

import os
from pathlib import Path

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


def _as_unprivileged(fn) -> int:
    """Run fn() in a forked child that cannot write where file modes forbid it (root ignores
    them, so as root the child first becomes nobody); the child's exit status: 0 if fn
    returned, 1 if it raised."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            fn()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_read_only_install_is_left_alone():
    """A package folder the process cannot write (an install owned by root, used by someone
    else): a changed source cannot drop the stale cache files, and that is no error; nothing
    is deleted and no stamp written."""
    import shutil
    import stat
    import tempfile

    base = tempfile.mkdtemp()  # not under pytest's tmp folder: that one is private to its owner
    try:
        pkg = os.path.join(base, "pkg")
        os.makedirs(os.path.join(pkg, "__pycache__"))
        with open(os.path.join(pkg, "a.py"), "w") as fh:
            fh.write("x = 1\n")
        for name in ("a.f-1.py311.nbi", "a.f-1.py311.1.nbc"):  # stale: no stamp matches them
            with open(os.path.join(pkg, "__pycache__", name), "w") as fh:
                fh.write("old")
        for folder in (base, pkg, os.path.join(pkg, "__pycache__")):
            os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)

        def cannot_write():  # the set-up is really read-only for the child
            try:
                open(os.path.join(pkg, "__pycache__", "probe"), "w").close()
            except PermissionError:
                return
            raise AssertionError("the folder is writable")

        assert _as_unprivileged(cannot_write) == 0
        assert _as_unprivileged(lambda: drop_stale_numba_cache(pkg)) == 0
        assert _cache_files(Path(pkg)) == ["a.f-1.py311.1.nbc", "a.f-1.py311.nbi"]
        assert not os.path.exists(os.path.join(pkg, "__pycache__", "numba-sources.stamp"))
        drop_stale_numba_cache(os.path.join(base, "missing"))  # no such folder: no error either
    finally:
        for folder in (base, os.path.join(base, "pkg"), os.path.join(base, "pkg", "__pycache__")):
            os.chmod(folder, stat.S_IRWXU)
        shutil.rmtree(base)
