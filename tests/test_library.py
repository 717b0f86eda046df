"""The model library (model_store/library.py): reading rules, atomic comment-keeping writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tomlkit
from gguf.constants import GGMLQuantizationType

from llamachat.model_store import library as library_module
from llamachat.model_store import paths
from llamachat.model_store.library import FORMAT_VERSION, Library, file_summary, name_from_path
from llamachat.runtime.errors import ConfigError, GGUFError, UserError
from llamachat.runtime.gguf.writer import write_gguf
from faults import writes_fail_halfway


def make_gguf(path: Path, context: int = 128, file_type: int | None = 7) -> Path:
    """A tiny valid GGUF: one Q8_0 tensor (so the quant can also be read off the tensors)."""
    meta = {"general.architecture": "llama", "general.name": path.stem, "llama.context_length": context}
    if file_type is not None:
        meta["general.file_type"] = file_type
    block = np.zeros(34, np.uint8)  # one Q8_0 block: f16 scale + 32 int8
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_gguf(path, meta, [("t", (32,), GGMLQuantizationType.Q8_0, block)])


@pytest.fixture
def gguf_a(tmp_path) -> Path:
    return make_gguf(tmp_path / "files" / "Alpha-1B.Q8_0.gguf")


@pytest.fixture
def gguf_b(tmp_path) -> Path:
    return make_gguf(tmp_path / "files" / "beta.gguf", context=256)


def write_config(text: str) -> Path:
    file = paths.config_file()
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text)
    return file


HAND_WRITTEN = """\
# my own notes at the top
version = 1
default = "alpha"   # the one I use most

# --- models ---
[models.alpha]
path = "{a}"
temp = 0.5          # a bit cooler
# keep this comment inside alpha

[models.beta]
description = "second"
path = "{b}"
"""


def hand_written(gguf_a, gguf_b) -> Path:
    return write_config(HAND_WRITTEN.format(a=gguf_a, b=gguf_b))


# ---- reading ---------------------------------------------------------------------------------

def test_missing_file_is_an_empty_library():
    lib = Library.load()
    assert lib.models == {} and lib.default_name is None and not lib.read_only and lib.warnings == []
    assert lib.file == paths.config_file()
    assert str(lib.file).startswith(os.environ["LLAMACHAT_HOME"])
    with pytest.raises(UserError, match="library is empty.*llamachat pull"):
        lib.resolve(None)


def test_hand_written_file_reads(gguf_a, gguf_b):
    hand_written(gguf_a, gguf_b)
    lib = Library.load()
    assert list(lib.models) == ["alpha", "beta"]
    assert lib.default_name == "alpha"
    a = lib.models["alpha"]
    assert a.path == gguf_a and a.settings == {"temp": 0.5} and not a.missing
    assert lib.models["beta"].description == "second"
    assert lib.warnings == []


def test_invalid_toml_names_file_line_and_column():
    file = write_config('version = 1\n\n[models.x]\npath = "a.gguf"\ntemp = 0.5 0.6\n')
    with pytest.raises(ConfigError) as err:
        Library.load()
    message = str(err.value)
    assert message.startswith(f"{file}, line 5, column 12: invalid TOML")
    assert "\n" not in message


def test_duplicate_key_is_a_syntax_error_with_position():
    write_config('[models.x]\npath = "a.gguf"\npath = "b.gguf"\n')
    with pytest.raises(ConfigError, match=r"line 3, column \d+: invalid TOML"):
        Library.load()


def test_unknown_keys_warn_naming_them(gguf_a):
    write_config(f'version = 1\ncolour = "blue"\n[models.a]\npath = "{gguf_a}"\ntmep = 0.3\n')
    lib = Library.load()
    assert "a" in lib.models and lib.models["a"].settings == {}
    assert len(lib.warnings) == 2
    assert "unknown key 'colour'" in lib.warnings[0]
    assert "model 'a'" in lib.warnings[1] and "unknown key 'tmep'" in lib.warnings[1] and "did you mean 'temp'" in lib.warnings[1]


@pytest.mark.parametrize(
    "line, field, why",
    [
        ("n_ctx = 0", "n_ctx", "between 1 and"),
        ("n_ctx = -5", "n_ctx", "between 1 and"),
        ("temp = -0.1", "temp", "at least 0"),
        ("top_p = 1.5", "top_p", "between 0 and 1"),
        ("min_p = -1", "min_p", "between 0 and 1"),
        ("temp = \"hot\"", "temp", "must be a number"),
        ("top_k = 2.5", "top_k", "must be an integer"),
        ("seed = true", "seed", "must be a number"),
        ("system_prompt = 3", "system_prompt", "must be text"),
        ("repeat_last_n = -2", "repeat_last_n", "at least -1"),
        ('chat_format = "chatlm"', "chat_format", "must be one of chatml, llama-2"),
    ],
)
def test_wrong_type_or_range_names_model_and_field(gguf_a, line, field, why):
    file = write_config(f'[models.mine]\npath = "{gguf_a}"\n{line}\n')
    with pytest.raises(ConfigError) as err:
        Library.load()
    message = str(err.value)
    assert message.startswith(f"{file}: model 'mine': {field} ")
    assert why in message


@pytest.mark.parametrize(
    "text, words",
    [
        ('[models.m]\ndescription = "no path"\n', "model 'm' needs path"),
        ('[models.m]\npath = ""\n', "model 'm': path is empty"),
        ("[models.m]\npath = 3\n", "model 'm': path must be text"),
        ('[models.m]\npath = "x.gguf"\ndescription = 1\n', "description must be text"),
        ('models = 3\n', "`models` must be a table"),
        ('[models]\nm = "x.gguf"\n', "model 'm' must be a table"),
        ('version = "one"\n', "version must be a whole number"),
        ('version = 0\n', "version must be a whole number"),
        ('default = "ghost"\n[models.m]\npath = "x.gguf"\n', "default = 'ghost' names no model"),
        ('[models."has space"]\npath = "x.gguf"\n', "model 'has space': the name must use"),
    ],
)
def test_structural_errors(text, words):
    write_config(text)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Library.load()


def test_model_whose_file_is_gone_is_listed_as_missing(gguf_a, tmp_path):
    gone = tmp_path / "gone.gguf"
    write_config(f'default = "gone"\n[models.gone]\npath = "{gone}"\n[models.a]\npath = "{gguf_a}"\n')
    lib = Library.load()
    assert lib.models["gone"].missing and not lib.models["a"].missing
    with pytest.raises(UserError, match="file .*gone.gguf is gone"):
        lib.resolve(None)
    assert lib.resolve("a").path == gguf_a
    assert file_summary(gone).error.endswith("no such file")


def test_relative_path_is_inside_the_models_dir():
    make_gguf(paths.models_dir() / "rel.gguf")
    write_config('[models.rel]\npath = "rel.gguf"\n')
    lib = Library.load()
    assert lib.models["rel"].path == paths.models_dir() / "rel.gguf" and not lib.models["rel"].missing


def test_newer_version_is_read_only(gguf_a, gguf_b):
    text = f'version = {FORMAT_VERSION + 1}\n[models.a]\npath = "{gguf_a}"\nfuture_knob = 3\n'
    file = write_config(text)
    lib = Library.load()
    assert lib.read_only and "a" in lib.models
    assert len(lib.warnings) == 1 and "newer than this llamachat" in lib.warnings[0] and "read-only" in lib.warnings[0]
    for change in (lambda: lib.add(gguf_b), lambda: lib.set("a", temp=0.1), lambda: lib.set_default("a"), lambda: lib.remove("a")):
        with pytest.raises(ConfigError, match=f"has version {FORMAT_VERSION + 1}, newer .* not changed here"):
            change()
    assert file.read_text() == text
    assert not file.with_name("models.toml.bak").exists()


def test_newer_version_reads_what_it_can(gguf_a):
    write_config(f'version = {FORMAT_VERSION + 1}\nthemes = ["dark"]\ndefault = "new"\n'
                 f'[models.a]\npath = "{gguf_a}"\n[models.new]\nlocation = {{ url = "https://x" }}\n')
    lib = Library.load()
    assert lib.read_only and list(lib.models) == ["a"] and lib.default_name is None
    assert any("model 'new' needs path" in w and "skipped" in w for w in lib.warnings)
    assert not any("themes" in w for w in lib.warnings)


# ---- resolve ---------------------------------------------------------------------------------

def test_resolve_names_paths_and_unknowns(gguf_a, gguf_b, tmp_path):
    lib = Library.load()
    lib.add(gguf_a, name="alpha", settings={"temp": 0.3})
    lib.set("alpha", chat_format="chatml")
    lib.set("alpha", chat_format="")
    lib.set("alpha", chat_format=None)
    assert lib.resolve(None).name == "alpha"
    assert lib.resolve("alpha").settings == {"temp": 0.3}
    # the library's own file by path gets the library's settings
    assert lib.resolve(str(gguf_a)).name == "alpha"
    adhoc = lib.resolve(str(gguf_b))
    assert adhoc.adhoc and adhoc.path == gguf_b.resolve() and adhoc.settings == {}
    with pytest.raises(UserError, match=r"no model named 'alpah'.*did you mean 'alpha'.*models: alpha"):
        lib.resolve("alpah")
    with pytest.raises(UserError, match="no such file"):
        lib.resolve(str(tmp_path / "nothing.gguf"))


# ---- writing ---------------------------------------------------------------------------------

def test_new_file_gets_the_explaining_header(gguf_a):
    lib = Library.load()
    entry = lib.add(gguf_a, description="first one", settings={"n_ctx": 512, "temp": 1})
    assert entry.name == name_from_path(gguf_a) == "alpha-1b-q8_0"
    text = lib.file.read_text()
    assert text.startswith("# llamachat model library.")
    for field in ("version", "default", "path", "description", "temp", "n_ctx", "system_prompt", "chat_format"):
        assert field in text.split("version = 1")[0], field  # explained in the header comment
    data = tomlkit.parse(text).unwrap()
    assert data["version"] == FORMAT_VERSION and data["default"] == entry.name
    assert data["models"][entry.name] == {"path": str(gguf_a.resolve()), "description": "first one", "n_ctx": 512, "temp": 1.0}
    assert Library.load().models[entry.name].settings == {"n_ctx": 512, "temp": 1.0}


def test_writes_keep_comments_and_order(gguf_a, gguf_b, tmp_path):
    file = hand_written(gguf_a, gguf_b)
    lib = Library.load()
    lib.set("alpha", temp=0.7, top_k=20)
    gamma = make_gguf(tmp_path / "files" / "gamma.gguf")
    lib.add(gamma, name="gamma", description="third")
    lib.set_default("beta")
    lib.remove("gamma")
    text = file.read_text()
    for comment in ("# my own notes at the top", "# the one I use most", "# --- models ---",
                    "# a bit cooler", "# keep this comment inside alpha"):
        assert comment in text, comment
    assert "temp = 0.7          # a bit cooler" in text
    # order: version, default, then alpha before beta; beta's description still first
    assert text.index("version") < text.index("default") < text.index("[models.alpha]") < text.index("[models.beta]")
    assert text.index('description = "second"') < text.index(f'path = "{gguf_b}"')
    assert 'default = "beta"' in text and "gamma" not in text
    assert Library.load().models["alpha"].settings == {"temp": 0.7, "top_k": 20}


def test_each_write_keeps_the_previous_version_as_bak(gguf_a, gguf_b):
    file = hand_written(gguf_a, gguf_b)
    bak = file.with_name("models.toml.bak")
    lib = Library.load()
    before = file.read_text()
    lib.set("beta", seed=42)
    assert bak.read_text() == before
    second = file.read_text()
    lib.set("beta", seed=None)  # None unsets
    assert bak.read_text() == second
    assert "seed" not in file.read_text() and Library.load().models["beta"].settings == {}


def test_failed_write_leaves_the_old_file_intact(gguf_a, gguf_b, monkeypatch):
    file = hand_written(gguf_a, gguf_b)
    before = file.read_text()
    lib = Library.load()
    real_replace = os.replace

    def crash_on_the_config(src, dst):
        if Path(dst) == file:  # the .bak is written, then the machine "dies" before the rename
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(library_module.os, "replace", crash_on_the_config)
    with pytest.raises(UserError, match="could not write .*models.toml: No space left on device; the previous version is unchanged"):
        lib.set("alpha", temp=0.1)
    assert file.read_text() == before
    assert [p.name for p in file.parent.iterdir() if p.name.endswith(".tmp")] == []  # temp file cleaned


def test_crash_in_the_middle_of_writing_leaves_the_old_file(gguf_a, gguf_b):
    file = hand_written(gguf_a, gguf_b)
    before = file.read_text()
    with writes_fail_halfway(OSError(5, "Input/output error")), pytest.raises(UserError, match="Input/output error"):
        Library.load().set_default("beta")
    assert file.read_text() == before
    assert Library.load().default_name == "alpha"
    assert [p for p in file.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_changes_made_elsewhere_since_load_are_kept(gguf_a, gguf_b):
    hand_written(gguf_a, gguf_b)
    app_view = Library.load()  # e.g. the app, loaded a while ago
    Library.load().set("beta", temp=0.1)  # meanwhile the CLI changes beta
    app_view.set("alpha", top_k=5)
    lib = Library.load()
    assert lib.models["beta"].settings == {"temp": 0.1}
    assert lib.models["alpha"].settings == {"temp": 0.5, "top_k": 5}
    assert app_view.models["beta"].settings == {"temp": 0.1}  # refreshed by its own write


def test_add_validates_the_gguf_first(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 40)
    with pytest.raises(GGUFError, match="not a valid GGUF file"):
        Library.load().add(bad)
    assert not paths.config_file().exists()
    with pytest.raises(UserError, match="no such file"):
        Library.load().add(tmp_path / "none.gguf")


def test_add_refuses_duplicates_and_bad_settings(gguf_a, gguf_b):
    lib = Library.load()
    lib.add(gguf_a, name="a")
    with pytest.raises(UserError, match="already in the library as 'a'"):
        lib.add(gguf_a, name="again")
    with pytest.raises(UserError, match="a model named 'a' is already"):
        lib.add(gguf_b, name="a")
    with pytest.raises(UserError, match="model 'b': top_p must be between 0 and 1"):
        lib.add(gguf_b, name="b", settings={"top_p": 3})
    with pytest.raises(UserError, match="unknown setting 'topp'"):
        lib.add(gguf_b, name="b", settings={"topp": 0.5})
    with pytest.raises(UserError, match="not a usable model name"):
        lib.add(gguf_b, name="two words")
    assert list(Library.load().models) == ["a"]


def test_set_checks_and_changes_path(gguf_a, gguf_b, tmp_path):
    lib = Library.load()
    lib.add(gguf_a, name="a")
    with pytest.raises(UserError, match="model 'a': n_ctx must be between 1 and"):
        lib.set("a", n_ctx=0)
    with pytest.raises(UserError, match="no model named 'zz'"):
        lib.set("zz", temp=1)
    lib.set("a", path=str(gguf_b), description="now beta")
    entry = Library.load().models["a"]
    assert entry.path == gguf_b and entry.description == "now beta"
    # a file inside the models dir is stored relative to it
    inside = make_gguf(paths.models_dir() / "in.gguf")
    lib.set("a", path=inside)
    assert 'path = "in.gguf"' in lib.file.read_text()


def test_remove_deletes_only_inside_the_data_dir(gguf_a):
    inside = make_gguf(paths.models_dir() / "inside.gguf")
    lib = Library.load()
    lib.add(inside, name="in")
    lib.add(gguf_a, name="out")
    assert lib.default_name == "in"
    with pytest.raises(UserError, match="outside llamachat's data dir.*not deleted and 'out' stays"):
        lib.remove("out", delete_file=True)
    assert gguf_a.exists() and "out" in Library.load().models
    lib.remove("out")  # without --delete-file: only the entry goes
    assert gguf_a.exists() and "out" not in Library.load().models
    assert lib.remove("in", delete_file=True) == inside
    assert not inside.exists()
    lib = Library.load()
    assert lib.models == {} and lib.default_name is None
    # told to (--force): a file outside the data dir may go too
    lib.add(gguf_a, name="out")
    lib.remove("out", delete_file=True, force=True)
    assert not gguf_a.exists()


def test_remove_keeps_a_file_another_entry_uses():
    inside = make_gguf(paths.models_dir() / "shared.gguf")
    write_config('[models.one]\npath = "shared.gguf"\n[models.two]\npath = "shared.gguf"\n')
    with pytest.raises(UserError, match="also used by two"):
        Library.load().remove("one", delete_file=True)
    assert inside.exists() and list(Library.load().models) == ["one", "two"]


def test_file_summary_reads_the_header(gguf_b, tmp_path):
    s = file_summary(gguf_b)
    assert (s.quant, s.context_length, s.architecture, s.size, s.error) == ("Q8_0", 256, "llama", gguf_b.stat().st_size, None)
    no_type = make_gguf(tmp_path / "nt.gguf", file_type=None)
    assert file_summary(no_type).quant == "Q8_0"  # the commonest tensor type
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all, just some bytes here")
    assert "not a valid GGUF file" in file_summary(junk).error
