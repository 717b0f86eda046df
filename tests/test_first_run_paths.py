"""Where things live (issue 18, bugs c and o): LLAMACHAT_HOME covers the download cache too, and
a program can ask where a pulled model's file is."""

from __future__ import annotations

import pytest

from llamachat.model_store import paths
from llamachat.runtime.errors import UserError


def test_llamachat_home_covers_the_cache(isolated_home, monkeypatch):
    monkeypatch.delenv("LLAMACHAT_CACHE_DIR", raising=False)
    for folder in (paths.config_dir(), paths.data_dir(), paths.models_dir(), paths.cache_dir()):
        assert folder.is_relative_to(isolated_home), folder
    monkeypatch.setenv("LLAMACHAT_CACHE_DIR", str(isolated_home.parent / "elsewhere"))
    assert paths.cache_dir() == isolated_home.parent / "elsewhere"


def test_models_path_prints_a_cache_under_home(isolated_home, monkeypatch, capsys):
    from llamachat.tui.cli import main

    monkeypatch.delenv("LLAMACHAT_CACHE_DIR", raising=False)
    assert main(["models", "path"]) == 0
    out = capsys.readouterr().out
    cache_line = [line for line in out.splitlines() if line.startswith("cache:")][0]
    assert str(isolated_home) in cache_line


def test_model_file_says_where_a_library_model_lives(tmp_path):
    from tui_support import make_library

    lib = make_library(tmp_path)
    assert paths.model_file("alpha") == lib.models["alpha"].path
    assert paths.model_file(tmp_path / "beta.gguf") == (tmp_path / "beta.gguf").resolve()
    with pytest.raises(UserError, match="no model named 'gamma'"):
        paths.model_file("gamma")
    assert paths.model_file() == lib.default.path
