"""Oracles the kernel tests measure against: float64 ones, and earlier forms of kernels whose
bits a faster form must keep."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from llamachat.runtime.model.forward import FA_TILE_KV, _expf_poly, _expf_reduce, _ggml_expf
from llamachat.runtime.quants.simd import fmaf


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


# --- forward.attention_tiled one (token, head) row at a time, as it was before it took rows
# through the KV tiles together: the bits its faster form must give ------------------------

@njit(cache=True)
def _tiled_attention_row(q, kt, v_cache, n_past, n_head, n_head_kv, head_dim, out, job, acc, s, xs, ns, kbits):
    """One (token, head) pair (job = t * n_head + h), kt the keys laid out dimension by
    dimension: session 11's forward._attention_tiled_job, unchanged."""
    group = n_head // n_head_kv
    scale = np.float32(1.0 / math.sqrt(head_dim))
    t = job // n_head
    h = job % n_head
    g = h // group
    kv0 = g * head_dim
    n_kv = n_past + t + 1
    acc[:] = 0.0
    two_n = kbits.view(np.float32)
    mx = np.empty(16, np.float32)
    total = np.float32(0.0)
    m = np.float32(-np.inf)
    n_d4 = head_dim - head_dim % 4
    for ic in range(0, n_kv, FA_TILE_KV):
        for tk in range(FA_TILE_KV):
            s[tk] = 0.0
        # each chain's fmas in dimension order, four dimensions per pass over the 64 lanes (the
        # same fmas: s stays in registers between them instead of going through memory each time)
        for d in range(0, n_d4, 4):
            q0 = q[t, h * head_dim + d]
            q1 = q[t, h * head_dim + d + 1]
            q2 = q[t, h * head_dim + d + 2]
            q3 = q[t, h * head_dim + d + 3]
            k0 = kt[g, d, ic:ic + FA_TILE_KV]  # contiguous: the 64 chains advance in vector lanes
            k1 = kt[g, d + 1, ic:ic + FA_TILE_KV]
            k2 = kt[g, d + 2, ic:ic + FA_TILE_KV]
            k3 = kt[g, d + 3, ic:ic + FA_TILE_KV]
            for tk in range(FA_TILE_KV):
                s[tk] = fmaf(q3, k3[tk], fmaf(q2, k2[tk], fmaf(q1, k1[tk], fmaf(q0, k0[tk], s[tk]))))
        for d in range(n_d4, head_dim):
            qd = q[t, h * head_dim + d]
            krow = kt[g, d, ic:ic + FA_TILE_KV]
            for tk in range(FA_TILE_KV):
                s[tk] = fmaf(qd, krow[tk], s[tk])
        for tk in range(FA_TILE_KV):
            s[tk] = s[tk] * scale if ic + tk < n_kv else -np.inf  # masked (future or padding): weight 0
        # the tile's maximum through 16 running maxima (vector lanes; one chain of compares would
        # not vectorize): the same maximum in any order
        for j in range(16):
            mx[j] = s[j]
        for c in range(16, FA_TILE_KV, 16):
            for j in range(16):
                mx[j] = max(mx[j], s[c + j])
        tile_max = mx[0]
        for j in range(1, 16):
            tile_max = max(tile_max, mx[j])
        m_new = max(m, tile_max)
        if m_new > m:
            ms = np.float32(math.exp(np.float32(m - m_new)))  # libm expf
            for d in range(head_dim):
                acc[d] *= ms
            total *= ms
        m = m_new
        # s = _ggml_expf(s - m_new) in vectorizable loops (2**n from its bits), then ggml's
        # slow path (|n| > 126: the masked and the vanishing weights) one by one
        for tk in range(FA_TILE_KV):
            xs[tk] = s[tk] - m_new
        for tk in range(FA_TILE_KV):
            n, b = _expf_reduce(xs[tk])
            ns[tk] = n
            kbits[tk] = (np.int32(min(max(n, np.float32(-126.0)), np.float32(126.0))) + 127) << 23
            s[tk] = fmaf(_expf_poly(b), two_n[tk], two_n[tk])
        for tk in range(FA_TILE_KV):
            if not abs(ns[tk]) <= 126.0:  # (a masked weight is _ggml_expf(-inf) = 0 without the call)
                s[tk] = np.float32(0.0) if xs[tk] == -np.inf else _ggml_expf(xs[tk])
        tile_sum = 0.0  # ggml_vec_soft_max_f32: AVX2 lanes of 8, hsum, summed in double
        for c in range(0, FA_TILE_KV, 8):
            r0 = s[c + 4] + s[c + 0]
            r1 = s[c + 5] + s[c + 1]
            r2 = s[c + 6] + s[c + 2]
            r3 = s[c + 7] + s[c + 3]
            tile_sum += np.float64((r0 + r2) + (r1 + r3))
        total = np.float32(np.float64(total) + tile_sum)
        # the values in position order, four positions per pass over acc (the same fmas per
        # dimension, as above)
        n_valid = min(FA_TILE_KV, n_kv - ic)
        n_v4 = n_valid - n_valid % 4
        for tk in range(0, n_v4, 4):
            p0, p1, p2, p3 = s[tk], s[tk + 1], s[tk + 2], s[tk + 3]
            v0 = v_cache[ic + tk, kv0:kv0 + head_dim]
            v1 = v_cache[ic + tk + 1, kv0:kv0 + head_dim]
            v2 = v_cache[ic + tk + 2, kv0:kv0 + head_dim]
            v3 = v_cache[ic + tk + 3, kv0:kv0 + head_dim]
            for d in range(head_dim):
                acc[d] = fmaf(p3, v3[d], fmaf(p2, v2[d], fmaf(p1, v1[d], fmaf(p0, v0[d], acc[d]))))
        for tk in range(n_v4, n_valid):
            p = s[tk]
            vrow = v_cache[ic + tk, kv0:kv0 + head_dim]
            for d in range(head_dim):
                acc[d] = fmaf(p, vrow[d], acc[d])
    inv = np.float32(1.0) / total
    for d in range(head_dim):
        out[t, h * head_dim + d] = acc[d] * inv


@njit(cache=True)
def tiled_attention_row_by_row(q, k_cache, v_cache, n_past, n_head, n_head_kv, head_dim, out):
    """forward.attention_tiled's floats (same arguments), one (token, head) row after another,
    without threads."""
    n_tok = q.shape[0]
    n_all = n_past + n_tok
    n_pad = -(-n_all // FA_TILE_KV) * FA_TILE_KV
    kt = np.zeros((n_head_kv, head_dim, n_pad), np.float32)
    for gd in range(n_head_kv * head_dim):
        for j in range(n_all):
            kt[gd // head_dim, gd % head_dim, j] = k_cache[j, gd]
    acc = np.empty(head_dim, np.float32)
    s = np.empty(FA_TILE_KV, np.float32)
    xs = np.empty(FA_TILE_KV, np.float32)
    ns = np.empty(FA_TILE_KV, np.float32)
    kbits = np.empty(FA_TILE_KV, np.int32)
    for job in range(n_tok * n_head):
        _tiled_attention_row(q, kt, v_cache, n_past, n_head, n_head_kv, head_dim, out, np.int64(job), acc, s, xs, ns,
                             kbits)
