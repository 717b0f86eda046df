"""Quality at import: `import --quant T --report` and `quantize --report` measure the result
against its float source as llama-perplexity --kl-divergence does (perplexity of both, mean
KL divergence, top-token agreement over the scored tokens), keep the figures in the library
entry and show them in `models list/show`; on a tiny converted model and on SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest

from llamachat.model_store.importers import REPORT_MAX_CHUNKS, REPORT_TEXT, run_import
from llamachat.model_store.library import Library
from llamachat.runtime.generation.perplexity import kl_divergence, scored_log_probs
from llamachat.tui.cli import main
from test_import_hf import sentencepiece_model


class FixedLogits:
    """A stand-in model whose logits depend only on the position (and a seed)."""

    def __init__(self, n_vocab: int, seed: int, noise: float = 0.0):
        rng = np.random.default_rng(0)
        self.base = rng.standard_normal((64, n_vocab)).astype(np.float32) * 3
        self.base += noise * np.random.default_rng(seed).standard_normal(self.base.shape).astype(np.float32)

    def truncate(self, n):
        pass

    def eval(self, tokens, logits="all", cancel=None):
        return self.base[: len(tokens)]


def test_kl_divergence_of_a_model_with_itself_is_zero_and_grows_with_noise():
    tokens = list(np.random.default_rng(3).integers(0, 50, 64))
    base = scored_log_probs(FixedLogits(50, 0), tokens, 16)
    same = kl_divergence(base, scored_log_probs(FixedLogits(50, 0), tokens, 16))
    assert same.kl_mean == 0 and same.top_agree == 1 and same.ppl == same.base_ppl and same.count == 4 * 7
    small = kl_divergence(base, scored_log_probs(FixedLogits(50, 1, noise=0.1), tokens, 16))
    large = kl_divergence(base, scored_log_probs(FixedLogits(50, 1, noise=4.0), tokens, 16))
    assert 0 < small.kl_mean < large.kl_mean and large.top_agree < 1
    # KL(p||q) for one row by its definition, against the helper's mean over rows
    lb, targets = base[0]
    lq = scored_log_probs(FixedLogits(50, 1, noise=4.0), tokens, 16)[0][0]
    p = np.exp(lb.astype(np.float64))
    row0 = float((p[0] * (np.log(p[0]) - lq[0].astype(np.float64))).sum())
    one = kl_divergence([(lb[:1], targets[:1])], [(lq[:1], targets[:1])])
    assert one.kl_mean == pytest.approx(row0, rel=1e-9)


def engine_chunks(path, tokens, n_ctx, bos):
    """Each chunk's logits at the scored positions, straight from the engine."""
    from llamachat.runtime.model.model import load_model

    m = load_model(path, n_ctx=n_ctx)
    try:
        out = []
        for c in range(min(len(tokens) // n_ctx, REPORT_MAX_CHUNKS)):
            chunk = [bos] + list(tokens[c * n_ctx + 1:(c + 1) * n_ctx])
            m.truncate(0)
            out.append((np.asarray(m.eval(chunk, logits="all"), np.float64)[n_ctx // 2:n_ctx - 1], chunk[n_ctx // 2 + 1:]))
        return out
    finally:
        m.close()


def test_import_report_figures_by_hand_and_in_the_library(tmp_path, capsys):
    from llamachat.runtime.tokenizer.tokenizer import Tokenizer

    sentencepiece_model(tmp_path / "spm", added=False)
    f16 = run_import(tmp_path / "spm", name="spm-f16")  # the same F16 file the report measured against
    result = run_import(tmp_path / "spm", name="spm-q4", quant="Q4_0", report=True)
    rep = result.report
    tok = Tokenizer.from_gguf(result.path)
    tokens = tok.encode(REPORT_TEXT, add_special=True)
    kl, agree, nll_b, nll_q = [], [], [], []
    for (b, targets), (q, _) in zip(engine_chunks(f16.path, tokens, rep["n_ctx"], tok.bos_id),
                                    engine_chunks(result.path, tokens, rep["n_ctx"], tok.bos_id)):
        lb = b - np.log(np.exp(b - b.max(1, keepdims=True)).sum(1, keepdims=True)) - b.max(1, keepdims=True)
        lq = q - np.log(np.exp(q - q.max(1, keepdims=True)).sum(1, keepdims=True)) - q.max(1, keepdims=True)
        kl += list((np.exp(lb) * (lb - lq)).sum(1))
        agree += list(b.argmax(1) == q.argmax(1))
        nll_b += [-lb[i, t] for i, t in enumerate(targets)]
        nll_q += [-lq[i, t] for i, t in enumerate(targets)]
    assert rep["tokens"] == len(kl)
    # the helper keeps log-probabilities as float32, this sum uses float64: measured relative
    # differences 3.4e-9 (KL), 1.0e-8 and 1.3e-8 (perplexities), 8.5e-9 (stderr)
    assert rep["kl"] == pytest.approx(np.mean(kl), rel=1e-8) and rep["kl"] > 0
    assert rep["top_agree"] == pytest.approx(np.mean(agree), abs=1e-12)
    assert rep["f16"] == pytest.approx(np.exp(np.mean(nll_b)), rel=3e-8)
    assert rep["result"] == pytest.approx(np.exp(np.mean(nll_q)), rel=3e-8)
    assert rep["kl_stderr"] == pytest.approx(np.std(kl, ddof=1) / np.sqrt(len(kl)), rel=2e-8)

    entry = Library.load().get("spm-q4")
    assert entry.quality == {"ppl": round(rep["result"], 4), "source_ppl": round(rep["f16"], 4), "kl": round(rep["kl"], 6),
                             "top_agree": round(rep["top_agree"], 4), "tokens": rep["tokens"], "source": "F16"}
    assert Library.load().get("spm-f16").quality == {}
    capsys.readouterr()
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert f"KL {rep['kl']:.4f} top {100 * rep['top_agree']:.1f}%" in listing
    assert main(["models", "show", "spm-q4"]) == 0
    assert f"perplexity {rep['result']:.4f} (F16 source {rep['f16']:.4f}) on {rep['tokens']} tokens" in capsys.readouterr().out


def test_cli_import_report_shows_kl_and_agreement_with_a_progress_bar(tmp_path, capsys):
    sentencepiece_model(tmp_path / "spm", added=False)
    assert main(["import", str(tmp_path / "spm"), "--quant", "Q8_0", "--report"]) == 0
    out, err = capsys.readouterr()
    assert "mean KL divergence from the source:" in out and "same top token as the source:" in out
    bars = [line for line in err.splitlines() if "chunks" in line]
    assert bars[0].strip().startswith("[------------------------------] 0/") and bars[-1].strip().startswith("[" + "#" * 30 + "]")


def test_bad_quality_table_is_a_warning_not_an_error(tmp_path):
    from llamachat.model_store import paths

    sentencepiece_model(tmp_path / "spm", added=False)
    run_import(tmp_path / "spm", name="m")
    lib_file = Library.load().file
    text = lib_file.read_text()
    lib_file.write_text(text.replace('[models.m]\n', '[models.m]\nquality = { kl = "low" }\n'))
    lib = Library.load()
    assert lib.get("m").quality == {}
    assert any("quality is not the table of figures" in w for w in lib.warnings)
    assert paths.models_dir().is_dir()


def test_quantize_report_cli(tmp_path, capsys):
    sentencepiece_model(tmp_path / "spm", added=False)
    f16 = run_import(tmp_path / "spm", name="f16").path
    out = tmp_path / "q8.gguf"
    assert main(["quantize", str(f16), str(out), "Q8_0", "--report"]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "mean KL divergence from the source:" in text and "same top token as the source:" in text
    assert main(["quantize", str(out), str(tmp_path / "x.gguf"), "Q4_0", "--report"]) != 0
    assert "already quantized (Q8_0)" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()


@pytest.mark.real_model
def test_report_on_smollm2(tmp_path, smollm2_path):
    """The real model, widened to F16 and quantized again: Q8_0 costs far less than Q4_0.
    The first 3,000 characters of the text (5 chunks) keep the test short."""
    from llamachat.model_store.importers import quality_report
    from llamachat.runtime.gguf.quantize_model import quantize_model

    f16 = tmp_path / "smol-f16.gguf"
    quantize_model(smollm2_path, f16, "F16", allow_requantize=True)
    reps = {}
    for q in ("Q8_0", "Q4_0"):
        quantize_model(f16, tmp_path / f"{q}.gguf", q)
        reps[q] = quality_report(f16, tmp_path / f"{q}.gguf", text=REPORT_TEXT[:3000])
    q8, q4 = reps["Q8_0"], reps["Q4_0"]
    assert q8["tokens"] == q4["tokens"] == 5 * 63 and q8["f16"] == q4["f16"]
    # measured: Q8_0 KL 0.0044, top 93.3%; Q4_0 KL 0.318, top 69.5%; bounds at half and twice
    # the KL figures, and the agreement within twice its distance from 1
    assert 0.0022 < q8["kl"] < 0.0088 and 0.159 < q4["kl"] < 0.64
    assert q8["top_agree"] > 0.866 and 0.39 < q4["top_agree"] < q8["top_agree"]
    assert q4["result"] > q8["result"]
