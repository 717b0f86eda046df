"""Command-line output a person or a script reads (issue 18, bugs j and m): a one-shot ends with
a newline on a terminal (also after Ctrl-C) and says when the context filled up; a piped chat
keeps stdout for the replies."""

from __future__ import annotations

import io
import sys

from test_oneshot import cli, fake  # noqa: F401 - the fake model fixture

from llamachat.tui import headless_chat
from llamachat.tui.cli import build_main_parser


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_one_shot_on_a_terminal_ends_with_a_newline_even_after_ctrl_c(fake, monkeypatch):  # noqa: F811
    state, path, _ = fake
    from llamachat.tui.cli import main

    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    assert main(["-m", path, "-p", "x", "--temp", "0", "--no-tui"]) == 0
    assert screen.getvalue() == "Hello world.\n"
    screen.seek(0), screen.truncate()
    state["interrupt_after"] = 4
    assert main(["-m", path, "-p", "x", "--temp", "0", "--no-tui"]) == 130
    assert screen.getvalue() == "Hello\n"


def test_one_shot_says_when_the_context_is_full(fake, capsys):  # noqa: F811
    state, path, _ = fake
    state["text"] = "ab"
    code, out, err = cli(capsys, "-m", path, "-p", "x", "--temp", "0", "--ignore-eos", "-c", "12", "--no-tui")
    assert code == 0 and out.startswith("ab")
    assert "the context is full (12 tokens)" in err and "-c/--ctx-size" in err


def _headless(tmp_path, stdout, stderr, lines="Capital of France?\nCapital of Germany?\n"):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tui_support import make_library
    from tui_fake_engine import FakeScript

    make_library(tmp_path)
    script = FakeScript(replies=["Paris.", "Berlin."])
    args = build_main_parser().parse_args(["-m", "alpha", "--no-tui"])
    return headless_chat.run(args, llama_factory=script.factory, stdin=io.StringIO(lines), stdout=stdout, stderr=stderr)


def test_piped_chat_keeps_prompts_out_of_stdout(tmp_path):
    out, err = io.StringIO(), Terminal()
    assert _headless(tmp_path, out, err) == 0
    assert out.getvalue() == "Paris.\nBerlin.\n"
    # the person at the terminal still sees the conversation, on stderr
    assert "> Capital of France?\n" in err.getvalue() and "> Capital of Germany?\n" in err.getvalue()


def test_piped_chat_with_no_terminal_at_all_has_no_prompts(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    assert _headless(tmp_path, out, err) == 0
    assert out.getvalue() == "Paris.\nBerlin.\n" and err.getvalue() == ""


def test_chat_on_a_terminal_still_shows_its_prompts(tmp_path):
    out = Terminal()
    assert _headless(tmp_path, out, io.StringIO()) == 0
    assert out.getvalue() == "\n> Capital of France?\nParis.\n\n> Capital of Germany?\nBerlin.\n\n> \n"


def test_inspect_accepts_a_library_name(tmp_path, capsys):
    from tui_support import make_library
    from llamachat.tui.cli import main

    make_library(tmp_path)
    assert main(["inspect", "alpha", "--json"]) == 0
    assert json_path(capsys.readouterr().out) == str(tmp_path / "alpha.gguf")
    assert main(["inspect", "alpah"]) == 2
    err = capsys.readouterr().err
    assert "no model named 'alpah'" in err and "alpha" in err
    assert main(["inspect", str(tmp_path / "missing.gguf")]) == 2
    assert capsys.readouterr().err == f"llamachat: {tmp_path / 'missing.gguf'}: no such file\n"


def json_path(out: str) -> str:
    import json

    return json.loads(out)["path"]
