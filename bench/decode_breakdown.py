#!/usr/bin/env python3
"""Where a decoded token's time goes, at 1 thread and at -t threads:

    python bench/decode_breakdown.py MODEL.gguf [-t 2] [-r 3]

- token: `Llama.eval` of one token at a time (as `llamachat bench`'s tg), best of -r runs of 16;
- products: the same weight products alone, in decode order, each layer's in one compiled call
  (no Python between them but one call per layer, as decode_token makes for models without a
  LayerStack); `rest` = token - products: attention, norms, the activations' rounding, RoPE,
  SwiGLU and the Python around decode;
- read: a plain parallel sum over the same arrays, one region each: how fast this machine reads
  the weights with decode's regions and no arithmetic (the products' practical ceiling);
- probe: `llamachat bench`'s bandwidth (a parallel sum over 1 GiB), and one empty parallel
  region's cost (numba's fork-join).
Models whose every matrix has a one-token kernel only (runtime.model.loading.fused_layers).
Run it on a quiet machine (`vmstat 1`: another process on one of 2 cores makes every parallel
region wait for a time slice, and the figures mean nothing).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    args = ap.parse_args(argv)

    from llamachat.runtime import apply_thread_env

    apply_thread_env()  # as the llamachat command runs
    import numba
    from numba import njit, prange

    from llamachat.runtime.generation.bench import measure_bandwidth
    from llamachat.runtime.model.forward import Layer, _project
    from llamachat.runtime.model.model import load_model
    from llamachat.runtime.quants.matmul import KernelContext

    @njit
    def layer_products(layer, xe, xf, table, isa, kernels, o_qkv, o_wo, o_gu, o_down):
        ctx = KernelContext(table, isa, kernels)
        _project(layer.qkv, layer.types[0], xe, ctx, o_qkv)
        _project((layer.wo[0], layer.wo[0], layer.wo[0]), layer.types[1], xe, ctx, o_wo)
        _project((layer.gate_up[0], layer.gate_up[1], layer.gate_up[1]), layer.types[2], xe, ctx, o_gu)
        _project((layer.down[0], layer.down[0], layer.down[0]), layer.types[3], xf, ctx, o_down)

    @njit(parallel=True)
    def read_sum(a):
        total = np.uint64(0)
        for i in prange(a.shape[0]):
            total += a[i]
        return total

    @njit(parallel=True)
    def empty_region(a):
        for i in prange(a.shape[0]):
            a[i] += 1.0

    @njit
    def regions(a, n):
        for _ in range(n):
            empty_region(a)

    m = load_model(args.model, n_ctx=64, n_threads=args.threads)
    if m.fused is None:
        print("this model decodes through the batch forward pass (a matrix without a one-token kernel)")
        return 1
    cfg = m.config
    table, isa, kernels = m.decode_context
    st = m._decode_stack
    layers = [Layer(w.attn_norm, w.ffn_norm, *parts, types) for w, (_, parts, types) in zip(m.weights.layers, m.fused)]
    rng = np.random.default_rng(0)
    xe = rng.standard_normal((1, cfg.n_embd)).astype(np.float32)
    xf = rng.standard_normal((1, cfg.n_ff)).astype(np.float32)
    q_kv = cfg.n_head * cfg.head_dim + 2 * cfg.n_head_kv * cfg.head_dim
    outs = [np.empty((1, n), np.float32) for n in (q_kv, cfg.n_embd, 2 * cfg.n_ff, cfg.n_embd)]
    head = st.head.rows
    o_head = np.empty((1, head.shape[0]), np.float32)
    arrays = []  # every matrix a token reads, as 8-byte words (each stacked one once)
    for layer in layers:
        for group, types in zip((layer.qkv, layer.wo, layer.gate_up, layer.down), layer.types):
            arrays += [group[i].reshape(-1).view(np.uint64) for i in range(len(types)) if types[i] >= 0]
    if st.head.types[0] >= 0:
        arrays.append(np.ascontiguousarray(head).reshape(-1).view(np.uint64))
    n_bytes = sum(a.nbytes for a in arrays)

    def products():
        t0 = time.perf_counter()
        for layer in layers:
            layer_products(layer, xe, xf, table, isa, kernels, *outs)
        if st.head.types[0] >= 0:
            _project((head, head, head), st.head.types, xe, KernelContext(table, isa, kernels), o_head)
        return time.perf_counter() - t0

    def reads():
        t0 = time.perf_counter()
        for a in arrays:
            read_sum(a)
        return time.perf_counter() - t0

    def tokens(n=16):
        m.truncate(0)
        m.eval([1])
        t0 = time.perf_counter()
        for i in range(n):
            m.eval([2 + i])
        return (time.perf_counter() - t0) / n

    cell = np.zeros(2)
    for n_threads in sorted({1, args.threads}):
        m.set_threads(n_threads)
        products(), reads(), tokens(2), regions(cell, 10)  # compiled and warm
        t_tok = min(tokens() for _ in range(args.repetitions))
        t_prod = min(products() for _ in range(args.repetitions))
        t_read = min(reads() for _ in range(args.repetitions))
        t0 = time.perf_counter()
        regions(cell, 10000)
        t_region = (time.perf_counter() - t0) / 10000
        probe = measure_bandwidth()
        print(f"{n_threads} thread(s): token {t_tok * 1e3:.2f} ms = products {t_prod * 1e3:.2f} ms "
              f"({n_bytes / t_prod / 1e9:.1f} GB/s) + rest {(t_tok - t_prod) * 1e3:.2f} ms; "
              f"a plain read of the same {len(arrays)} arrays {t_read * 1e3:.2f} ms ({n_bytes / t_read / 1e9:.1f} GB/s); "
              f"probe {probe / 1e9:.1f} GB/s; an empty parallel region {t_region * 1e6:.2f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
