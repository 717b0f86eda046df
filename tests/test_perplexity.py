"""Perplexity (runtime/generation/perplexity.py, `llamachat perplexity`): llama-perplexity's method.

- The scoring rule on a tiny random model: only the second half of each chunk, each chunk
  from an empty cache, BOS replacing the first token where the vocabulary adds one, the
  running values and the final estimate computed from the per-token NLLs by hand.
- The real SmolLM2 Q4_1 file on the Apache-2.0 text with -c 256, and the Q8_0 and Q4_0 files made
  from it: llama.cpp's value exactly; F16 and Q4_K_M within 1%.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from llamachat.runtime.errors import UserError
from llamachat.runtime.model.model import load_model
from llamachat.runtime.generation.perplexity import perplexity, token_nll

from test_model import write_tiny


def test_method_matches_a_hand_computation(tmp_path):
    m = load_model(write_tiny(tmp_path / "tiny.gguf"), n_ctx=16, n_threads=1)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 64, size=16 * 3 + 5)
    seen = []
    res = perplexity(m, tokens, 16, bos_id=7, on_chunk=lambda i, v: seen.append((i, v)))
    nlls = []
    for c in range(3):  # the 5 leftover tokens are not a chunk
        chunk = tokens[c * 16:(c + 1) * 16].copy()
        chunk[0] = 7
        m.truncate(0)
        logits = m.eval(chunk, logits="all").astype(np.float64)
        for pos in range(8, 15):  # positions n_ctx/2 .. n_ctx-2 predict the next token
            p = np.exp(logits[pos] - logits[pos].max())
            nlls.append(-math.log(p[chunk[pos + 1]] / p.sum()))
    nlls = np.array(nlls)
    assert res.count == 21
    assert res.ppl == pytest.approx(math.exp(nlls.mean()), rel=1e-6)
    assert res.stderr == pytest.approx(math.sqrt(nlls.var() / 20) * res.ppl, rel=1e-5)
    assert [i for i, _ in seen] == [1, 2, 3]
    assert seen[0][1] == pytest.approx(math.exp(nlls[:7].mean()), rel=1e-6)
    # --chunks limits the count
    assert perplexity(m, tokens, 16, n_chunks=1, bos_id=7).count == 7


def test_too_short_a_text_is_an_error(tmp_path):
    m = load_model(write_tiny(tmp_path / "tiny.gguf"), n_ctx=16, n_threads=1)
    with pytest.raises(UserError, match="you need at least 32 tokens"):
        perplexity(m, list(range(20)), 16)


def test_token_nll_is_log_softmax():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
    got = token_nll(logits, np.array([2, 1]))
    assert got == pytest.approx([-math.log(math.exp(3) / (math.e + math.e ** 2 + math.e ** 3)), math.log(3)])


def test_cli_errors(tmp_path, capsys):
    from llamachat.tui.cli import main

    assert main(["perplexity", "-m", str(write_tiny(tmp_path / "t.gguf")), "-f", str(tmp_path / "none.txt")]) == 2
    assert "none.txt: no such file" in capsys.readouterr().err


# |ours / llama.cpp's - 1| where llama.cpp's batch arithmetic is not ours, measured on an Intel
# Xeon (AVX-512; one arithmetic for prompts and decode): F16 1.35e-4 (llama.cpp multiplies F16
# batches with llamafile's tinyBLAS), Q4_K_M 7.2e-3 (llama.cpp sums Q4_K in a batch-position
# dependent order; we keep its single-token order for every token). Bounds: 2x those.
NOT_EXACT_REL = {"f16": 2.7e-4, "Q4_K_M": 1.45e-2}


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_perplexity_matches_llama_cpp(smollm2_path, reference, reference_dir, capsys):
    from llamachat.tui.cli import main

    text = reference_dir / reference["perplexity"]["text"]
    assert main(["perplexity", "-m", str(smollm2_path), "-f", str(text), "-c", "256", "-t", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("[1]") and out[0].count(",") == 8  # 2215 tokens: 8 chunks of 256
    last = out[-1]
    assert last.startswith("Final estimate: PPL = ")
    ppl = float(last.split("=")[1].split("+/-")[0])
    # llama-perplexity prints 4 decimals: the engine reproduces ggml's arithmetic (every product
    # in vec_dot's order, tiled flash attention for the 256-token batches), so the value is the same
    assert ppl == reference["perplexity"]["original_q4_1"]


@pytest.fixture(scope="module")
def smollm2_quantized(smollm2_path, tmp_path_factory):
    """The files llama.cpp's reference perplexities were measured on, made the same way:
    F16 from the Q4_1 file (--allow-requantize), the others quantized from that F16 file."""
    from llamachat.runtime.gguf.quantize_model import quantize_model

    folder = tmp_path_factory.mktemp("smollm2-quants")
    f16 = folder / "f16.gguf"
    quantize_model(smollm2_path, f16, "F16", allow_requantize=True)
    files = {"f16": f16}
    for quant in ("Q8_0", "Q4_0", "Q4_K_M"):
        files[quant] = folder / f"{quant}.gguf"
        quantize_model(f16, files[quant], quant)
    return files


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("key", ["f16", "Q8_0", "Q4_0", "Q4_K_M"])
def test_quantized_smollm2_perplexity_matches_llama_cpp(smollm2_quantized, key, reference, reference_dir, capsys):
    from llamachat.tui.cli import main

    text = reference_dir / reference["perplexity"]["text"]
    assert main(["perplexity", "-m", str(smollm2_quantized[key]), "-f", str(text), "-c", "256", "-t", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    ppl = float(last.split("=")[1].split("+/-")[0])
    if key in ("Q8_0", "Q4_0"):  # llama.cpp's batch arithmetic for these formats is ours
        assert ppl == reference["perplexity"][key], (key, ppl)
    else:  # F16: llama.cpp's batches go through llamafile's tinyBLAS; Q4_K: its gemm in fours
        assert ppl == pytest.approx(reference["perplexity"][key], rel=NOT_EXACT_REL[key]), (key, ppl)
