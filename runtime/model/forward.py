"""The llama forward pass, in the order of llama2.c's run.c (and llama.cpp's build_llama):

    x = embedding rows of the tokens
    for each layer:
        h = rmsnorm(x) * attn_norm
        q, k, v = h @ Wq, h @ Wk, h @ Wv;  rotate q and k by their positions (RoPE)
        append k, v to the cache;  a = softmax(q k^T / sqrt(head_dim), causal) v   (GQA)
        x = x + a @ Wo
        h = rmsnorm(x) * ffn_norm
        x = x + (silu(h @ Wgate) * (h @ Wup)) @ Wdown
    logits = (rmsnorm(x) * output_norm) @ Wout

Products go through runtime.quants.matmul (weights stay quantized); the small numba kernels here
(RoPE, attention) are the rest of the work. RoPE is llama.cpp's "normal" mode, the one
LLM_ARCH_LLAMA uses: dimensions (2i, 2i+1) of each head rotate together by
pos * freq_scale * base**(-2i/n_rot) (divided by rope_freqs[i] when the file has that tensor);
dimensions past n_rot are left alone.

A layer is written once, `layer_steps`, one line a step. `forward` runs it as Python for a batch
of tokens (a prompt, perplexity, embeddings; each step one kernel over the tokens), and
`decode_token` runs it compiled for one token (`decode_layer`, each step's one-token
implementation inlined; `decode_all_layers` for the whole model when its layers are alike, else
for the output product after one call per layer) on the arrays runtime.model.loading prepared.
Both take the model's config, weights and KV cache and change nothing but the cache;
attention is chosen in one place, `attend` (decode, one token, goes straight to its one-row half).
"""

from __future__ import annotations

import math
from types import FunctionType
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ..quants.matmul import (ACT_F16, FUSED_TYPES, Activations, KernelContext, _quantize_row, act_mode_of, dequantize_rows,
                     matmul, matvec_fused, quantize_activations, quantize_for, read_only_view, round_to_f16)
from ..quants.plain import round_row_to_half
from ..quants.simd import f32_from_bits, fmaf


# the row helpers below are plain compiled functions, not inline="always": numba's own inlining of
# them into the parallel prompt passes (add_norm_rows, rope_store_rows) doubled those passes'
# compile, a cold start's critical path; LLVM inlines or calls them at no measurable cost
@njit(cache=True)
def _rmsnorm_row(x, weight, eps, out):
    """rmsnorm of one token's row x [n_embd] into out."""
    total = 0.0
    for i in range(x.shape[0]):
        total += np.float64(x[i] * x[i])
    mean = np.float32(total / x.shape[0])
    scale = np.float32(1.0) / np.float32(math.sqrt(mean + eps))
    for i in range(x.shape[0]):
        out[i] = (x[i] * scale) * weight[i]


@njit(cache=True)
def _rmsnorm(x, weight, eps, out):
    for t in range(x.shape[0]):
        _rmsnorm_row(x[t], weight, eps, out[t])


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """ggml_rms_norm then ggml_mul: squares in float summed in double, mean and
    1/sqrt(mean + eps) in float, x * scale, then * weight."""
    out = np.empty_like(x)
    _rmsnorm(x, weight, np.float32(eps), out)
    return out


@njit(cache=True)
def _rope_cos_sin(positions, theta_scale, freqs, freq_scale, cos, sin):
    """cos/sin [T, n_rot/2] of each position's float32 angles, computed in ggml's order: theta
    starts at the position and is multiplied by theta_scale once per pair, then divided by freqs
    and multiplied by freq_scale (all float32 steps). cosf/sinf: numba lowers math.cos/math.sin
    of a float32 to libm's cosf and sinf, the functions ggml's rope_yarn calls. (glibc's are not
    correctly rounded: about 2% of these angles differ by one ulp from the float64 cos/sin
    rounded to float32.)"""
    for t in range(positions.shape[0]):
        theta = np.float32(positions[t])
        for i in range(cos.shape[1]):
            angle = np.float32(np.float32(theta / freqs[i]) * freq_scale)
            cos[t, i] = math.cos(angle)
            sin[t, i] = math.sin(angle)
            theta = np.float32(theta * theta_scale)


def rope_tables(positions: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [T, n_rot/2] of each position's angles, as ggml_rope_cache_init makes them:
    theta starts at the position and is multiplied by theta_scale = base**(-2/n_rot) once per
    pair, in float32 (divided by rope_freqs[i] when the file has that tensor; without it by 1,
    which changes no bit); cos/sin are libm's cosf/sinf of those float32 angles."""
    half = cfg.n_rot // 2
    theta_scale = np.float32(cfg.rope_freq_base ** (-2.0 / cfg.n_rot))
    freqs = cfg.rope_freqs[:half] if cfg.rope_freqs is not None else np.ones(half, np.float32)
    cos = np.empty((len(positions), half), np.float32)
    sin = np.empty_like(cos)
    _rope_cos_sin(np.asarray(positions, np.int64), theta_scale, np.ascontiguousarray(freqs), np.float32(cfg.rope_freq_scale),
                  cos, sin)
    return cos, sin


@njit(cache=True)
def _rope_row(x, n_heads, head_dim, n_rot, cos, sin):
    """Rotate one token's row x [n_heads*head_dim] in place by its angles cos, sin [n_rot/2]."""
    for h in range(n_heads):
        base = h * head_dim
        for i in range(n_rot // 2):
            x0 = x[base + 2 * i]
            x1 = x[base + 2 * i + 1]
            c = cos[i]
            s = sin[i]
            # as compiled in ggml (-ffp-contract=fast): the first product is fused
            x[base + 2 * i] = fmaf(x0, c, -(x1 * s))
            x[base + 2 * i + 1] = fmaf(x0, s, x1 * c)


@njit(cache=True)
def apply_rope(x, n_heads, head_dim, n_rot, cos, sin):
    """Rotate x [T, n_heads*head_dim] in place: pairs (2i, 2i+1) of each head."""
    for t in range(x.shape[0]):
        _rope_row(x[t], n_heads, head_dim, n_rot, cos[t], sin[t])


# --- a prompt's steps between the products, the tokens split over threads --------------------
# Each is one parallel region doing what several serial steps did (numpy's residual add, the
# norm, the activations' rounding; RoPE and the cache's rounding to half), each token's floats
# computed by the same row code as decode's.

@njit(cache=True, parallel=True)
def add_norm_rows(x, o, weight, eps, mode, h, xq, xd, xs, xhat):
    """Per token t: x[t] += o[t] (skipped when o has no rows: the first layer), h[t] =
    rmsnorm(x[t]) * weight, and h[t] rounded to activation format mode into xq, xd, xs, xhat
    as quantize_activations does it (mode < 0: not rounded). Changes x, h and the four."""
    add = o.shape[0] > 0
    for t in prange(x.shape[0]):
        xr = x[t]
        if add:
            orow = o[t]
            for i in range(xr.shape[0]):
                xr[i] += orow[i]
        hr = h[t]
        _rmsnorm_row(xr, weight, eps, hr)
        if mode == ACT_F16:  # the same rounding as round_to_f16's, vectorized (quantize_for's for batches)
            round_row_to_half(hr, xhat[t], np.empty(hr.shape[0], np.float32))
        elif mode >= 0:
            _quantize_row(hr, mode, xq[t], xd[t], xs[t], xhat[t])


@njit(cache=True, parallel=True)
def rope_store_rows(q, k, v, cos, sin, n_head, n_head_kv, head_dim, n_rot, k_cache, v_cache, pos):
    """Per token t: q[t] and k[t] rotated in place (apply_rope), then k[t] and v[t] rounded to
    half into the cache rows pos + t (k_cache, v_cache: one layer's [n_ctx, kv_dim]), as
    KVCache.store rounds them."""
    for t in prange(q.shape[0]):
        _rope_row(q[t], n_head, head_dim, n_rot, cos[t], sin[t])
        kr = k[t]
        _rope_row(kr, n_head_kv, head_dim, n_rot, cos[t], sin[t])
        tmp = np.empty(kr.shape[0], np.float32)
        round_row_to_half(kr, k_cache[pos + t], tmp)
        round_row_to_half(v[t], v_cache[pos + t], tmp)


@njit(cache=True, inline="always")
def _round_half_inplace(acc, bits, magic, magic_bits):
    """Round float32 values to half precision in place, ties to even: what storing into a
    ggml_fp16_t does. x + C - C with C = 1.5 * 2**(e+13) (e: x's exponent, at least -14)
    rounds x to the half-float quantum of its binade; both loops vectorize.
    bits/magic_bits are uint32 views of acc/magic."""
    for d in range(acc.shape[0]):
        e = bits[d] & np.uint32(0x7F800000)
        magic_bits[d] = max(e, np.uint32(113 << 23)) + np.uint32(0x06C00000)
    for d in range(acc.shape[0]):
        acc[d] = (acc[d] + magic[d]) - magic[d]


# fastmath 'contract': each a*b + c below is one fused multiply-add, as in ggml's SIMD code
@njit(cache=True, fastmath={"contract"})
def _attention_job(q, k_cache, v_cache, n_past, n_head, n_head_kv, head_dim, out, job):
    """One (token, head) pair of `attention`: job = t * n_head + h. A plain kernel of its own:
    numba's analysis of a parallel loop costs seconds of a cold start per loop body, so the
    parallel driver's body is one call."""
    group = n_head // n_head_kv
    scale = np.float32(1.0 / math.sqrt(head_dim))
    n_simd = head_dim - head_dim % 32
    t = job // n_head
    h = job % n_head
    kv0 = (h // group) * head_dim
    qh = np.empty(head_dim, np.float32)
    for d in range(head_dim):
        qh[d] = round_to_f16(q[t, h * head_dim + d])
    acc = np.zeros(head_dim, np.float32)
    bits = acc.view(np.uint32)
    sums = np.empty(32, np.float32)
    magic = np.empty(head_dim, np.float32)
    magic_bits = magic.view(np.uint32)
    m = np.float32(-np.inf)
    total = np.float32(0.0)
    for j in range(n_past + t + 1):
        # ggml_vec_dot_f16 (AVX2): 4 accumulators x 8 lanes over 32-wide steps, fma
        krow = k_cache[j, kv0:kv0 + head_dim]  # a contiguous row: the lanes load as vectors
        for lane in range(32):
            sums[lane] = 0.0
        for i in range(0, n_simd, 32):
            for lane in range(32):
                sums[lane] = qh[i + lane] * krow[i + lane] + sums[lane]
        for lane in range(8):
            sums[lane] = (sums[lane] + sums[lane + 16]) + (sums[lane + 8] + sums[lane + 24])
        t0 = sums[0] + sums[4]
        t1 = sums[1] + sums[5]
        t2 = sums[2] + sums[6]
        t3 = sums[3] + sums[7]
        dot = np.float64((t0 + t1) + (t2 + t3))
        for d in range(n_simd, head_dim):  # leftovers, in double
            dot += np.float64(qh[d] * krow[d])
        s = np.float32(dot) * scale
        ms = np.float32(1.0)
        vs = np.float32(1.0)
        if s > m:
            ms = np.float32(math.exp(m - s)) if m != -np.inf else np.float32(0.0)
            m = s
            for d in range(head_dim):
                acc[d] *= ms
            _round_half_inplace(acc, bits, magic, magic_bits)
        else:
            vs = np.float32(math.exp(s - m))
        vrow = v_cache[j, kv0:kv0 + head_dim]
        for d in range(head_dim):  # ggml_vec_mad_f16: fma in float, stored as half
            acc[d] = vrow[d] * vs + acc[d]
        _round_half_inplace(acc, bits, magic, magic_bits)
        total = total * ms + vs
    inv = np.float32(1.0) / total
    for d in range(head_dim):
        out[t, h * head_dim + d] = acc[d] * inv


@njit(cache=True, parallel=True)
def attention(q, k_cache, v_cache, n_past, n_head, n_head_kv, head_dim, out):
    """Causal multi-head attention with grouped KV heads, computed as llama.cpp's CPU flash
    attention does it (ggml_compute_forward_flash_attn_ext_f16, F16 cache): q rounded to half,
    one pass over the keys with a running maximum, the weighted sum of values kept in half
    precision (rescaled when the maximum grows), divided by the sum of weights at the end.

    q [T, n_head*head_dim] for positions n_past..n_past+T-1; k_cache/v_cache [n_ctx, n_head_kv*
    head_dim] of one layer, already holding those positions. Query head h reads KV head
    h // (n_head/n_head_kv), as ggml's broadcast does. The (token, head) pairs are split over
    the threads, even one token's at the first position (a pair's job costs some 1 us before its
    first key, a parallel region 1-2 us: a 1.1B's 32 heads took 28 us serial at position 0 and
    70 at 16, 14.5 and 35 split). ggml's one-row kernel: `attend` runs it for batches of under
    FA_TILE_Q tokens, and decode calls it from compiled code, without the tiled kernel.
    """
    for job in prange(q.shape[0] * n_head):
        _attention_job(q, k_cache, v_cache, n_past, n_head, n_head_kv, head_dim, out, np.int64(job))


# ggml's CPU flash attention takes a tiled path when a batch holds at least this many query rows
# (GGML_FA_TILE_Q; the KV tiles are GGML_FA_TILE_KV = 64 long); fewer rows use `attention`
FA_TILE_Q = 64
FA_TILE_KV = 64


# `attention_tiled` takes a block of TILED_TOKENS tokens, with all the query heads of one KV head,
# through the KV tiles together, its rows (a token's head) TILED_ROWS at a time (_fma_4x4's
# four): each key and value loaded feeds four fma chains. Blocks start at positions that are
# multiples of TILED_TOKENS, so that a block's tokens have the same tiles. The scores are computed
# SCORE_SPAN keys at a time.
TILED_ROWS = 4
TILED_TOKENS = 4
SCORE_SPAN = 4 * FA_TILE_KV


@njit(cache=True)
def _fma_4x4(y, r, x, i0, x0, c, j0, n, n_steps):
    """Chains advanced by n_steps fmas each (n_steps a multiple of 4), in step order: for the
    rows y_k = y[r + k, :n] (k = 0..3) and each step st, y_k[e] = fma(c[r + k, j0 + st],
    x[i0 + st, x0 + e], y_k[e]). Four steps of the four rows per pass over the elements: each
    x row loaded once for the four rows, a chain's sum kept in a register across the four
    steps. The scores' and the values' fmas of `attention_tiled`, written once (a kernel of its
    own, called at both places: one compile)."""
    y0 = y[r][:n]
    y1 = y[r + 1][:n]
    y2 = y[r + 2][:n]
    y3 = y[r + 3][:n]
    for st in range(0, n_steps, 4):
        i = i0 + st
        j = j0 + st
        u0 = x[i][x0:x0 + n]
        u1 = x[i + 1][x0:x0 + n]
        u2 = x[i + 2][x0:x0 + n]
        u3 = x[i + 3][x0:x0 + n]
        a0 = c[r, j]
        a1 = c[r, j + 1]
        a2 = c[r, j + 2]
        a3 = c[r, j + 3]
        b0 = c[r + 1, j]
        b1 = c[r + 1, j + 1]
        b2 = c[r + 1, j + 2]
        b3 = c[r + 1, j + 3]
        d0 = c[r + 2, j]
        d1 = c[r + 2, j + 1]
        d2 = c[r + 2, j + 2]
        d3 = c[r + 2, j + 3]
        e0 = c[r + 3, j]
        e1 = c[r + 3, j + 1]
        e2 = c[r + 3, j + 2]
        e3 = c[r + 3, j + 3]
        for k in range(n):
            w0 = u0[k]
            w1 = u1[k]
            w2 = u2[k]
            w3 = u3[k]
            y0[k] = fmaf(a3, w3, fmaf(a2, w2, fmaf(a1, w1, fmaf(a0, w0, y0[k]))))
            y1[k] = fmaf(b3, w3, fmaf(b2, w2, fmaf(b1, w1, fmaf(b0, w0, y1[k]))))
            y2[k] = fmaf(d3, w3, fmaf(d2, w2, fmaf(d1, w1, fmaf(d0, w0, y2[k]))))
            y3[k] = fmaf(e3, w3, fmaf(e2, w2, fmaf(e1, w1, fmaf(e0, w0, y3[k]))))


@njit(cache=True)
def _attention_tiled_block(q, kt, v_cache, n_past, n_head, n_head_kv, head_dim, out, g, t0, n_t):
    """Tokens t0..t0+n_t-1 of `attention_tiled`, every query head that reads KV head g (the
    GQA group): their rows go through each KV tile together, the tile's keys and values
    loaded once for all of them, each row's arithmetic that of one row alone. Rows are taken
    token by token, head by head, and padded to a multiple of TILED_ROWS by repeating the
    last (which computes and writes the same floats twice). kt: KV head g's keys laid out
    dimension by dimension, zero-padded to a multiple of 4 dimensions. The loop body written
    once as a plain kernel (see _attention_job)."""
    group = n_head // n_head_kv
    scale = np.float32(1.0 / math.sqrt(head_dim))
    kv0 = g * head_dim
    n_real = n_t * group
    n_rows = -(-n_real // TILED_ROWS) * TILED_ROWS
    qs = np.empty((n_rows, kt.shape[0]), np.float32)
    acc = np.empty((n_rows, head_dim), np.float32)
    s = np.empty((n_rows, SCORE_SPAN), np.float32)
    m = np.empty(n_rows, np.float32)
    m_next = np.empty(n_rows, np.float32)
    total = np.empty(n_rows, np.float32)
    n_kv = np.empty(n_rows, np.int64)
    xs = np.empty(FA_TILE_KV, np.float32)
    mx = np.empty(FA_TILE_KV // 4, np.float32)
    for r in range(n_rows):
        rr = min(r, n_real - 1)
        t = t0 + rr // group
        h = g * group + rr % group
        n_kv[r] = n_past + t + 1
        qrow = q[t, h * head_dim:(h + 1) * head_dim]  # (row views: copies that vectorize)
        qsr = qs[r]
        accr = acc[r]
        for d in range(head_dim):
            qsr[d] = qrow[d]
            accr[d] = 0.0
        for d in range(head_dim, qs.shape[1]):
            qsr[d] = 0.0
        m[r] = -np.inf
        total[r] = 0.0
    hd4 = qs.shape[1]  # (head_dim rounded up to a multiple of 4)
    n_kv_max = n_past + t0 + n_t
    for ic0 in range(0, n_kv_max, SCORE_SPAN):
        # the scores of up to SCORE_SPAN keys: each (row, key) chain's fmas in dimension order,
        # the keys' rows (by dimension) in vector lanes
        n_span = min(SCORE_SPAN, -(-(n_kv_max - ic0) // FA_TILE_KV) * FA_TILE_KV)
        for r in range(n_rows):
            sr = s[r]
            for tk in range(n_span):
                sr[tk] = 0.0
        for r in range(0, n_rows, TILED_ROWS):  # (np.int64(0): the values' call's signature)
            _fma_4x4(s, r, kt, np.int64(0), ic0, qs, np.int64(0), n_span, hd4)
        for ic in range(ic0, ic0 + n_span, FA_TILE_KV):
            # each row's softmax step on its own, in two passes over the rows (a row's maximum is a
            # chain of compares: the rows' chains overlap); a row that has no key in this tile (the
            # block's last tile holds keys of its later tokens only) skips it
            n_common = FA_TILE_KV
            for r in range(n_rows):
                n_valid = min(FA_TILE_KV, n_kv[r] - ic)
                n_common = min(n_common, n_valid)
                if n_valid <= 0:
                    continue
                sr = s[r][ic - ic0:ic - ic0 + FA_TILE_KV]
                for tk in range(FA_TILE_KV):
                    sr[tk] = sr[tk] * scale if tk < n_valid else -np.inf  # masked (future or padding): weight 0
                # the tile's maximum through 16 running maxima (vector lanes; one chain of compares
                # would not vectorize): the same maximum in any order. (mx's length, not a constant,
                # bounds the loop: LLVM unrolls a constant 16 into scalar code before its vectorizer
                # sees the loop.)
                for j in range(mx.shape[0]):
                    mx[j] = max(max(max(sr[j], sr[16 + j]), sr[32 + j]), sr[48 + j])
                tile_max = mx[0]
                for j in range(1, 16):
                    tile_max = max(tile_max, mx[j])
                m_next[r] = max(m[r], tile_max)
            for r in range(n_rows):
                if n_kv[r] <= ic:
                    continue
                sr = s[r][ic - ic0:ic - ic0 + FA_TILE_KV]
                m_old = m[r]
                m_new = m_next[r]
                if m_new > m_old:
                    ms = np.float32(math.exp(np.float32(m_old - m_new)))  # libm expf
                    accr = acc[r]
                    for d in range(head_dim):
                        accr[d] *= ms
                    total[r] *= ms
                m[r] = m_new
                # sr = _ggml_expf(sr - m_new) in a vectorizable loop (2**n from its bits; a masked
                # weight is _ggml_expf(-inf) = 0), then ggml's slow path (|n| > 126: vanishing
                # weights, whose x is kept in xs, 0 for the others) one by one, if any
                for tk in range(FA_TILE_KV):
                    x = sr[tk] - m_new
                    n, b = _expf_reduce(x)
                    two_n = f32_from_bits(np.int32((np.int32(min(max(n, np.float32(-126.0)), np.float32(126.0))) + 127) << 23))
                    sr[tk] = np.float32(0.0) if x == -np.inf else fmaf(_expf_poly(b), two_n, two_n)
                    xs[tk] = x if not abs(n) <= 126.0 and x != -np.inf else np.float32(0.0)
                n_slow = 0
                for tk in range(FA_TILE_KV):
                    n_slow += 0 if xs[tk] == 0.0 else 1
                if n_slow > 0:
                    for tk in range(FA_TILE_KV):
                        if xs[tk] != 0.0:
                            sr[tk] = _ggml_expf(xs[tk])
                tile_sum = 0.0  # ggml_vec_soft_max_f32: AVX2 lanes of 8, hsum, summed in double
                for c in range(0, FA_TILE_KV, 8):
                    r0 = sr[c + 4] + sr[c + 0]
                    r1 = sr[c + 5] + sr[c + 1]
                    r2 = sr[c + 6] + sr[c + 2]
                    r3 = sr[c + 7] + sr[c + 3]
                    tile_sum += np.float64((r0 + r2) + (r1 + r3))
                total[r] = np.float32(np.float64(total[r]) + tile_sum)
            # the values in position order: the positions every row has, four rows together, then
            # each row's further positions
            n_c4 = max(n_common, 0) - max(n_common, 0) % 4
            o = ic - ic0
            for r in range(0, n_rows, TILED_ROWS):
                _fma_4x4(acc, r, v_cache, ic, kv0, s, o, head_dim, n_c4)
            for r in range(n_rows):
                accr = acc[r]
                sr = s[r][ic - ic0:ic - ic0 + FA_TILE_KV]
                for tk in range(n_c4, min(FA_TILE_KV, n_kv[r] - ic)):
                    p = sr[tk]
                    vrow = v_cache[ic + tk, kv0:kv0 + head_dim]
                    for d in range(head_dim):
                        accr[d] = fmaf(p, vrow[d], accr[d])
    for r in range(n_rows):
        rr = min(r, n_real - 1)
        t = t0 + rr // group
        h = g * group + rr % group
        inv = np.float32(1.0) / total[r]
        orow = out[t, h * head_dim:(h + 1) * head_dim]
        accr = acc[r]
        for d in range(head_dim):
            orow[d] = accr[d] * inv



@njit(cache=True, parallel=True)
def attention_tiled(q, k_cache, v_cache, n_past, n_head, n_head_kv, head_dim, out):
    """Causal attention as ggml_compute_forward_flash_attn_ext_tiled computes it (batches of
    >= FA_TILE_Q tokens, F16 cache): q stays float32; per KV tile of 64 positions the scores
    are fma chains over the head dimension (simd_gemm) times the scale, the running maximum
    moves to the tile's maximum (accumulator and sum rescaled by expf(old - new)), the
    weights are ggml_v_expf(s - max) summed 8 lanes at a time into a double added to the
    float sum, and the values are accumulated in float32 by fma in position order. Same
    arguments as `attention`. (The keys are first laid out dimension by dimension, so that a
    tile's chains advance together in vector lanes: each chain is still the same sequence of
    fmas. Blocks of TILED_TOKENS tokens with the heads of one KV head go through the tiles
    together: _attention_tiled_block. The layout is made on one thread: a small serial step,
    and one parallel region fewer to compile.)"""
    n_tok = q.shape[0]
    n_all = n_past + n_tok
    n_pad = -(-n_all // FA_TILE_KV) * FA_TILE_KV
    # the keys laid out dimension by dimension, zeros past the last position and for the dimensions
    # up to a multiple of 4 (that a chain's steps go four at a time): a chain's fma of a zero key
    # and a zero query adds +0, which at most turns a score of -0 into +0, the same weights
    kt = np.empty((n_head_kv, -(-head_dim // 4) * 4, n_pad), np.float32)
    for g in range(n_head_kv):
        for d in range(kt.shape[1]):
            ktr = kt[g, d]
            j0 = 0
            if d < head_dim:
                for j in range(n_all):
                    ktr[j] = k_cache[j, g * head_dim + d]
                j0 = n_all
            for j in range(j0, n_pad):
                ktr[j] = 0.0
    # token blocks: the first ends at the first position that is a multiple of TILED_TOKENS
    first = TILED_TOKENS - n_past % TILED_TOKENS
    n_blocks = 1 + -(-max(n_tok - first, 0) // TILED_TOKENS)
    for i in prange(n_blocks * n_head_kv):
        # blocks taken from both ends in turn: a thread's contiguous share then holds short and
        # long rows of the causal triangle alike
        j = i // n_head_kv
        b = j // 2 if j % 2 == 0 else n_blocks - 1 - j // 2
        t0 = 0 if b == 0 else first + (b - 1) * TILED_TOKENS
        t1 = min(first + b * TILED_TOKENS, n_tok)
        g = i % n_head_kv
        _attention_tiled_block(q, kt[g], v_cache, n_past, n_head, n_head_kv, head_dim, out, np.int64(g), np.int64(t0),
                               np.int64(t1 - t0))


def attend(q, k_cache, v_cache, n_past, n_head, n_head_kv, head_dim, out):
    """Attention of q's T tokens, the kernel chosen as llama.cpp's CPU flash attention chooses:
    ggml's tiled kernel for batches of FA_TILE_Q tokens or more, else its one-row kernel
    (`attention`). Every caller - prompts, decode, perplexity - comes through here, decode
    (always one token) straight to `attention` from compiled code. Same arguments as
    `attention`. (So a token's attention is the same bits in any batch of under FA_TILE_Q
    tokens; batches of FA_TILE_Q or more follow llama.cpp into the tiled kernel's other
    arithmetic.)"""
    if q.shape[0] >= FA_TILE_Q:
        attention_tiled(q, k_cache, v_cache, n_past, n_head, n_head_kv, head_dim, out)
    else:
        attention(q, k_cache, v_cache, n_past, n_head, n_head_kv, head_dim, out)


def embed(cfg, w, tokens: np.ndarray) -> np.ndarray:
    """The token embedding rows of tokens [T] as float32 [T, n_embd]."""
    return dequantize_rows(w.token_embd.rows[tokens], w.token_embd.ggml_type, cfg.n_embd)


def forward(cfg, w, cache, tokens: np.ndarray, want_all: bool, hidden: bool = False) -> np.ndarray:
    """Run tokens [T] at positions cache.n_past.. through the model (config cfg, weights w),
    append them to the KV cache and return the logits of the last token [n_vocab] (or of all
    tokens [T, n_vocab]); hidden: the final-norm hidden states instead of logits (embeddings,
    llama.cpp's result_norm). Changes nothing but the cache. The layers are `layer_steps`, run
    as Python: each step one kernel over all the tokens."""
    n_tok = len(tokens)
    pos0 = cache.n_past
    rope = Rope(*rope_tables(np.arange(pos0, pos0 + n_tok), cfg))
    dims = Dims.of(cfg)
    x = embed(cfg, w, tokens)  # (a new array: the residual sums go into it)
    o = np.empty((0, cfg.n_embd), np.float32)  # the output to add before a norm (none before the first)
    buf = PromptBuffers(np.empty_like(x), np.empty((n_tok, cfg.n_head * cfg.head_dim), np.float32))
    for il, layer in enumerate(w.layers):
        o = layer_steps(x, o, layer, KV(cache.k[il], cache.v[il]), pos0, rope, dims, buf)
    cache.n_past = pos0 + n_tok

    rows = slice(None) if want_all else slice(n_tok - 1, None)  # (views: the last row alone when only it is wanted)
    x, o, h = x[rows], o[rows], buf.h[rows]
    act = Activations.empty(len(x), cfg.n_embd, -1 if hidden else w.output.act_mode)
    add_norm_rows(x, o, w.output_norm, dims.eps, act.mode, h, act.xq, act.xd, act.xs, act.xhat)
    if hidden:
        return h if want_all else h[0]
    logits = matmul(w.output, act)  # (one row: its one-token kernel, compile_shared_kernels')
    return logits if want_all else logits[0]


@njit(cache=True, inline="always")
def _ggml_expf(x):
    """ggml_v_expf (AVX2), the exp ggml's SiLU uses: ARM's optimized-routines expf (1.5 ulp),
    replayed in float32 step by step (2**n built directly: the bit tricks give exactly that).
    Constants: 0x1.715476p+0, 0x1.8p23, 0x1.62e4p-1, 0x1.7f7d1cp-20, 0x1.0e4020p-7,
    0x1.573e2ep-5, 0x1.555e66p-3, 0x1.fffdb6p-2, 0x1.ffffecp-1."""
    n, b = _expf_reduce(x)
    if abs(n) > 126.0:  # ggml's slow path (over/underflow); here the exact value is as good
        return np.float32(math.exp(x))
    k = np.float32(math.ldexp(1.0, int(n)))
    j = _expf_poly(b)
    return fmaf(j, k, k)


@njit(cache=True, inline="always")
def _expf_poly(b):
    """_ggml_expf's polynomial on the reduced argument b: exp(b) - 1 before scaling by 2**n."""
    u = np.float32(b * b)
    return fmaf(fmaf(fmaf(np.float32(0.008247390389442444), b, np.float32(0.04189976677298546)), u,
                     fmaf(np.float32(0.16668395698070526), b, np.float32(0.4999912679195404))),
                u, np.float32(np.float32(0.9999994039535522) * b))


@njit(cache=True, inline="always")
def _expf_reduce(x):
    """_ggml_expf's first steps: n = round(x*log2(e)) and the reduced argument b."""
    z = fmaf(x, np.float32(1.4426950216293335), np.float32(12582912.0))  # x*log2(e) + 0x1.8p23
    n = np.float32(z - np.float32(12582912.0))
    b = fmaf(-n, np.float32(1.428606765330187e-06), fmaf(-n, np.float32(0.693145751953125), x))
    return n, b


@njit(cache=True)
def _silu_mul(gate, up, out):
    """SwiGLU as ggml_vec_swiglu_f32: x / (1 + expf(-x)) * up, in float32, with expf =
    _ggml_expf. Written as branch-free loops that LLVM vectorizes (2**n built from its bits in
    a scratch array); the few |x| > 87 (where ggml takes its slow path) are redone one by one."""
    size = gate.shape[0]
    kbits = np.empty(size, np.int32)
    k = kbits.view(np.float32)
    for i in range(size):
        n, _ = _expf_reduce(-gate[i])
        kbits[i] = (np.int32(min(max(n, np.float32(-126.0)), np.float32(126.0))) + 127) << 23
    poly = np.empty(size, np.float32)  # separate loops: each one vectorizes
    for i in range(size):
        _, b = _expf_reduce(-gate[i])
        poly[i] = _expf_poly(b)
    for i in range(size):
        out[i] = (gate[i] / (np.float32(1.0) + fmaf(poly[i], k[i], k[i]))) * up[i]
    for i in range(size):
        g = gate[i]
        if abs(g) > np.float32(87.0):
            out[i] = (g / (np.float32(1.0) + _ggml_expf(-g))) * up[i]


@njit(cache=True, parallel=True)
def _silu_mul_rows(gate, up, out):
    """_silu_mul on [T, n_ff] arrays, the tokens split over threads (prompt batches): the same
    float32 steps in one loop per token, 2**n made from its bits by a bitcast (here, inside the
    parallel loop, LLVM vectorizes that loop; _silu_mul's own loops are what it vectorizes there)."""
    for t in prange(gate.shape[0]):
        g, u, o = gate[t], up[t], out[t]
        for i in range(g.shape[0]):
            n, b = _expf_reduce(-g[i])
            k = f32_from_bits(np.int32((np.int32(min(max(n, np.float32(-126.0)), np.float32(126.0))) + 127) << 23))
            o[i] = (g[i] / (np.float32(1.0) + fmaf(_expf_poly(b), k, k))) * u[i]
        for i in range(g.shape[0]):
            if abs(g[i]) > np.float32(87.0):
                o[i] = (g[i] / (np.float32(1.0) + _ggml_expf(-g[i]))) * u[i]


# --- the arguments of a layer, grouped -----------------------------------------------------------
# (NamedTuples: numba compiles a function of them once for every model)

class Dims(NamedTuple):
    """The model's sizes a layer needs (ModelConfig's, as numba takes them)."""
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    eps: np.float32

    @staticmethod
    def of(cfg) -> "Dims":
        return Dims(cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_rot, np.float32(cfg.rms_eps))


class Rope(NamedTuple):
    """cos and sin [T, n_rot/2] of the tokens' positions (rope_tables)."""
    cos: np.ndarray
    sin: np.ndarray


class KV(NamedTuple):
    """Keys and values of the cache: of one layer [n_ctx, kv_dim] or of all [n_layer, n_ctx, kv_dim]."""
    k: np.ndarray
    v: np.ndarray


class Layer(NamedTuple):
    """One layer's decode arrays. Grouping is a parameter: qkv holds three matrices, q, k and v,
    or q, k and v stacked in the first place; gate_up two (or both stacked in the first); wo and
    down one each. types: four int64 arrays, the kernel code of each matrix of qkv, wo, gate_up,
    down, -1 for a place a stacked matrix covers (its matrix is not read). The tuples' lengths never
    change, so neither does the numba type: one compile for every model."""
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    qkv: tuple
    wo: tuple
    gate_up: tuple
    down: tuple
    types: tuple


class Head(NamedTuple):
    """The final norm and output matrix as matvec_fused takes it, and its kernel code in an int64
    array [1] (-1: it has no fused kernel, the output product is left to `matmul`)."""
    norm: np.ndarray
    rows: np.ndarray
    types: np.ndarray


class LayerStack(NamedTuple):
    """Every layer's matrices when all layers are grouped alike: qkv, wo, gate_up, down each one
    array [n_layer, rows, row bytes], the norms [n_layer, n_embd]; types as Layer's."""
    qkv: np.ndarray
    wo: np.ndarray
    gate_up: np.ndarray
    down: np.ndarray
    types: tuple
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    head: Head


@njit(cache=True)
def _project(mats, types, x, ctx, out):
    """out[0] = the products of the first len(types) matrices of mats (one matrix, or several
    whose outputs lie side by side) with x[0], x rounded once per activation format. mats is
    always a 3-tuple (callers repeat a matrix to fill it), so this compiles once, not once per
    tuple length (a second of a cold start each)."""
    n = x.shape[1]
    xq = np.empty((1, n), np.int8)
    xd = np.empty((1, n // 32), np.float32)
    xs = np.empty((1, n // 32), np.float32)
    xhat = np.empty((1, n), np.float32)
    mode = -1
    start = 0
    for i in range(len(types)):
        t = types[i]
        if t < 0:  # covered by a stacked matrix
            continue
        if act_mode_of(t) != mode:
            mode = act_mode_of(t)
            quantize_activations(x, mode, xq, xd, xs, xhat)
        rows = mats[i].shape[0]
        matvec_fused(t, mats[i], ctx, xq[0], xd[0], xs[0], xhat[0], out[0, start:start + rows])
        start += rows


# --- one layer, written once -------------------------------------------------------------------
# `layer_steps` is a layer of the module docstring, one line a step. A prompt runs it as Python
# (`forward`): each step below is one kernel over all the tokens, the tokens split over threads.
# A decode step runs the same code compiled (`decode_layer`), each step bound to its one-token
# implementation (the _one function under it; `_ONE_TOKEN`), all inlined into one compiled call,
# so a token costs no Python-level call per step. Both give each token the same floats (one
# arithmetic: tests/test_batch_invariance).

ATTENTION, FEED_FORWARD = 0, 1  # add_norm's norm: the layer's first or its second


def layer_steps(x, o, layer, kv, pos, rope, dims, ctx):
    """One layer for the tokens of x [T, n_embd] at positions pos.. (x: the residual stream,
    updated in place; o: the previous layer's output, not yet added to x, no rows before the
    first layer; kv: the layer's cache, appended to); returns the layer's output, for the next
    add_norm. layer: a LayerWeights (Python) or a Layer (compiled); ctx: compiled, the products'
    KernelContext; in Python, a prompt's PromptBuffers (each matrix has its kernel context there)."""
    # attention
    h = add_norm(x, o, layer, ATTENTION, dims, ctx)  # x += o;  h = rmsnorm(x) * attn_norm
    q, k, v = project_qkv(layer, h, dims, ctx)  # h @ Wq, h @ Wk, h @ Wv
    rope_store(q, k, v, rope, kv, pos, dims)  # rotate q and k by their positions; append k, v to the cache
    att = attend_cache(q, kv, pos, dims, ctx)  # softmax(q k^T / sqrt(head_dim), causal) v, over the cache
    o = project_out(layer, att, ctx)  # att @ Wo
    # feed-forward (SwiGLU)
    h = add_norm(x, o, layer, FEED_FORWARD, dims, ctx)  # x += o;  h = rmsnorm(x) * ffn_norm
    gate, up = project_gate_up(layer, h, ctx)  # h @ Wgate, h @ Wup
    return project_down(layer, silu_mul(gate, up), ctx)  # (silu(gate) * up) @ Wdown


# The steps for a batch (Python: each one kernel over the tokens), each followed by its
# one-token implementation (compiled; inline="always": numba inlines it where it is called, as
# it does the layer, so neither compiles on its own).

class PromptBuffers(NamedTuple):
    """A prompt's rows that every layer reuses: the normed rows and attention's output (arrays
    made anew at each step are fresh pages, which the kernels then fault in one by one)."""
    h: np.ndarray
    att: np.ndarray


def add_norm(x, o, layer, which, dims, buf):
    """x += o (when o has rows), then the normed rows h = rmsnorm(x) * the layer's norm
    (which: ATTENTION or FEED_FORWARD), with h rounded to the activation format of the first
    product that reads it: (h, Activations); h is buf.h."""
    first, norm = (layer.wq, layer.attn_norm) if which == ATTENTION else (layer.w_gate, layer.ffn_norm)
    act = Activations.empty(x.shape[0], x.shape[1], first.act_mode)
    h = buf.h
    add_norm_rows(x, o, norm, dims.eps, act.mode, h, act.xq, act.xd, act.xs, act.xhat)
    return h, act


@njit(inline="always")
def _add_rows(x, o):
    """x += o, row by row (o with no rows: nothing to add). Loops: a slice assignment compiles
    numba's shape-mismatch message."""
    for t in range(o.shape[0]):
        for i in range(x.shape[1]):
            x[t, i] += o[t, i]


@njit(inline="always")
def _add_norm_one(x, o, layer, which, dims, ctx):  # h only: _project rounds it for each product
    _add_rows(x, o)
    h = np.empty_like(x)
    _rmsnorm(x, (layer.attn_norm, layer.ffn_norm)[which], dims.eps, h)  # (ATTENTION 0, FEED_FORWARD 1)
    return h


def _reuse_or_round(h, act, w):
    """The Activations of h for w: act when w reads act's format, else h rounded to w's."""
    return act if w.act_mode == act.mode else quantize_for(h, w)


def project_qkv(layer, h, dims, ctx):
    h, act = h
    return (matmul(layer.wq, act, batch_one=True), matmul(layer.wk, _reuse_or_round(h, act, layer.wk), batch_one=True),
            matmul(layer.wv, _reuse_or_round(h, act, layer.wv), batch_one=True))


@njit(inline="always")
def _project_qkv_one(layer, h, dims, ctx):  # the three products in one call (stacked, when the layer is grouped)
    q_dim = dims.n_head * dims.head_dim
    kv_dim = dims.n_head_kv * dims.head_dim
    qkv = np.empty((1, q_dim + 2 * kv_dim), np.float32)
    _project(layer.qkv, layer.types[0], h, ctx, qkv)
    # q and k copied out of qkv: contiguous, as a prompt's are, so that RoPE and attention are
    # the same compiled kernels for both (a slice's type would compile each of them again)
    q = np.empty((1, q_dim), np.float32)
    k = np.empty((1, kv_dim), np.float32)
    v = np.empty((1, kv_dim), np.float32)
    for i in range(q_dim):
        q[0, i] = qkv[0, i]
    for i in range(kv_dim):
        k[0, i] = qkv[0, q_dim + i]
        v[0, i] = qkv[0, q_dim + kv_dim + i]
    return q, k, v


def rope_store(q, k, v, rope, kv, pos, dims):
    rope_store_rows(q, k, v, rope.cos, rope.sin, dims.n_head, dims.n_head_kv, dims.head_dim, dims.n_rot, kv.k, kv.v, pos)


@njit(inline="always")
def _rope_store_one(q, k, v, rope, kv, pos, dims):
    apply_rope(q, dims.n_head, dims.head_dim, dims.n_rot, rope.cos, rope.sin)
    apply_rope(k, dims.n_head_kv, dims.head_dim, dims.n_rot, rope.cos, rope.sin)
    tmp = np.empty(k.shape[1], np.float32)  # the cache holds half floats: rounded as a prompt's rows are
    for t in range(k.shape[0]):
        round_row_to_half(k[t], kv.k[pos + t], tmp)
        round_row_to_half(v[t], kv.v[pos + t], tmp)


def attend_cache(q, kv, pos, dims, buf):
    attend(q, kv.k, kv.v, pos, dims.n_head, dims.n_head_kv, dims.head_dim, buf.att)
    return buf.att


@njit(inline="always")
def _attend_cache_one(q, kv, pos, dims, ctx):  # fewer than FA_TILE_Q tokens: attend's choice, without the tiled kernel
    out = np.empty((q.shape[0], dims.n_head * dims.head_dim), np.float32)
    attention(q, kv.k, kv.v, pos, dims.n_head, dims.n_head_kv, dims.head_dim, out)
    return out


def project_out(layer, att, ctx):
    return matmul(layer.wo, att, batch_one=True)


@njit(inline="always")
def _project_one(w, types, x, ctx):
    """x [1, n_in] @ w (one matrix, its kernel code in types) as a new [1, rows] array."""
    out = np.empty((1, w.shape[0]), np.float32)
    _project((w, w, w), types, x, ctx, out)
    return out


@njit(inline="always")
def _project_out_one(layer, att, ctx):
    return _project_one(layer.wo[0], layer.types[1], att, ctx)


def project_gate_up(layer, h, ctx):
    h, act = h
    return matmul(layer.w_gate, act, batch_one=True), matmul(layer.w_up, _reuse_or_round(h, act, layer.w_up), batch_one=True)


@njit(inline="always")
def _project_gate_up_one(layer, h, ctx):  # both products in one call (stacked, when the layer is grouped); gate, up: token 0's rows
    n_ff = 0
    for i in range(len(layer.gate_up)):
        if layer.types[2][i] >= 0:
            n_ff += layer.gate_up[i].shape[0]
    n_ff //= 2
    gu = np.empty((1, 2 * n_ff), np.float32)
    _project((layer.gate_up[0], layer.gate_up[1], layer.gate_up[1]), layer.types[2], h, ctx, gu)
    return gu[0, :n_ff], gu[0, n_ff:]


def silu_mul(gate, up):
    out = np.empty_like(gate)
    _silu_mul_rows(gate, up, out)
    return out


@njit(inline="always")
def _silu_mul_one(gate, up):
    out = np.empty((1, gate.shape[0]), np.float32)
    _silu_mul(gate, up, out[0])
    return out


def project_down(layer, a, ctx):
    return matmul(layer.w_down, a, batch_one=True)


@njit(inline="always")
def _project_down_one(layer, a, ctx):
    return _project_one(layer.down[0], layer.types[3], a, ctx)


# decode_layer's layer: layer_steps' own code with each step bound to its one-token version
# (numba inlines it and them into decode_layer, as it inlines any inline="always" function: no
# compile of their own)
_ONE_TOKEN = dict(add_norm=_add_norm_one, project_qkv=_project_qkv_one, rope_store=_rope_store_one,
                  attend_cache=_attend_cache_one, project_out=_project_out_one, project_gate_up=_project_gate_up_one,
                  silu_mul=_silu_mul_one, project_down=_project_down_one)
_compiled_layer_steps = njit(inline="always")(
    FunctionType(layer_steps.__code__, {**globals(), **_ONE_TOKEN}, "layer_steps"))


@njit(cache=True)
def decode_layer(x, o, layer, kv, pos, rope, dims, table, isa, kernels):
    """layer_steps compiled, for one token at position pos (x, o [1, n_embd]; layer: a Layer;
    kv: the layer's cache): the one-token implementation of each step. table, isa, kernels:
    the kernels' KernelContext, taken apart (numba's dispatcher types an array, an Isa and a
    KernelSet without Python code, a KernelContext only with it: tens of microseconds a call)."""
    return _compiled_layer_steps(x, o, layer, kv, pos, rope, dims, KernelContext(table, isa, kernels))


@njit(cache=True)
def decode_all_layers(x, o, st, kv, pos, rope, dims, table, isa, kernels, logits):
    """decode_layer for every layer of a LayerStack (kv: the whole cache; a stack may hold no
    layer, see head_stack), o added to x (the output of the layer before these, or of the last
    one: no rows when there was none), then the final norm and the output product into logits
    [1, n_vocab] (unless its kernel code is -1)."""
    for il in range(st.qkv.shape[0]):
        qkv, gate_up = st.qkv[il], st.gate_up[il]
        layer = Layer(st.attn_norm[il], st.ffn_norm[il], (qkv, qkv, qkv), (st.wo[il],), (gate_up, gate_up),
                      (st.down[il],), st.types)
        o = decode_layer(x, o, layer, KV(kv.k[il], kv.v[il]), pos, rope, dims, table, isa, kernels)
    _add_rows(x, o)
    if st.head.types[0] >= 0:
        xn = np.empty_like(x)
        _rmsnorm(x, st.head.norm, dims.eps, xn)
        _project((st.head.rows, st.head.rows, st.head.rows), st.head.types, xn, KernelContext(table, isa, kernels), logits)


def head_stack(weights) -> LayerStack:
    """A LayerStack of no layers holding the output norm and matrix: what decode_all_layers runs
    after a model whose layers are decoded one call each (unlike layers, no stack)."""
    out_w = weights.output
    if out_w.ggml_type in FUSED_TYPES and out_w.n_in % 32 == 0:
        head = Head(weights.output_norm, read_only_view(np.ascontiguousarray(out_w.rows)), np.array([out_w.kernel], np.int64))
    else:
        head = Head(weights.output_norm, read_only_view(np.zeros((1, 1), np.uint8)), np.array([-1], np.int64))
    none = read_only_view(np.empty((0, 1, 1), np.uint8))
    norms = np.empty((0, len(weights.output_norm)), np.float32)
    return LayerStack(none, none, none, none, tuple(np.full(n, -1, np.int64) for n in (3, 1, 2, 1)), norms, norms, head)


def decode_token(cfg, weights, fused, st, ctx, cache, token: int) -> np.ndarray:
    """One token at position cache.n_past, logits [n_vocab]: the layers one compiled call each
    (fused: per layer (kind, (qkv, wo, gate_up, down), types), from runtime.model.loading.fused_layers)
    unless they are in the LayerStack st; then decode_all_layers runs st's layers (every layer,
    or none: head_stack) and the output product; ctx: the model's decode_context (only its
    kernels are compiled into matvec_fused). Changes nothing but the cache."""
    pos = cache.n_past
    rope = Rope(*rope_tables(np.array([pos]), cfg))
    dims = Dims.of(cfg)
    x = embed(cfg, weights, np.array([token]))
    o = np.empty((0, cfg.n_embd), np.float32)
    table, isa, kernels = ctx
    if st.qkv.shape[0] == 0:
        for il, (_, mats, types) in enumerate(fused):
            layer = weights.layers[il]
            o = decode_layer(x, o, Layer(layer.attn_norm, layer.ffn_norm, *mats, types), KV(cache.k[il], cache.v[il]),
                             pos, rope, dims, table, isa, kernels)
    logits = np.empty((1, cfg.n_vocab), np.float32)
    decode_all_layers(x, o, st, KV(cache.k, cache.v), pos, rope, dims, table, isa, kernels, logits)
    cache.n_past = pos + 1
    if st.head.types[0] >= 0:
        return logits[0]
    return matmul(weights.output, rmsnorm(x, weights.output_norm, cfg.rms_eps))[0]


def rerotate_keys(cfg, cache, start: int, end: int, delta: int) -> None:
    """Add delta to the positions of cached keys [start, end) of every layer (context shift):
    rotating an already rotated key by delta is rotating the original by pos + delta."""
    if end <= start or delta == 0:
        return
    cos, sin = rope_tables(np.full(end - start, delta), cfg)
    for il in range(cfg.n_layer):
        k = cache.k[il, start:end].copy()
        apply_rope(k, cfg.n_head_kv, cfg.head_dim, cfg.n_rot, cos, sin)
        cache.k[il, start:end] = k.astype(np.float16)


def compile_shared_kernels(cfg, weights) -> None:
    """Run once, on tiny arrays, the kernels that prompts and decode share (attention's one-row
    half; the RoPE tables, the embedding rows of this model's format, the output product of
    one row, as a prompt's last row takes it), with the argument
    types the forward pass gives them, so that they are compiled (or read from numba's cache)
    now: a cold start's warm-up does this first, then lets tui/compile_ahead's helper, which
    compiles decode, read them from the cache."""
    q = np.zeros((1, 32), np.float32)
    kv = np.zeros((2, 32), np.float32)
    attention(q, kv, kv, 0, 1, 1, 32, np.empty_like(q))
    rope_tables(np.array([0]), cfg)
    embed(cfg, weights, np.array([0]))
    matmul(weights.output, Activations.empty(1, cfg.n_embd, weights.output.act_mode))  # a prompt's last row


def compile_prompt_passes(cfg, weights, cache) -> None:
    """Like compile_shared_kernels, a prompt's per-token passes (`forward`'s add_norm_rows,
    rope_store_rows and SwiGLU, and the activations' rounding of a product's input), run on
    two tokens with the argument types `forward` gives them (this model's norms and cache rows:
    the cache's first two positions are overwritten). tui/compile_ahead's helper runs this
    while the caller compiles the shared kernels, then the caller's first prompt reads them
    from numba's cache."""
    n, hd = 2, cfg.head_dim
    layer = weights.layers[0]
    x = np.zeros((n, cfg.n_embd), np.float32)
    h = np.empty_like(x)
    act = Activations.empty(n, cfg.n_embd, layer.wq.act_mode)
    add_norm_rows(x, np.empty((0, cfg.n_embd), np.float32), layer.attn_norm, np.float32(cfg.rms_eps), act.mode, h,
                  act.xq, act.xd, act.xs, act.xhat)
    quantize_for(h, layer.wo)
    cos, sin = rope_tables(np.arange(n), cfg)
    q = np.zeros((n, cfg.n_head * hd), np.float32)
    k = np.zeros((n, cfg.n_head_kv * hd), np.float32)
    rope_store_rows(q, k, k.copy(), cos, sin, cfg.n_head, cfg.n_head_kv, hd, cfg.n_rot, cache.k[0], cache.v[0], 0)
    gate = np.zeros((n, 32), np.float32)
    _silu_mul_rows(gate, gate, np.empty_like(gate))


def compile_products(weights, part: int, parts: int = 2) -> None:
    """Like compile_shared_kernels, the batch products of a prompt, or the `part`-th of `parts`
    shares of them (each share whole batch kernels: all of one kernel's layouts, so that two
    processes never add entries to one kernel's cache index at once, where numba would keep only
    one of them): on two tokens, through `matmul` as `forward` calls it. The shares are made the
    same way in every process from the model alone (the costlier kernels first, each to the
    share with least, the first share taking ties; a kernel's cost: its layouts' compile_cost),
    so tui/compile_ahead's helper and its caller can each compile one."""
    groups: dict = {}
    for layer in weights.layers:
        for w in layer.matrices:
            tr = w.traits
            if tr.batch is not None and w.n_out % tr.batch_rows == 0:
                kernel = getattr(tr.batch, "func", tr.batch)  # (a partial's function)
                kernel = getattr(kernel, "py_func", kernel)  # (a numba kernel's Python function)
                # one cache index per code object: the formats' closures of one shared driver
                # (ksearch.format_function: kbatch.batch_products, block32.min_products) are one kernel
                code = kernel.__code__
                key = f"{code.co_filename}:{code.co_firstlineno}:{kernel.__qualname__}"
                groups.setdefault(key, {}).setdefault((w.ggml_type, w.packed), w)
    cost = {key: sum(w.traits.compile_cost for w in group.values()) for key, group in groups.items()}
    loads = [0.0] * parts
    for key in sorted(groups, key=lambda k: (-cost[k], k)):
        share = loads.index(min(loads))
        loads[share] += cost[key]
        if share == part:
            for w in groups[key].values():
                matmul(w, Activations.empty(2, w.n_in, w.act_mode))


def compile_decode_kernels(weights, ctx) -> None:
    """Like compile_shared_kernels, the kernels only decode calls: SwiGLU of one row and, when
    the model decodes in compiled code (ctx: its decode context, else None), `_project` with
    each one-token kernel of its layers and output (on the first matrix of each, with the
    argument types decode_layer gives it, so that its compile then finds them done).
    tui/compile_ahead's helper runs this while the caller compiles the shared kernels."""
    x = np.zeros(32, np.float32)
    _silu_mul(x, x, np.empty_like(x))
    if ctx is None:
        return
    seen = set()
    for w in [*(w for layer in weights.layers for w in layer.matrices), weights.output]:
        k = w.kernel if w.ggml_type in FUSED_TYPES else -1
        if k < 0 or k in seen or w.n_in % 32:
            continue
        seen.add(k)
        rows = read_only_view(w.rows)
        _project((rows, rows, rows), np.array([k], np.int64), np.zeros((1, w.n_in), np.float32), ctx,
                 np.empty((1, rows.shape[0]), np.float32))
