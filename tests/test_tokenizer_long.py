"""Long words (hundreds of characters and more without a break) go through the numba merge
kernel; it must give exactly what the text-based merge gives, for BPE and SentencePiece."""

from __future__ import annotations

import random

import pytest

from llamachat.runtime.tokenizer.bpe import LONG_WORD, byte_encode
from llamachat.runtime.tokenizer.tokenizer import Tokenizer

ALPHABET = list("abcdefghijklmnopqrstuvwxyz      ETAOIN,.'-0123") + ["é", "ü", "日", "本", "🦙", "ж", "\u2581", "\x04"]


def _words():
    rng = random.Random(7)
    words = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(LONG_WORD, 2000))) for _ in range(12)]
    return words + ["a" * 3000, " " * 1000, "ab" * 700, "🦙" * 300, "\x04" * 300]


@pytest.mark.parametrize("name", ["gpt-2", "llama-bpe"])
def test_bpe_kernel_equals_text_merge(reference_dir, name):
    tok = Tokenizer.from_gguf(reference_dir / "vocab" / f"ggml-vocab-{name}.gguf")
    for w in _words():
        e = byte_encode(w)
        fast = tok._bpe._merge_long(e)
        assert fast is not None
        assert fast == tok._bpe._merge(e)


@pytest.mark.real_model
def test_bpe_kernel_with_missing_byte_tokens(smollm2_path):
    tok = Tokenizer.from_gguf(smollm2_path)  # SmolLM2 lacks tokens for some bytes (e.g. 0x04)
    for w in _words():
        e = byte_encode(w)
        assert tok._bpe._merge_long(e) == tok._bpe._merge(e)
    # and through encode, a long run equals the sum of its parts' merge
    assert tok.encode("a" * 5000) == [tok.token_id("aaaa")] * 1250


def test_spm_kernel_equals_text_merge(reference_dir):
    tok = Tokenizer.from_gguf(reference_dir / "vocab" / "ggml-vocab-llama-spm.gguf")
    for w in _words():
        e = w.replace(" ", "\u2581")
        fast = tok._spm._merge_long(e)
        assert fast is not None
        assert fast == tok._spm._merge(e)
