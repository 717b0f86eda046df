"""`llamachat models ...` through the real command line: output, exit codes, never a traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomlkit

from llamachat.model_store import paths
from llamachat.model_store.library import Library
from llamachat.tui.cli import main
from llamachat.tui.commands.models import parse_assignment

from test_library import make_gguf


def run(capsys, *argv):
    code = main(["models", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture
def model_file(tmp_path) -> Path:
    return make_gguf(tmp_path / "files" / "Tiny-Chat.Q8_0.gguf", context=512)


def test_empty_list_and_path(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0 and "library is empty" in out and "llamachat pull" in out
    code, out2, _ = run(capsys)  # no action = list
    assert code == 0 and out2 == out
    code, out, _ = run(capsys, "path")
    assert code == 0
    assert f"config: {paths.config_file()}" in out and f"data:   {paths.data_dir()}" in out


def test_add_list_show_set_default_remove(capsys, model_file, tmp_path):
    code, out, _ = run(capsys, "add", str(model_file), "--description", "tiny test model", "--set", "temp=0.3", "n_ctx=256")
    assert code == 0 and "Added tiny-chat-q8_0" in out and "default model" in out
    other = make_gguf(tmp_path / "files" / "other.gguf", context=1024)
    code, out, _ = run(capsys, "add", str(other), "--name", "other", "--default")
    assert code == 0 and "It is the default model" in out
    assert Library.load().default_name == "other"

    code, out, _ = run(capsys, "list")
    assert code == 0
    lines = [line for line in out.splitlines() if "tiny-chat-q8_0" in line or line.lstrip().startswith("*")]
    assert any(line.lstrip().startswith("* ") and "other" in line and "1024" in line for line in lines), out
    assert any("tiny-chat-q8_0" in line and "Q8_0" in line and "512" in line for line in lines), out

    code, out, _ = run(capsys, "show", "tiny-chat-q8_0")
    assert code == 0 and "tiny test model" in out and "Q8_0" in out
    assert any(l.split()[:3] == ["temp", "0.3", "library"] for l in out.splitlines())
    assert any(l.split()[:2] == ["top_k", "40"] and "llama.cpp default" in l for l in out.splitlines())

    code, out, _ = run(capsys, "set", "tiny-chat-q8_0", "top_p=0.5", "system_prompt=You are terse.", "--unset", "n_ctx")
    assert code == 0, out
    entry = Library.load().models["tiny-chat-q8_0"]
    assert entry.settings == {"temp": 0.3, "top_p": 0.5, "system_prompt": "You are terse."}

    code, out, _ = run(capsys, "default", "tiny-chat-q8_0")
    assert code == 0 and Library.load().default_name == "tiny-chat-q8_0"

    code, out, _ = run(capsys, "remove", "tiny-chat-q8_0")
    assert code == 0 and "was kept" in out and "no default model now" in out
    assert model_file.exists() and list(Library.load().models) == ["other"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "nope"], "no model named 'nope'"),
        (["set", "m", "temp=-1"], "model 'm': temp must be at least 0, got -1"),
        (["set", "m", "top_p=1.5"], "model 'm': top_p must be between 0 and 1"),
        (["set", "m", "n_ctx=0"], "model 'm': n_ctx must be between 1 and"),
        (["set", "m", "n_ctx=big"], "model 'm': n_ctx must be an integer"),
        (["set", "m", "tmep=1"], "unknown setting 'tmep' (did you mean 'temp'?)"),
        (["set", "m", "temp"], "expected KEY=VALUE, got 'temp'"),
        (["set", "m"], "nothing to set"),
        (["default", "ghost"], "no model named 'ghost'"),
        (["remove", "m", "--delete-file"], "outside llamachat's data dir"),
        (["remove", "m", "--force"], "--force only goes with --delete-file"),
        (["add", "/no/such/file.gguf"], "/no/such/file.gguf: no such file"),
    ],
)
def test_mistakes_are_one_sentence_and_nonzero(capsys, model_file, argv, message):
    Library.load().add(model_file, name="m")
    before = paths.config_file().read_text()
    code, out, err = run(capsys, *argv)
    assert code != 0
    assert err.startswith("llamachat: ") and message in err and err.count("\n") == 1, err
    assert paths.config_file().read_text() == before  # nothing changed


def test_add_refuses_an_invalid_gguf_with_the_gguf_error(capsys, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    code, _, err = run(capsys, "add", str(bad))
    assert code == 2 and err.startswith(f"llamachat: {bad}: not a valid GGUF file: ")
    assert not paths.config_file().exists()


def test_warnings_and_broken_file_through_the_cli(capsys, model_file):
    file = paths.config_file()
    file.parent.mkdir(parents=True)
    file.write_text(f'[models.m]\npath = "{model_file}"\ntemprature = 1\n')
    code, out, err = run(capsys, "list")
    assert code == 0 and "unknown key 'temprature'" in err and err.startswith("llamachat: warning: ")
    file.write_text('[models.m]\npath = "x.gguf\n')
    code, out, err = run(capsys, "list")
    assert code == 2 and "line 2, column" in err and "invalid TOML" in err and "llamachat models edit" in err


def test_missing_and_invalid_files_are_marked_in_the_list(capsys, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a GGUF file, only text")
    file = paths.config_file()
    file.parent.mkdir(parents=True)
    file.write_text(f'[models.gone]\npath = "{tmp_path / "gone.gguf"}"\nseed = 4294967295\n[models.junk]\npath = "{junk}"\n')
    code, out, _ = run(capsys, "list")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["gone"].rstrip().endswith("missing") and rows["junk"].rstrip().endswith("invalid")
    code, out, _ = run(capsys, "show", "gone")
    assert code == 0 and "(missing)" in out and any(l.split()[:3] == ["seed", "4294967295", "library"] for l in out.splitlines())
    code, out, _ = run(capsys, "show", "junk")
    assert code == 0 and "not a valid GGUF file" in out


def test_parse_assignment_reads_toml_scalars():
    assert parse_assignment("temp=0.7") == ("temp", 0.7)
    assert parse_assignment("seed=42") == ("seed", 42)
    assert parse_assignment('system_prompt="a = b"') == ("system_prompt", "a = b")
    assert parse_assignment("system_prompt=Be brief, please") == ("system_prompt", "Be brief, please")
    assert parse_assignment("chat_format=chatml") == ("chat_format", "chatml")
    assert parse_assignment("flag=true") == ("flag", True)


# ---- edit ------------------------------------------------------------------------------------

def fake_editor(tmp_path, body: str) -> str:
    """An $EDITOR command: a Python script that changes the file it is given."""
    script = tmp_path / "editor.py"
    script.write_text("import sys\nfrom pathlib import Path\np = Path(sys.argv[1])\ntext = p.read_text()\n" + textwrap.dedent(body))
    return f"{sys.executable} {script}"


def test_edit_valid_change_is_kept_with_bak(capsys, model_file, tmp_path, monkeypatch):
    Library.load().add(model_file, name="m", settings={"temp": 0.2})
    file = paths.config_file()
    before = file.read_text()
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", fake_editor(tmp_path, "p.write_text(text.replace('temp = 0.2', 'temp = 0.9  # warmer'))\n"))
    code, out, err = run(capsys, "edit")
    assert code == 0 and "Saved" in out and "1 model" in out, err
    assert "temp = 0.9  # warmer" in file.read_text()
    assert file.with_name("models.toml.bak").read_text() == before
    assert Library.load().models["m"].settings == {"temp": 0.9}


@pytest.mark.parametrize(
    "change, why",
    [
        ("p.write_text(text.replace('temp = 0.2', 'temp = -3'))", "model 'm': temp must be at least 0"),
        ("p.write_text(text + '[models.bad\\n')", "invalid TOML"),
        ("p.write_text(text.replace('default = \"m\"', 'default = \"nobody\"'))", "default = 'nobody' names no model"),
    ],
)
def test_edit_invalid_change_is_rejected_and_kept_aside(capsys, model_file, tmp_path, monkeypatch, change, why):
    Library.load().add(model_file, name="m", settings={"temp": 0.2})
    file = paths.config_file()
    before = file.read_text()
    monkeypatch.setenv("VISUAL", fake_editor(tmp_path, change + "\n"))  # VISUAL wins over EDITOR
    monkeypatch.setenv("EDITOR", "/bin/false")
    code, out, err = run(capsys, "edit")
    assert code == 2 and why in err and "models.toml.rejected" in err and "back as it was" in err
    assert err.count("\n") == 1
    assert file.read_text() == before
    rejected = file.with_name("models.toml.rejected").read_text()
    assert rejected != before
    assert tomlkit.parse(before) is not None


def test_edit_without_changes_and_with_a_missing_editor(capsys, model_file, tmp_path, monkeypatch):
    Library.load().add(model_file, name="m")
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", fake_editor(tmp_path, "pass\n"))
    code, out, _ = run(capsys, "edit")
    assert code == 0 and "No changes" in out
    monkeypatch.setenv("EDITOR", str(tmp_path / "no-such-editor"))
    code, _, err = run(capsys, "edit")
    assert code == 2 and "could not start the editor" in err


def test_edit_creates_the_file_and_can_repair_a_broken_one(capsys, model_file, tmp_path, monkeypatch):
    file = paths.config_file()
    monkeypatch.delenv("VISUAL", raising=False)
    add_model = f"p.write_text(text + '\\n[models.m]\\npath = \"{model_file}\"\\n')\n"
    monkeypatch.setenv("EDITOR", fake_editor(tmp_path, add_model))
    code, out, err = run(capsys, "edit")
    assert code == 0, err
    assert file.read_text().startswith("# llamachat model library.") and "m" in Library.load().models
    file.write_text("this is [not toml\n")
    monkeypatch.setenv("EDITOR", fake_editor(tmp_path, "pass\n"))  # closed without fixing it
    code, out, err = run(capsys, "edit")
    assert code == 2 and "invalid TOML" in err and file.read_text() == "this is [not toml\n"
    monkeypatch.setenv("EDITOR", fake_editor(tmp_path, f"p.write_text('[models.m]\\npath = \"{model_file}\"\\n')\n"))
    code, out, err = run(capsys, "edit")
    assert code == 0, err
    assert list(Library.load().models) == ["m"]


def test_read_only_library_refuses_changes(capsys, model_file):
    file = paths.config_file()
    file.parent.mkdir(parents=True)
    text = f'version = 99\n[models.m]\npath = "{model_file}"\n'
    file.write_text(text)
    code, out, err = run(capsys, "list")
    assert code == 0 and "version 99" in err and "read-only" in out + err
    code, out, err = run(capsys, "set", "m", "temp=1")
    assert code == 2 and "newer than this llamachat" in err and err.count("\n") == 1
    code, out, err = run(capsys, "edit")
    assert code == 2 and "newer than this llamachat" in err
    assert file.read_text() == text


def test_console_script_end_to_end(model_file):
    """Through a real process: the exit codes and stderr a shell sees."""
    ok = subprocess.run([sys.executable, "-m", "llamachat.tui.cli", "models", "add", str(model_file), "--name", "x"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "Added x" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "llamachat.tui.cli", "models", "set", "x", "top_p=7"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == "llamachat: model 'x': top_p must be between 0 and 1, got 7\n"
    usage = subprocess.run([sys.executable, "-m", "llamachat.tui.cli", "models", "frobnicate"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr and "invalid choice" in usage.stderr
