"""The chat-template fallback notice (a model's template refused, a built-in format used
instead) reaches the user once: headless chat on stderr, the typed seam's take_notice."""

from __future__ import annotations

import io

import pytest

from llamachat.runtime.generation import llama_api
from llamachat.runtime.gguf.writer import write_gguf
from llamachat.tui import headless_chat
from llamachat.tui.backends import LocalBackend
from llamachat.tui.cli import build_main_parser
from test_generate_fakes import EOS, FakeModel, FakeTokenizer

HOSTILE = "{{ lipsum(1000000) }}"  # refused as unsafe (tests/test_hostile_templates.py)


class Tokenizer(FakeTokenizer):
    """What the chat template code asks of a vocabulary, on top of the generation fake."""
    vocab_type = "bpe"
    bos_id = None
    eos_id = EOS
    unk_id = None
    pad_id = None

    def token_id(self, text):
        return None

    def token_text(self, token):
        return ""

    def encode_segments(self, segments, add_special=False):
        return [t for text, _special in segments for t in self.encode(text, add_special=False)]


def factory(path, **kwargs):
    model = FakeModel(lambda tokens: ord("k") if tokens[-1] != ord("k") else EOS, n_ctx=kwargs.get("n_ctx") or 2048)
    model.metadata = {"general.name": "Evil", "tokenizer.chat_template": HOSTILE}
    return llama_api.Llama.from_model(model, Tokenizer(), model_path=str(path))


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "evil.gguf"
    write_gguf(path, {"general.architecture": "llama", "general.name": "Evil"}, [])
    return path


def test_local_backend_hands_the_notice_over_once(model_file):
    backend = LocalBackend(factory(model_file))
    assert backend.take_notice() is None  # nothing rendered yet, and reading it builds nothing
    assert backend.count_tokens([{"role": "user", "content": "hi"}], None) > 0
    notice = backend.take_notice()
    assert notice.startswith("the chat template of Evil ") and notice.endswith("using the built-in 'chatml' format instead")
    assert backend.take_notice() is None


def test_headless_chat_says_it_once_on_stderr(model_file, capsys):
    args = build_main_parser().parse_args(["-m", str(model_file), "--no-tui", "-n", "4", "--temp", "0"])
    out = io.StringIO()
    code = headless_chat.run(args, llama_factory=factory, stdin=io.StringIO("hi\nagain\n"), stdout=out)
    assert code == 0
    assert out.getvalue() == "k\nk\n"  # both turns answered (chatml prompt, the fake says "k")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "chat template" in line]
    assert len(lines) == 1 and lines[0].startswith("llamachat: the chat template of Evil ")
    assert lines[0].endswith("using the built-in 'chatml' format instead")
