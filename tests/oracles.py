"""Float64 oracles the kernel tests measure against."""

from __future__ import annotations

import numpy as np


def causal_attention(q, k, v, n_past, n_head, n_kv, hd):
    """Causal softmax attention in float64 with grouped KV heads: token t of q (at position
    n_past + t) attends to keys 0..n_past + t; head h reads KV head h // (n_head // n_kv).
    q: (n_tok, n_head*hd); k, v: (n_past + n_tok, n_kv*hd). Returns (n_tok, n_head*hd)."""
    n_tok = q.shape[0]
    out = np.empty((n_tok, n_head * hd))
    for t in range(n_tok):
        for h in range(n_head):
            g = h // (n_head // n_kv)
            kk = k[:n_past + t + 1, g * hd:(g + 1) * hd].astype(np.float64)
            vv = v[:n_past + t + 1, g * hd:(g + 1) * hd].astype(np.float64)
            s = kk @ q[t, h * hd:(h + 1) * hd].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h * hd:(h + 1) * hd] = p @ vv / p.sum()
    return out
