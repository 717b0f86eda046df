"""Hostile models.toml (issue 17, item 7): deep nesting, huge entry counts, `models` of the
wrong type, `~nosuchuser/` paths, megabyte names: listed or refused in bounded time with one
sentence. And (issue 15, item 4) importing the library changes no process-wide state: the
umask is applied by the kernel where files are created."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamachat.model_store import paths
from llamachat.model_store.library import MAX_FILE_BYTES, Library
from llamachat.runtime.errors import ConfigError, UserError
from llamachat.tui.cli import main

from test_library import make_gguf, write_config


def _load_bounded(text: str):
    file = write_config(text)
    t0 = time.monotonic()
    try:
        return file, Library.load(), None
    except ConfigError as err:
        return file, None, err
    finally:
        assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("text,expected", [
    ("[models.m]\npath = 'x.gguf'\ntemp = " + "[" * 100_000 + "]" * 100_000 + "\n", "values are nested too deeply"),
    ("x = " + "[" * 100_000 + "]" * 100_000 + "\n", "values are nested too deeply"),
    ("x = " + "{a = " * 5_000 + "1" + "}" * 5_000 + "\n", "values are nested too deeply"),
    ("x = " + "[" * 40 + "]" * 40 + "\n", "values are nested more than 16 deep"),
    ("".join(f"[models.m{i}]\npath = 'm{i}.gguf'\n" for i in range(200_000)), f"more than a model library needs ({MAX_FILE_BYTES})"),
    ("".join(f"[models.m{i}]\npath = 'm{i}.gguf'\n" for i in range(6_000)), "holds more than 10000 values"),
    ("x = [" + "1, " * 20_000 + "]\n", "holds more than 10000 values"),
    ("models = 'abc'\n", "`models` must be a table of [models.NAME] tables"),
    ("models = [1, 2]\n", "`models` must be a table of [models.NAME] tables"),
    ("[models." + "a" * 100_000 + "]\npath = 'x.gguf'\n", "(100000 characters): the name must use letters"),
    ("[models.m]\npath = 'x.gguf'\ntemp = nan\n", "model 'm': temp must be a finite number"),
    ("x = 'unterminated\n", "invalid TOML"),
], ids=["nested-setting", "nested-top", "nested-inline-tables", "nested-40", "200k-entries", "6k-entries", "20k-array",
        "models-string", "models-array", "megabyte-name", "temp-nan", "bad-syntax"])
def test_hostile_library_is_refused_with_one_sentence_in_bounded_time(text, expected):
    file, lib, err = _load_bounded(text)
    assert lib is None and str(err).startswith(f"{file}") and expected in str(err)
    assert "\n" not in str(err) and len(str(err)) < 400


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    file = paths.config_file()
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "wb") as f:
        f.truncate(3 << 30)  # sparse
    with pytest.raises(ConfigError, match=r"is 3221225472 bytes long, more than a model library needs"):
        Library.load()


def test_a_fifo_as_the_library_is_refused_not_waited_on():
    file = paths.config_file()
    file.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(file)
    with pytest.raises(ConfigError, match="is not a regular file"):
        Library.load()


def test_nosuchuser_paths_are_listed_as_missing(capsys):
    file, lib, err = _load_bounded("[models.m]\npath = '~nosuchuser-llamachat/x.gguf'\n")
    assert err is None and lib.models["m"].missing and str(lib.models["m"].path) == "~nosuchuser-llamachat/x.gguf"
    assert main(["models", "list"]) == 0
    assert "~nosuchuser-llamachat/x.gguf" in capsys.readouterr().out
    with pytest.raises(UserError, match="its file ~nosuchuser-llamachat/x.gguf is gone"):
        lib.resolve("m")
    with pytest.raises(UserError, match="~nosuchuser-llamachat/y.gguf: no such file"):
        lib.resolve("~nosuchuser-llamachat/y.gguf")


def test_many_unknown_keys_give_a_bounded_list_of_warnings():
    file, lib, err = _load_bounded("[models.m]\npath = 'x.gguf'\n" + "".join(f"k{i} = 1\n" for i in range(3_000)))
    assert err is None and len(lib.warnings) == 10 and "2991 more warnings" in lib.warnings[-1]


def test_edits_still_keep_comments_after_a_fast_read(tmp_path):
    gguf = make_gguf(tmp_path / "a.gguf")
    write_config(f"# mine\n[models.a]  # the first\npath = '{gguf}'\n")
    lib = Library.load()
    lib.set("a", temp=0.5)
    text = paths.config_file().read_text()
    assert "# mine" in text and "# the first" in text and "temp = 0.5" in text


def test_importing_the_library_changes_no_process_state():
    code = textwrap.dedent("""
        import os
        def refuse(*a):
            raise SystemExit("os.umask called at import")
        os.umask = refuse
        import llamachat.model_store.library, llamachat.model_store.pull, llamachat.model_store.importers
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_new_files_get_the_users_umask(tmp_path):
    code = textwrap.dedent(f"""
        import os
        os.umask(0o027)
        os.environ["LLAMACHAT_HOME"] = {str(tmp_path / "home")!r}
        from llamachat.model_store.library import Library, write_atomic
        Library.load().ensure_file()
        write_atomic({str(tmp_path / "other.txt")!r}, "x")
        print(Library.load().file)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for path in (done.stdout.strip(), tmp_path / "other.txt"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    os.chmod(tmp_path / "other.txt", 0o600)  # a mode the user chose is kept by later writes
    from llamachat.model_store.library import write_atomic

    write_atomic(tmp_path / "other.txt", "y")
    assert stat.S_IMODE(os.stat(tmp_path / "other.txt").st_mode) == 0o600


# ---- fuzz: TOML built from hostile pieces ---------------------------------------------------

_scalar = st.one_of(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1), st.floats(allow_nan=True), st.booleans(),
                    st.text(max_size=12), st.sampled_from(["~nosuchuser/x.gguf", "/dev/zero", "", "chatml", "a\u0000b"]))


def _toml_value(v) -> str:
    import tomlkit

    return tomlkit.item(v).as_string()


_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3), max_leaves=8)
_keys = st.sampled_from(["path", "description", "temp", "top_k", "n_ctx", "chat_format", "seed", "bogus", "version", "default", "models"])


@settings(max_examples=80, deadline=1000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(top=st.dictionaries(st.sampled_from(["version", "default", "models", "extra"]), _value, max_size=2),
       entries=st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True), st.dictionaries(_keys, _value, max_size=4), max_size=3))
def test_fuzz_models_toml(top, entries):
    lines = []
    for key, value in top.items():
        try:
            lines.append(f"{key} = {_toml_value(value)}")
        except Exception:  # a value TOML cannot hold (tomlkit refuses it): not this test's subject
            return
    for name, table in entries.items():
        lines.append(f"[models.{name}]")
        for key, value in table.items():
            try:
                lines.append(f"{key} = {_toml_value(value)}")
            except Exception:
                return
    text = "\n".join(lines) + "\n"
    try:
        lib = Library.from_text(text, paths.config_file())
    except ConfigError as err:
        assert str(err).startswith(str(paths.config_file())) and "\n" not in str(err) and len(str(err)) < 500
        return
    for entry in lib.models.values():
        assert isinstance(entry.path, os.PathLike)
        for name, value in entry.settings.items():
            assert value == value  # no NaN accepted
