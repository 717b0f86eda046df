"""Perplexity of a model on a text, computed exactly as llama.cpp's llama-perplexity does it.

The whole text is tokenized once (BOS first if the vocabulary adds BOS), cut into chunks of
n_ctx tokens (a partial last chunk is dropped), and each chunk is evaluated from an empty
cache. Where the vocabulary adds BOS, the first token of every chunk is *replaced* by BOS (as
llama.cpp does). Only the second half of each chunk is scored: the logits at positions
n_ctx/2 .. n_ctx-2 against the tokens that follow them, so every scored token has at least
n_ctx/2 tokens of context. After each chunk the running value exp(mean NLL) is reported; the
final estimate is exp(mean NLL) +/- the standard error of the mean NLL times the perplexity.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float  # of the perplexity: sqrt(var(NLL) / (count-1)) * ppl
    count: int  # scored tokens
    running: list[float] = field(default_factory=list)  # after each chunk


def _scored_chunk(model, tokens, i: int, n_ctx: int, bos_id, cancel):
    """Chunk i evaluated from an empty cache as llama-perplexity does (BOS in front when the
    vocabulary has one): the logits of its second half's positions and the tokens they predict."""
    chunk = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
    if bos_id is not None:
        chunk[0] = bos_id
    model.truncate(0)
    logits = model.eval(chunk, logits="all", cancel=cancel)
    first = n_ctx // 2
    return logits[first:n_ctx - 1], chunk[first + 1:]


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in double precision (llama.cpp's log_softmax)."""
    x = logits.astype(np.float64)
    mx = x.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(x - mx).sum(axis=1))
    return -(x[np.arange(len(targets)), targets] - mx[:, 0] - log_sum)


def perplexity(model, tokens: Sequence[int], n_ctx: int, n_chunks: int = -1, bos_id: int | None = None,
               on_chunk: Callable[[int, float], None] | None = None,
               cancel: threading.Event | None = None) -> PerplexityResult:
    """tokens: the whole text's ids (BOS already in front when the vocabulary adds it);
    bos_id: set when the vocabulary adds BOS (each chunk then starts with it). The model's
    context must hold n_ctx tokens. on_chunk(i, running_ppl) after each chunk (1-based)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if n_ctx < 4 or n_ctx % 2:
        raise UserError(f"the context size for perplexity must be an even number of at least 4 tokens, not {n_ctx}")
    if model.n_ctx < n_ctx:
        raise UserError(f"the model was loaded with a context of {model.n_ctx} tokens, fewer than {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise UserError(f"you need at least {2 * n_ctx} tokens to evaluate perplexity with a context of {n_ctx} "
                        f"(the text has {len(tokens)} tokens)")
    n_max = len(tokens) // n_ctx
    n = n_max if n_chunks is None or n_chunks < 0 else min(n_chunks, n_max)
    if n == 0:
        raise UserError("--chunks must be at least 1")
    nll = 0.0
    nll2 = 0.0
    count = 0
    running = []
    for i in range(n):
        logits, targets = _scored_chunk(model, tokens, i, n_ctx, bos_id, cancel)
        v = token_nll(logits, targets)
        nll += float(v.sum())
        nll2 += float((v * v).sum())
        count += len(v)
        running.append(math.exp(nll / count))
        if on_chunk:
            on_chunk(i + 1, running[-1])
    mean = nll / count
    ppl = math.exp(mean)
    var = nll2 / count - mean * mean
    stderr = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else float("nan")
    return PerplexityResult(ppl, stderr, count, running)


# --- KL divergence against a base model (llama-perplexity --kl-divergence) ---------------

@dataclass
class KLResult:
    base_ppl: float  # perplexity of the base (F16/F32) model on the same scored tokens
    ppl: float  # of the compared model
    kl_mean: float  # mean over scored tokens of KL(base || model), in nats
    kl_stderr: float  # standard error of that mean
    top_agree: float  # fraction of scored tokens where both models' most likely token agrees
    count: int  # scored tokens


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    mx = x.max(axis=1, keepdims=True)
    return x - mx - np.log(np.exp(x - mx).sum(axis=1, keepdims=True))


def scored_log_probs(model, tokens: Sequence[int], n_ctx: int, n_chunks: int = -1, bos_id: int | None = None,
                     on_chunk: Callable[[int, int], None] | None = None,
                     cancel: threading.Event | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per chunk of `perplexity`'s method: (log-probabilities at the scored positions, as
    float32 [n_ctx/2 - 1, n_vocab], and the tokens that followed). The base model's
    distributions are kept this way while the compared model runs (llama-perplexity writes
    them to a file instead). At most `n_chunks` chunks when >= 0; on_chunk(i, n) after each
    chunk (1-based)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if n_ctx < 4 or n_ctx % 2 or len(tokens) < 2 * n_ctx:
        raise UserError(f"you need at least {2 * n_ctx} tokens and an even context of at least 4 to compare models (the text has {len(tokens)} tokens)")
    n = len(tokens) // n_ctx if n_chunks < 0 else min(n_chunks, len(tokens) // n_ctx)
    out = []
    for i in range(n):
        logits, targets = _scored_chunk(model, tokens, i, n_ctx, bos_id, cancel)
        out.append((log_softmax(logits).astype(np.float32), targets))
        if on_chunk:
            on_chunk(i + 1, n)
    return out


def kl_divergence(base: list[tuple[np.ndarray, np.ndarray]], other: list[tuple[np.ndarray, np.ndarray]]) -> KLResult:
    """Compare two models' `scored_log_probs` on the same text: both perplexities, the mean
    KL divergence of the other model's distributions from the base's, and how often their
    top tokens agree (llama-perplexity's "Mean KLD" and "Same top p")."""
    if len(base) != len(other) or any(b[1].shape != o[1].shape or (b[1] != o[1]).any() for b, o in zip(base, other)):
        raise ValueError("the two models were not run on the same tokens")
    nll_b = nll_o = 0.0
    kls = []
    agree = count = 0
    for (lb, targets), (lo, _) in zip(base, other):
        lb64, lo64 = lb.astype(np.float64), lo.astype(np.float64)
        rows = np.arange(len(targets))
        nll_b -= float(lb64[rows, targets].sum())
        nll_o -= float(lo64[rows, targets].sum())
        kls.append((np.exp(lb64) * (lb64 - lo64)).sum(axis=1))
        agree += int((lb.argmax(axis=1) == lo.argmax(axis=1)).sum())
        count += len(targets)
    kl = np.concatenate(kls)
    stderr = float(kl.std(ddof=1) / math.sqrt(count)) if count > 1 else float("nan")
    return KLResult(math.exp(nll_b / count), math.exp(nll_o / count), float(kl.mean()), stderr, agree / count, count)
