"""Tokenizer: llama.cpp's test vectors (vocab-only GGUFs), SmolLM2's reference ids, decoding,
streaming, special tokens and bad vocabularies."""

from __future__ import annotations

import numpy as np
import pytest

from llamachat.runtime.errors import ModelError, UserError
from llamachat.runtime.tokenizer.tokenizer import Tokenizer

from pathlib import Path

VOCAB_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "vocab"
# the three llama.cpp vocabularies shipped with the reference data, plus any other
# ggml-vocab-*.gguf with .inp/.out test vectors found beside them
VOCABS = tuple(sorted({"llama-spm", "llama-bpe", "gpt-2"} | {
    p.name[len("ggml-vocab-"):-len(".gguf")] for p in VOCAB_DIR.glob("ggml-vocab-*.gguf") if Path(f"{p}.out").is_file()
}))


def _vocab_cases(reference_dir, name):
    base = reference_dir / "vocab" / f"ggml-vocab-{name}.gguf"
    if not base.is_file():
        pytest.skip(f"{base} not found")
    with open(f"{base}.inp", encoding="utf-8", newline="") as f:
        inputs = f.read().split("\n__ggml_vocab_test__\n")[:-1]
    with open(f"{base}.out", encoding="utf-8") as f:
        outputs = f.read().split("\n")[:-1]
    assert len(inputs) == len(outputs) > 0
    return base, [(text, [int(x) for x in line.split()]) for text, line in zip(inputs, outputs)]


@pytest.fixture(scope="module")
def vocab_tokenizers():
    return {}


def _tok(reference_dir, name, cache):
    if name not in cache:
        base, cases = _vocab_cases(reference_dir, name)
        cache[name] = (Tokenizer.from_gguf(base), cases)
    return cache[name]


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vocab_vectors(reference_dir, name, vocab_tokenizers):
    tok, cases = _tok(reference_dir, name, vocab_tokenizers)
    mismatches = [(text, want, got) for text, want in cases if (got := tok.encode(text, add_special=False)) != want]
    assert not mismatches, mismatches[:3]
    # and the pieces spell the text again (SPM: with the space prefix it added; WordPiece
    # normalizes, so it cannot)
    for text, want in cases:
        decoded = tok.decode(want)
        if tok.vocab_type == "spm":
            assert decoded == (" " + text if text and tok.add_space_prefix else text)
        else:  # WordPiece (lower-cases, strips accents) has no spelling check; no other kind is expected
            assert tok.vocab_type == "bpe", tok.vocab_type
            assert decoded == text


@pytest.mark.parametrize("name", ("llama-spm", "llama-bpe", "gpt-2"))
def test_vocab_metadata(reference_dir, name, vocab_tokenizers):
    tok, _ = _tok(reference_dir, name, vocab_tokenizers)
    if name == "llama-spm":
        assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos, tok.vocab_type) == (1, 2, True, False, "spm")
        assert tok.eog_ids == {2}
        assert tok.encode("Hello") == [1, 15043]
        assert tok.token_to_piece(1) == b"<s>" and tok.token_to_piece(1, special=False) == b""
        assert tok.token_to_piece(tok.token_id("<0x0A>")) == b"\n"
    elif name == "llama-bpe":
        assert (tok.bos_id, tok.add_bos, tok.vocab_type) == (128000, True, "bpe")
        assert tok.eog_ids == {128001, 128009}  # <|end_of_text|>, <|eot_id|>
        assert tok.encode("Hello")[0] == 128000
        assert tok.encode("<|eot_id|>", add_special=False, parse_special=True) == [128009]
        assert len(tok.encode("<|eot_id|>", add_special=False)) > 1
    else:
        assert tok.eog_ids == {50256} and tok.add_bos is False


@pytest.mark.real_model
def test_smollm2_reference_ids(smollm2_path, reference):
    tok = Tokenizer.from_gguf(smollm2_path)
    assert tok.pre == "smollm" and tok.add_bos is False
    for case in reference["tokenize"]:
        assert tok.encode(case["text"], add_special=True, parse_special=True) == case["ids"], case["text"]
        assert tok.decode(case["ids"], special=True) == case["text"]


@pytest.mark.real_model
def test_smollm2_special_tokens(smollm2_path):
    tok = Tokenizer.from_gguf(smollm2_path)
    im_end = tok.token_id("<|im_end|>")
    assert im_end == 2 and tok.is_eog(im_end) and tok.is_eog(0)
    assert tok.eog_ids == {0, 2, 4}  # llama.cpp also stops at <reponame>, its FIM repo token
    assert tok.encode("<|im_end|>", parse_special=True) == [2]
    plain = tok.encode("<|im_end|>", parse_special=False)
    assert 2 not in plain and tok.decode(plain) == "<|im_end|>"
    assert tok.decode([19556, 2]) == "Hello" and tok.decode([19556, 2], special=True) == "Hello<|im_end|>"


def test_longest_special_token_first():
    md = _tiny_bpe_metadata(extra=[("<a>", 3), ("<ab>", 3), ("<a><ab>", 4)])
    tok = Tokenizer.from_metadata(md)
    a, ab, both = (tok.token_id(t) for t in ("<a>", "<ab>", "<a><ab>"))
    assert tok.encode("<a><ab>", parse_special=True) == [both]  # user-defined: always, longest first
    assert tok.encode("x<ab><a>", parse_special=True)[-2:] == [ab, a]
    # control tokens only with parse_special
    assert a not in tok.encode("<a>y", parse_special=False)


def test_stream_decoder_holds_partial_utf8(reference_dir, vocab_tokenizers):
    tok, _ = _tok(reference_dir, "llama-spm", vocab_tokenizers)
    ids = tok.encode("a 🦙 b", add_special=False)  # the llama emoji is 4 byte tokens here
    d = tok.stream_decoder()
    parts = [d.feed(i) for i in ids]
    assert "".join(parts) + d.flush() == " a 🦙 b"
    assert all("\ufffd" not in p for p in parts)
    emoji_bytes = [tok.token_id(f"<0x{b:02X}>") for b in "🦙".encode()]
    d = tok.stream_decoder()
    assert [d.feed(i) for i in emoji_bytes] == ["", "", "", "🦙"]
    d = tok.stream_decoder()
    assert d.feed(emoji_bytes[0]) == "" and d.feed(emoji_bytes[1]) == ""
    assert d.flush() == "\ufffd"  # an unfinished character at the end
    assert d.feed(tok.token_id("<0x41>")) == "A"


def test_surrogates_and_bytes_input(reference_dir, vocab_tokenizers):
    tok, _ = _tok(reference_dir, "gpt-2", vocab_tokenizers)
    assert tok.encode(b"Hello", add_special=False) == tok.encode("Hello", add_special=False)
    assert tok.encode("a\udcff", add_special=False) == tok.encode("a\ufffd", add_special=False)


# ---------------------------------------------------------------- bad vocabularies


def _tiny_bpe_metadata(extra=()):
    from llamachat.runtime.tokenizer.bpe import BYTE_TO_UNICODE

    tokens = list(BYTE_TO_UNICODE) + ["ab", "abc"]
    types = [1] * len(tokens)
    for text, typ in extra:
        tokens.append(text)
        types.append(typ)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.merges": ["a b", "ab c"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }


def test_tiny_bpe_merges():
    tok = Tokenizer.from_metadata(_tiny_bpe_metadata())
    assert tok.encode("abc abd", add_special=False) == [tok.token_id("abc"), tok.token_id("Ġ"), tok.token_id("ab"), tok.token_id("d")]


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda md: md.update({"tokenizer.ggml.token_type": md["tokenizer.ggml.token_type"][:-1]}), "disagree in length"),
        (lambda md: md.update({"tokenizer.ggml.bos_token_id": 10**6}), "bos_token_id"),
        (lambda md: md.update({"tokenizer.ggml.eos_token_id": -1}), "eos_token_id"),
        (lambda md: md.update({"tokenizer.ggml.merges": None}), "merges"),
        (lambda md: md.update({"tokenizer.ggml.model": "rwkv"}), "not supported"),
        (lambda md: md.pop("tokenizer.ggml.model"), "no tokenizer"),
        (lambda md: md.update({"tokenizer.ggml.tokens": md["tokenizer.ggml.tokens"] + ["a"],
                               "tokenizer.ggml.token_type": np.ones(len(md["tokenizer.ggml.tokens"]) + 1, np.int32)}), "duplicate token"),
    ],
)
def test_bad_vocabulary_is_a_clear_error(change, words):
    md = _tiny_bpe_metadata()
    change(md)
    with pytest.raises(ModelError, match=words):
        Tokenizer.from_metadata(md, source="bad.gguf")


def test_bad_byte_token():
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "<0xZZ>"],
        "tokenizer.ggml.scores": np.zeros(4, np.float32),
        "tokenizer.ggml.token_type": np.array([2, 3, 3, 6], np.int32),
    }
    with pytest.raises(ModelError, match=r"token 3 .*<0xZZ>"):
        Tokenizer.from_metadata(md, source="bad.gguf")


def test_unknown_pre_tokenizer_warns_and_uses_default():
    md = _tiny_bpe_metadata()
    md["tokenizer.ggml.pre"] = "no-such-pre"
    tok = Tokenizer.from_metadata(md)
    assert tok.warnings and "default" in tok.warnings[0]
    md.pop("tokenizer.ggml.pre")
    assert Tokenizer.from_metadata(md).warnings


def test_token_id_out_of_range_in_decode():
    tok = Tokenizer.from_metadata(_tiny_bpe_metadata())
    with pytest.raises(UserError):
        tok.decode([10**7])


@pytest.mark.real_model
def test_from_loaded_model_like_objects(smollm2_path):
    from llamachat.runtime.gguf.reader import GGUFFile

    class FakeModel:
        def __init__(self, g):
            self.gguf = g

    with GGUFFile(smollm2_path) as g:
        assert Tokenizer.from_gguf(FakeModel(g)).n_vocab == 49152
        assert Tokenizer.from_gguf(dict(g.metadata)).encode("Hello world") == [19556, 905]


def test_decode_utf8_names_the_offset():
    from llamachat.runtime.tokenizer.tokenizer import decode_utf8

    assert decode_utf8("ok ✓".encode(), "x") == "ok ✓"
    with pytest.raises(UserError, match=r"prompt.txt is not valid UTF-8: byte 0xe2 at offset 3"):
        decode_utf8(b"abc\xe2\x9c", "prompt.txt")


def _tiny_wpm_metadata():
    tokens = [f"[unused{i}]" for i in range(100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += ["\u2581hello", "\u2581world", "\u2581un", "aff", "able", "\u2581,", "\u2581cafe", "\u2581日", "\u2581本"]
    types = [3] * 100 + [2, 3, 3, 3] + [1] * 9
    return {
        "tokenizer.ggml.model": "bert",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, np.int32),
    }


def test_wordpiece():
    tok = Tokenizer.from_metadata(_tiny_wpm_metadata())
    t = tok.token_id
    ids = tok.encode("Hello, UNAFFABLE\tworld!  Café 日本", add_special=True)
    assert ids == [101, t("\u2581hello"), t("\u2581,"), t("\u2581un"), t("aff"), t("able"), t("\u2581world"), 100,
                   t("\u2581cafe"), t("\u2581日"), t("\u2581本"), 102]
    assert tok.encode("xyz", add_special=False) == [100]  # a word that cannot be covered
    assert tok.decode([t("\u2581hello"), t("\u2581world")]) == " hello world"
    assert tok.encode("[MASK] hello", add_special=False, parse_special=True) == [103, t("\u2581hello")]
