"""Dropping numba's on-disk cache when the sources it was compiled from changed.

numba's cache checks only the source file of the function it caches, but our kernels call
kernels of other modules, and numba links the callees' code into the caller's cache entry:
after an edit to matmul.py or simd.py, forward.py's cached decode functions would silently keep
running the old products (and after an upgrade that changes one file's kernels, the same). So a
stamp of every source file of a package (and its subpackages) is kept beside the cache; when it
no longer matches, the package's cache files are deleted (with the front ends' `.warm` notes
saying which models' kernels it held): one recompile, never stale code.
Reads only file metadata; imports nothing heavy.

Where numba keeps a package's cache: `package/__pycache__`, or, when NUMBA_CACHE_DIR is set
(the `llamachat` command sets it under LLAMACHAT_HOME), a folder of that directory named as
numba names it (`cache_dir_for`); the stamp and the deleting follow it there.
"""

from __future__ import annotations

import hashlib
import os


# a file named <key>.warm beside the cache: the kernels of that key (compile_progress's) are in it
WARM_SUFFIX = ".warm"


def cache_dir_for(package_dir: str) -> str:
    """The folder numba writes package_dir's cache files to: NUMBA_CACHE_DIR/<name>_<sha1 of
    the path> (numba.core.caching.UserProvidedCacheLocator's scheme) when that variable is
    set, else package_dir/__pycache__."""
    override = os.environ.get("NUMBA_CACHE_DIR")
    if override:
        subpath = os.path.abspath(package_dir)
        hashed = hashlib.sha1(subpath.encode()).hexdigest()
        return os.path.join(override, f"{os.path.split(subpath)[-1]}_{hashed}")
    return os.path.join(package_dir, "__pycache__")


def drop_stale_numba_cache(package_dir: str, watched: tuple[str, ...] = ("",)) -> None:
    """Delete package_dir's numba cache files (*.nbi|nbc in `cache_dir_for(package_dir)`) if
    any .py file in the `watched` folders (relative to package_dir) changed since the last call;
    a read-only install is left as it is."""
    cache_dir = cache_dir_for(package_dir)
    try:
        parts = []
        for sub in watched:
            folder = os.path.join(package_dir, sub)
            for name in sorted(f for f in os.listdir(folder) if f.endswith(".py")):
                st = os.stat(os.path.join(folder, name))
                parts.append(f"{sub}/{name}:{st.st_mtime_ns}:{st.st_size}")
        stamp = ";".join(parts)
        stamp_file = os.path.join(cache_dir, "numba-sources.stamp")
        try:
            with open(stamp_file) as fh:
                if fh.read() == stamp:
                    return
        except OSError:
            pass
        if os.path.isdir(cache_dir):
            for name in os.listdir(cache_dir):
                if name.endswith((".nbi", ".nbc", WARM_SUFFIX)):
                    os.unlink(os.path.join(cache_dir, name))
        os.makedirs(cache_dir, exist_ok=True)
        with open(stamp_file, "w") as fh:
            fh.write(stamp)
    except OSError:  # a read-only install: numba then caches elsewhere or not at all
        pass


def drop_stale_engine_caches() -> None:
    """drop_stale_numba_cache for every folder of the engine (llamachat.runtime and each of its
    subpackages), each watching all of them: numba links a kernel's callees into the caller's
    cache entry across folders (model/forward.py's decode calls quants/matmul.py's products,
    which inline quants/simd.py's IR), so an edit in any folder must drop every folder's cache.
    The subpackages are found on disk, so a new one is watched without a change here."""
    root = os.path.dirname(os.path.abspath(__file__))
    try:
        subs = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "__init__.py")))
    except OSError:
        return
    folders = ["", *subs]
    for sub in folders:
        here = os.path.join(root, sub)
        drop_stale_numba_cache(here, tuple(os.path.relpath(os.path.join(root, s), here) for s in folders))
