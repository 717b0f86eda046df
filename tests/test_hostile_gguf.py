"""Hostile GGUF metadata (issue 17, item 1): every key the engine reads is checked for type and
range before use, a refusal is one sentence naming the file and the key, strings from the file
are shortened when echoed, and an absurd context length is clamped with a notice."""

from __future__ import annotations

import json

import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamachat.runtime.errors import GGUFError, ModelError, UserError
from llamachat.runtime.gguf.reader import GGUFFile
from llamachat.runtime.gguf.writer import write_gguf
from llamachat.runtime.model.model import MAX_CTX, config_from_gguf, load_model
from llamachat.runtime.tokenizer.tokenizer import Tokenizer
from llamachat.tui.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from gguf_corpus import kv_u32, valid_base  # noqa: E402
from test_model import N_VOCAB, tiny_metadata, write_tiny  # noqa: E402

MEGA = "x" * 1_000_000  # a megabyte string, never to be echoed whole


def with_vocab(**over):
    """tiny_metadata with a 64-token SentencePiece vocabulary, enough for the command line."""
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(N_VOCAB - 3)],
          "tokenizer.ggml.scores": np.zeros(N_VOCAB, np.float32)}
    md.update(over)
    return tiny_metadata(**md)


def one_sentence(message: str, limit: int = 400) -> None:
    assert "\n" not in message and len(message) < limit and "Traceback" not in message, message[:500]


# ---- the model's configuration ------------------------------------------------------------

CONFIG_CASES = [
    ({"llama.rope.freq_base": 0.0}, "llama.rope.freq_base is 0; it must be a positive finite number"),
    ({"llama.rope.freq_base": -5.0}, "llama.rope.freq_base is -5; it must be a positive finite number"),
    ({"llama.rope.freq_base": math.nan}, "llama.rope.freq_base is nan"),
    ({"llama.rope.freq_base": math.inf}, "llama.rope.freq_base is inf"),
    ({"llama.rope.freq_base": "10000"}, "llama.rope.freq_base should be a number, not '10000'"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 0.0}, "llama.rope.scaling.factor is 0;"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": math.nan}, "llama.rope.scaling.factor is nan"),
    ({"llama.rope.scaling.type": 3}, "llama.rope.scaling.type should be text, not 3"),
    ({"llama.rope.scale_linear": -2.0}, "llama.rope.scale_linear is -2;"),
    ({"llama.attention.layer_norm_rms_epsilon": math.nan}, "llama.attention.layer_norm_rms_epsilon is nan"),
    ({"llama.attention.layer_norm_rms_epsilon": math.inf}, "llama.attention.layer_norm_rms_epsilon is inf"),
    ({"llama.attention.layer_norm_rms_epsilon": 0.0}, "llama.attention.layer_norm_rms_epsilon is 0;"),
    ({"llama.attention.layer_norm_rms_epsilon": -1e-5}, "llama.attention.layer_norm_rms_epsilon is -1e-05"),
    ({"general.architecture": 5}, "architecture not supported: 5; supported: llama"),
    ({"general.architecture": None}, "general.architecture is missing"),
    ({"general.file_type": 7.5}, "general.file_type should be an integer, not 7.5"),
    ({"general.file_type": "Q4_0"}, "general.file_type should be an integer, not 'Q4_0'"),
    ({"llama.embedding_length": 0}, "llama.embedding_length is 0; it must be between 1 and"),
    ({"llama.attention.head_count": 0}, "llama.attention.head_count is 0"),
    ({"llama.attention.head_count_kv": 0}, "llama.attention.head_count_kv is 0"),
    ({"llama.attention.head_count_kv": 3}, "head count 4 is not a multiple of the KV head count 3"),
    ({"llama.attention.head_count": 5}, "embedding length 64 is not a multiple of the head count 5"),
    ({"llama.block_count": 0}, "llama.block_count is 0"),
    ({"llama.block_count": 1 << 40}, "llama.block_count is 1099511627776; it must be between 1 and 2147483647"),
    ({"llama.block_count": 100_000}, "llama.block_count is 100000, but the file has tensors for 2 layers"),
    ({"llama.block_count": True}, "llama.block_count should be an integer, not True"),
    ({"llama.feed_forward_length": -1}, "llama.feed_forward_length is -1"),
    ({"llama.attention.key_length": 15, "llama.attention.value_length": 15}, "key/value length 15"),
    ({"llama.attention.key_length": 16, "llama.attention.value_length": 8}, "key/value length 16"),
    ({"llama.rope.dimension_count": 1 << 40}, "llama.rope.dimension_count is 1099511627776"),
    ({"llama.rope.dimension_count": 7}, "rope dimension count 7 must be even"),
    ({"llama.context_length": 0}, "llama.context_length is 0"),
    ({"llama.context_length": -3}, "llama.context_length is -3"),
    ({"llama.context_length": 2.5e9}, "llama.context_length should be an integer, not 2500000000.0"),
    ({"llama.vocab_size": 100}, "tensor token_embd.weight has shape [64, 64], but the metadata says [64, 100]"),
]


@pytest.mark.parametrize("over,expected", CONFIG_CASES, ids=[str(i) for i in range(len(CONFIG_CASES))])
def test_bad_model_metadata_is_one_sentence_naming_the_key(tmp_path, over, expected):
    path = write_tiny(tmp_path / "m.gguf", metadata=tiny_metadata(**over))
    with pytest.raises(ModelError) as err:
        load_model(path, n_ctx=16)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message
    one_sentence(message)


def test_a_megabyte_architecture_is_not_echoed(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", metadata=tiny_metadata(**{"general.architecture": MEGA}))
    with pytest.raises(ModelError) as err:
        load_model(path, n_ctx=16)
    assert "architecture not supported: 'xxxx" in str(err.value) and "(1000000 characters)" in str(err.value)
    one_sentence(str(err.value))


def test_inspect_json_does_not_echo_a_megabyte_name(tmp_path, capsys):
    from llamachat.tui.cli import main

    path = write_tiny(tmp_path / "m.gguf", metadata=tiny_metadata(**{"general.name": MEGA}))
    assert main(["inspect", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out) < 10_000 and json.loads(out)["name"].endswith("... (1000000 characters)")


def test_context_length_past_any_kv_cache_is_clamped_with_a_notice(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", metadata=tiny_metadata(**{"llama.context_length": np.uint64(1 << 40)}))
    m = load_model(path, n_ctx=16)
    assert m.config.n_ctx_train == MAX_CTX
    assert any("llama.context_length is 1099511627776" in w and f"using {MAX_CTX}" in w for w in m.warnings)
    assert np.isfinite(m.eval([1, 2, 3])).all()


def test_embedding_rows_must_match_the_vocabulary(tmp_path):
    md = tiny_metadata(**{"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [f"t{i}" for i in range(N_VOCAB - 1)]})
    path = write_tiny(tmp_path / "m.gguf", metadata=md)
    with pytest.raises(ModelError, match=r"token_embd.weight has 64 rows, but the vocabulary \(tokenizer.ggml.tokens\) has 63 tokens"):
        load_model(path, n_ctx=16)


def test_rope_freqs_must_be_positive_finite(tmp_path):
    from test_model import tiny_weights

    w = tiny_weights()
    w["rope_freqs.weight"] = np.array([1.0, 0.0, 2.0, np.nan, 1, 1, 1, 1], np.float32)
    path = write_tiny(tmp_path / "m.gguf", weights=w)
    with pytest.raises(ModelError, match="rope_freqs.weight holds values that are not positive finite numbers"):
        load_model(path, n_ctx=16)


# ---- the tokenizer's arrays and ids -------------------------------------------------------

TOKENS = [f"t{i}" for i in range(16)]
TOKENIZER_CASES = [
    ({"tokenizer.ggml.scores": ["a"] * 16}, "tokenizer.ggml.scores holds values that are not numbers"),
    ({"tokenizer.ggml.scores": np.full(16, np.nan, np.float32)}, "tokenizer.ggml.scores holds values that are not numbers (or are NaN)"),
    ({"tokenizer.ggml.scores": np.zeros(3, np.float32)}, "tokenizer.ggml.tokens has 16 entries but tokenizer.ggml.scores has 3"),
    ({"tokenizer.ggml.token_type": np.full(16, 1.5, np.float32)}, "tokenizer.ggml.token_type holds values that are not integers"),
    ({"tokenizer.ggml.token_type": ["x"] * 16}, "tokenizer.ggml.token_type holds values that are not integers"),
    ({"tokenizer.ggml.model": 3}, "tokenizer.ggml.model should be text, not 3"),
    ({"tokenizer.ggml.model": MEGA}, "(1000000 characters) is not supported"),
    ({"tokenizer.ggml.tokens": np.arange(16, dtype=np.int32)}, "tokenizer.ggml.tokens is missing or is not a list of strings"),
    ({"tokenizer.ggml.bos_token_id": 1000}, "tokenizer.ggml.bos_token_id = 1000 is not a token id of this vocabulary (16 tokens"),
    ({"tokenizer.ggml.eos_token_id": np.int32(-3)}, "tokenizer.ggml.eos_token_id = -3 is not a token id"),
    ({"tokenizer.ggml.bos_token_id": MEGA}, "(1000000 characters) is not a token id"),
    ({"tokenizer.ggml.add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token should be true or false, not 'yes'"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": 5, "tokenizer.ggml.merges": ["t 1"]},
     "tokenizer.ggml.pre should be the name of a pre-tokenizer (text), not 5"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": np.arange(5, dtype=np.int32)}, "needs tokenizer.ggml.merges, a list of strings"),
]


@pytest.mark.parametrize("over,expected", TOKENIZER_CASES, ids=[str(i) for i in range(len(TOKENIZER_CASES))])
def test_bad_tokenizer_metadata_is_one_sentence_naming_the_key(tmp_path, over, expected):
    md = {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": TOKENS,
          "tokenizer.ggml.scores": np.zeros(16, np.float32)}
    md.update(over)
    path = write_gguf(tmp_path / "v.gguf", md, [])
    with pytest.raises(ModelError) as err:
        Tokenizer.from_gguf(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message
    one_sentence(message)


def test_unknown_pre_tokenizer_warns_with_a_suggestion():
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"],
          "tokenizer.ggml.pre": "lama-bpe"}
    tok = Tokenizer(md, "v.gguf")
    assert any("'lama-bpe', which is not known (did you mean 'llama-bpe'?)" in w for w in tok.warnings)


# ---- the reader's own echoes ------------------------------------------------------------


def test_a_megabyte_key_is_not_echoed(tmp_path):
    raw = valid_base()
    raw.kvs.append(kv_u32("general." + "k" * 1_000_000, 1))
    raw.kvs.append(kv_u32("general." + "k" * 1_000_000, 1))  # duplicate: the error names the key
    path = tmp_path / "k.gguf"
    path.write_bytes(raw.build())
    with pytest.raises(GGUFError) as err:
        GGUFFile(path)
    assert "duplicate metadata key 'general.kkk" in str(err.value) and "(1000008 characters)" in str(err.value)
    one_sentence(str(err.value))


def test_cli_on_hostile_metadata_is_one_line_and_bounded(tmp_path, capsys):
    path = write_tiny(tmp_path / "m.gguf", metadata=with_vocab(**{"llama.rope.freq_base": 0.0, "general.name": MEGA}))
    code = main(["-m", str(path), "-p", "hi", "-n", "1", "--no-tui"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err == f"llamachat: {path}: metadata key llama.rope.freq_base is 0; it must be a positive finite number\n"
    assert main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert len(out) < 5000 and "(1000000 characters)" in out


def test_subprocess_refuses_nan_epsilon_promptly_without_traceback(tmp_path):
    path = write_tiny(tmp_path / "m.gguf", metadata=with_vocab(**{"llama.attention.layer_norm_rms_epsilon": math.nan}))
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "llamachat.tui.cli", "-m", str(path), "-p", "hi", "--no-tui"],
                          capture_output=True, text=True, timeout=30)
    assert time.monotonic() - t0 < 30
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"llamachat: {path}: metadata key llama.attention.layer_norm_rms_epsilon is nan; it must be a positive finite number\n"


# ---- fuzz: any value for any key the engine reads -----------------------------------------

_any_value = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 64), max_value=1 << 64),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["llama", "linear", "none", "gpt2", "yarn", "llama-bpe", "x" * 300]),
    st.lists(st.integers(min_value=-3, max_value=70), max_size=4),
)
CONFIG_KEYS = [
    "general.architecture", "general.file_type", "llama.embedding_length", "llama.block_count",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.feed_forward_length",
    "llama.attention.key_length", "llama.attention.value_length", "llama.rope.dimension_count", "llama.vocab_size",
    "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.rope.scale_linear", "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon", "llama.context_length",
]


@pytest.fixture(scope="module")
def tiny_tensors(tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp("fuzz") / "m.gguf")
    g = GGUFFile(path)
    yield g
    g.close()


@settings(max_examples=250, deadline=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), _any_value, min_size=1, max_size=4))
def test_fuzz_model_metadata(tiny_tensors, changes):
    md = dict(tiny_tensors.metadata)
    for key, value in changes.items():
        if value is None:
            md.pop(key, None)
        else:
            md[key] = value
    g = SimpleNamespace(path=tiny_tensors.path, metadata=md, tensors=tiny_tensors.tensors)
    try:
        cfg = config_from_gguf(g)
    except ModelError as err:
        assert str(err).startswith(f"{g.path}: ")
        one_sentence(str(err))
        return
    for value in (cfg.rope_freq_base, cfg.rms_eps, cfg.rope_freq_scale):
        assert math.isfinite(value) and value > 0
    assert cfg.n_head % cfg.n_head_kv == 0 and cfg.head_dim % 2 == 0 and 0 < cfg.n_rot <= cfg.head_dim
    assert 1 <= cfg.n_ctx_train <= MAX_CTX and cfg.n_layer <= 2


TOKENIZER_KEYS = [
    "tokenizer.ggml.model", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.pre",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix",
]
_array_value = st.one_of(
    _any_value,
    st.lists(st.floats(allow_nan=True, width=32), min_size=6, max_size=6).map(lambda x: np.array(x, np.float32)),
    st.lists(st.integers(min_value=-1, max_value=8), min_size=6, max_size=6).map(lambda x: np.array(x, np.int32)),
    st.lists(st.text(alphabet="ab ", max_size=4), max_size=6),
)


@settings(max_examples=250, deadline=300, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(TOKENIZER_KEYS), _array_value, min_size=1, max_size=4))
def test_fuzz_tokenizer_metadata(changes):
    md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<s>", "</s>", "a", "b", "ab", "<0x41>"],
          "tokenizer.ggml.scores": np.zeros(6, np.float32), "tokenizer.ggml.token_type": np.array([3, 3, 1, 1, 1, 6], np.int32)}
    for key, value in changes.items():
        if value is None:
            md.pop(key, None)
        else:
            md[key] = value
    try:
        tok = Tokenizer(md, "fuzz.gguf")
    except UserError as err:
        assert str(err).startswith("fuzz.gguf: ")
        one_sentence(str(err))
        return
    ids = tok.encode("ab a b", add_special=True)
    assert all(0 <= i < tok.n_vocab for i in ids)
    tok.decode(ids)
