"""Our SentencePiece-style encoder against sentencepiece itself: train a tiny BPE model with byte
fallback (the kind Llama 1/2 ship), convert it to GGUF vocabulary metadata the way llama.cpp's
converter does, and compare the ids on varied strings."""

from __future__ import annotations

import pytest
import sentencepiece as spm

from llamachat.runtime.gguf.writer import write_gguf
from llamachat.runtime.tokenizer.tokenizer import Tokenizer

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
A language model reads tokens, one after another, and predicts what comes next.
Numbers like 3.14159, 2718 and 1,000,000 appear in text; so do dates such as 2024-05-17.
Licensed under the Apache License, Version 2.0: you may not use this file except in compliance.
Él habló en español y en français; naïve café crème brûlée. Über Größe und Maße.
def main(argv):\n    return 0  # code has    indentation and symbols {}[]()<>=+-*/
Hello, world! Hello again, wonderful world. The world says hello back.
"""

SAMPLES = [
    "Hello world",
    " Hello world",
    "Hello,   world!  ",
    "The lazy dog jumps over the quick brown fox.",
    "naïve café 🦙 日本語 — ✓",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\n\nhere",
    "3333333 + 22 = ?",
    "def f(x):\n    return x ** 2",
    "Größe über alles, ça va?",
    "zzzzqqqq xyzzy",
    "",
    "a",
    "ñ",
    "!!!???...",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text(TRAINING_TEXT * 20, encoding="utf-8")
    prefix = d / "tiny"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    # llama.cpp's convert_hf_to_gguf (_create_vocab_sentencepiece): text, score, type per piece
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1)
    import numpy as np

    path = d / "tiny-vocab.gguf"
    write_gguf(
        path,
        {
            "general.architecture": "llama",
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": np.array(scores, dtype=np.float32),
            "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
            "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        },
        [],
    )
    return sp, Tokenizer.from_gguf(path)


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_sentencepiece(trained, text):
    sp, tok = trained
    assert tok.encode(text, add_special=False) == sp.encode(text)
    assert tok.encode(text, add_special=True) == ([sp.bos_id()] + sp.encode(text))


def test_decodes_like_sentencepiece(trained):
    sp, tok = trained
    for text in SAMPLES:
        ids = sp.encode(text)
        assert tok.decode(ids) == (" " + text if text else "")
        assert sp.decode(ids) == text
