"""`llamachat tokenize`: llama-tokenize's output formats, flags and errors."""

from __future__ import annotations

import pytest

from llamachat.tui.cli import main
from llamachat.tui.commands.tokenize import process_escapes


def _run(capsysbinary, *argv):
    code = main(["tokenize", *map(str, argv)])
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


@pytest.mark.real_model
def test_ids_match_reference(smollm2_path, reference, capsysbinary):
    for case in reference["tokenize"]:
        text = case["text"].replace("\\", "\\\\")  # the command processes escapes like llama-tokenize
        code, out, _ = _run(capsysbinary, "-m", smollm2_path, "-p", text, "--ids")
        assert code == 0
        assert out.decode() == "[" + ", ".join(map(str, case["ids"])) + "]\n"
        code, out2, _ = _run(capsysbinary, "-m", smollm2_path, "-p", text, "--ids", "--parse-special")
        assert out2 == out


@pytest.mark.real_model
def test_piece_lines(smollm2_path, capsysbinary):
    code, out, _ = _run(capsysbinary, "-m", smollm2_path, "-p", "<|im_start|>user\\nHi")
    assert code == 0
    assert out == b"     1 -> '<|im_start|>'\n  4093 -> 'user'\n   198 -> '\n'\n 26843 -> 'Hi'\n"


@pytest.mark.real_model
def test_no_parse_special_and_bos(reference_dir, capsysbinary, smollm2_path):
    code, out, _ = _run(capsysbinary, "-m", smollm2_path, "-p", "<|im_end|>", "--ids", "--no-parse-special")
    assert code == 0 and out != b"[2]\n"
    spm = reference_dir / "vocab" / "ggml-vocab-llama-spm.gguf"
    assert _run(capsysbinary, "-m", spm, "-p", "Hello", "--ids")[1] == b"[1, 15043]\n"
    assert _run(capsysbinary, "-m", spm, "-p", "Hello", "--ids", "--no-bos")[1] == b"[15043]\n"
    # a partial UTF-8 piece is written as its raw byte, as llama-tokenize does on Linux
    out = _run(capsysbinary, "-m", spm, "-p", "🦙", "--no-bos")[1]
    assert out.endswith(b"   243 -> '\xf0'\n   162 -> '\x9f'\n   169 -> '\xa6'\n   156 -> '\x99'\n")


@pytest.mark.real_model
def test_prompt_file_and_invalid_utf8(tmp_path, smollm2_path, capsysbinary):
    good = tmp_path / "p.txt"
    good.write_text("Hello world", encoding="utf-8")
    assert _run(capsysbinary, "-m", smollm2_path, "-f", good, "--ids")[1] == b"[19556, 905]\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes("héllo".encode() + b"\xff\xfe rest")
    code, out, err = _run(capsysbinary, "-m", smollm2_path, "-f", bad)
    assert code == 2 and out == b""
    assert "not valid UTF-8" in err and "offset 6" in err and "Traceback" not in err
    code, _, err = _run(capsysbinary, "-m", smollm2_path, "-f", tmp_path / "missing.txt")
    assert code == 2 and "no such file" in err


def test_bad_model_is_one_line(tmp_path, capsysbinary):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all, really not" * 3)
    code, _, err = _run(capsysbinary, "-m", junk, "-p", "x")
    assert code == 2 and err.startswith("llamachat: ") and err.count("\n") == 1


def test_process_escapes():
    assert process_escapes(rb"a\nb\tc\\d\x41\q\"") == b'a\nb\tc\\dA\\q"'
    assert process_escapes(b"end\\") == b"end\\"
    assert process_escapes(rb"\xZZ") == rb"\xZZ"
