"""Remote library entries end to end (issue #19 part 2): `models add-remote` checks the endpoint,
models.toml keeps the key's variable name (never a key), local-only commands refuse a remote
model in one sentence, and one-shot and headless chat use a remote model like a local one:
against `llamachat serve` started in-process on 127.0.0.1 with the real model (replies equal to
the engine's own greedy replies), and against the fake OpenAI server for failures."""

from __future__ import annotations

import argparse
import io
import socket

import pytest

from llamachat.model_store.library import Library, RemoteEntry
from llamachat.runtime.errors import UserError
from llamachat.tui import headless_chat
from llamachat.tui.cli import build_main_parser, main
from test_remote_backend import fake, fake_server  # noqa: F401 - fixtures
from test_serve import QUESTION, RunningServer, fresh, greedy_chat, host, library_file, engine  # noqa: F401


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_add_remote_checks_the_endpoint_and_writes_no_key(fake, capsys, monkeypatch):  # noqa: F811
    _fake, url = fake
    monkeypatch.setenv("FAKE_KEY", "s3cret")
    code, out, err = cli(capsys, "models", "add-remote", "far", "--url", url, "--model", "fake-2", "--api-key-env", "FAKE_KEY")
    assert code == 0, err
    assert out.strip() == f"Added far (model 'fake-2' at {url}). It is the default model."
    lib = Library.load()
    entry = lib.get("far")
    assert isinstance(entry, RemoteEntry) and (entry.base_url, entry.model, entry.api_key_env) == (url, "fake-2", "FAKE_KEY")
    text = lib.file.read_text()
    assert 'backend = "openai"' in text and 'api_key_env = "FAKE_KEY"' in text and "s3cret" not in text
    code, out, err = cli(capsys, "models", "add-remote", "far2", "--url", url)  # no --model: the server's first
    assert code == 0 and Library.load().get("far2").model == "fake-1"
    code, out, err = cli(capsys, "models", "list")
    assert code == 0 and "remote" in out and url in out


def test_add_remote_refuses_a_dead_endpoint_and_writes_nothing(capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    code, out, err = cli(capsys, "models", "add-remote", "gone", "--url", f"http://127.0.0.1:{port}/v1")
    assert code != 0 and out == ""
    assert err.strip().startswith(f"llamachat: cannot reach http://127.0.0.1:{port}/v1 ") and len(err.strip().splitlines()) == 1
    assert "gone" not in Library.load().models
    code, out, err = cli(capsys, "models", "add-remote", "bad", "--url", "ftp://x")
    assert code != 0 and "base_url must be an http:// or https:// URL" in err


def test_a_key_in_models_toml_is_refused(tmp_path):
    file = tmp_path / "models.toml"
    file.write_text('version = 1\n[models.x]\nbackend = "openai"\nbase_url = "http://127.0.0.1:1/v1"\napi_key = "sk-1"\n')
    with pytest.raises(UserError, match="a key is never kept in models.toml"):
        Library.load(file)


@pytest.mark.parametrize("command", [["tokenize", "-m", "far", "-p", "hi"], ["perplexity", "-m", "far", "-f", "TEXT"],
                                     ["bench", "-m", "far"], ["inspect", "far"]])
def test_local_only_commands_refuse_a_remote_model_in_one_sentence(command, capsys, tmp_path):
    Library.load().add_remote("far", "http://127.0.0.1:9/v1", "m")
    text = tmp_path / "t.txt"
    text.write_text("Some text to measure. " * 20)
    code, out, err = cli(capsys, *[str(text) if c == "TEXT" else c for c in command])
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "'far' is a remote model (http://127.0.0.1:9/v1), and this works on a local GGUF file only" in lines[0]


def test_headless_chat_says_a_server_error_and_goes_on(fake, capsys):  # noqa: F811
    fake_, url = fake
    Library.load().add_remote("far", url, "fake-1")
    fake_.mode = "429"
    args = build_main_parser().parse_args(["-m", "far", "--no-tui"])
    lines = iter(["first\n", "second\n", ""])

    class Stdin:  # the server recovers once the user types the second line
        def isatty(self):
            return False

        def readline(self, *limit):
            line = next(lines)
            if line == "second\n":
                fake_.mode = "ok"
            return line

    out = io.StringIO()
    code = headless_chat.run(args, stdin=Stdin(), stdout=out)
    assert code == 0
    err = capsys.readouterr().err
    assert f"llamachat: {url} is busy (HTTP 429, too many requests): fake says 429; wait a moment and try again" in err
    assert out.getvalue() == "Hello there, friend.\n"
    # the failed turn was taken back: the second request holds the second question only
    assert len(fake_.bodies) == 2 and fake_.bodies[1]["messages"] == [{"role": "user", "content": "second"}]


# -- against `llamachat serve` with the real model ----------------------------------------------


@pytest.fixture(scope="module")
def served(host):  # noqa: F811
    running = RunningServer(host).start()
    yield running
    running.stop()


@pytest.mark.real_model
def test_one_shot_and_headless_through_llamachat_serve(served, host, engine, capsys):  # noqa: F811
    url = served.url + "/v1"
    code, out, err = cli(capsys, "models", "add-remote", "served", "--url", url, "--model", "smol")
    assert code == 0, err
    assert "context 512 tokens" in out or "Added served" in out
    # headless chat: the reply is the engine's greedy reply for the same conversation
    fresh(host)
    expected, usage = greedy_chat(engine, QUESTION, 16)
    args = build_main_parser().parse_args(["-m", "served", "--no-tui", "--temp", "0", "-n", "16", "--verbose"])
    stdout = io.StringIO()
    assert headless_chat.run(args, stdin=io.StringIO(QUESTION[0]["content"] + "\n"), stdout=stdout) == 0
    assert stdout.getvalue() == expected.rstrip() + "\n"
    err = capsys.readouterr().err
    assert f"generated {usage['completion_tokens']} tokens" in err and "tokens/s" in err
    # one-shot: /v1/completions, the engine's greedy completion
    fresh(host)
    engine.reset()
    want = engine.create_completion("The capital of France is", temperature=0.0, max_tokens=12)["choices"][0]["text"]
    fresh(host)
    code, out, err = cli(capsys, "-m", "served", "-p", "The capital of France is", "--temp", "0", "-n", "12")
    assert code == 0, err
    assert out == want
