"""What model loading does to the weights before any token is computed: matrices the decode
kernels read 8 rows at a time are repacked (`repack`, `pack_x8`), the matrices of a layer that
one product can cover are stacked into one array (q/k/v, gate/up), and the memory-map pages
under every copied matrix are released so nothing is held twice.

    fused, stack = fused_layers(weights)   # rewrites `weights` in place; run once, by load_model

The forward pass (runtime/model/forward.py) only reads what this leaves behind.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .forward import Head, LayerStack
from ..quants.matmul import FUSED_TYPES, pack_x8, repack, repackable
from ..quants import available_cores, read_only_view


def _release_pages(a: np.ndarray) -> None:
    """Drop the memory-map pages under `a` from this process (MADV_DONTNEED: clean file pages,
    read again from the file if ever touched), so a weight held as a stacked copy is not also
    counted in memory as its mapped original. Whole pages inside `a` only."""
    import ctypes
    import mmap

    if not hasattr(mmap, "MADV_DONTNEED") or a.base is None:
        return
    page = mmap.PAGESIZE
    start = -(-a.ctypes.data // page) * page
    end = (a.ctypes.data + a.nbytes) // page * page
    if end > start:
        try:
            ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
        except (OSError, AttributeError):
            pass


def _repack_alone(w) -> None:
    """Repack one matrix into a new array, its file pages released."""
    mapped = w.rows
    repack(w)
    _release_pages(mapped)


def _copy_alone(w) -> None:
    """Move a matrix the decode kernels read from the memory map into an array of its own, its
    file pages released (no more memory held). The map's pages are 4 KiB, while numpy asks for
    2 MiB pages (transparent huge pages, where the kernel has them) for an array this large, and
    the one-token kernels stream those faster: Q6_K's, from a 1.1B model's output matrix, about
    13% faster on one thread."""
    mapped = w.rows
    w.rows = np.array(mapped)
    _release_pages(mapped)


_HUGE_PAGE = 2 << 20


def _arena(shapes) -> list[np.ndarray]:
    """One uint8 array per shape, all carved from one buffer that starts on a 2 MiB boundary,
    each at a 4 KiB-aligned offset. numpy asks the kernel for 2 MiB pages (transparent huge pages,
    madvise) only inside the 2 MiB-aligned part of an allocation of 4 MiB or more: a matrix of
    its own (a mixed-format model's lone q or wo, 2.4 MB in a 1.1B model) sat on 4 KiB pages,
    and the edges of every larger one too. On 4 KiB pages a matrix streams slower (a 1.1B
    Q4_K_M file's wo matrices were read at 11 GB/s on one thread, its output matrix, on 2 MiB
    pages, at 16.6). In one buffer they all sit on 2 MiB pages, where the kernel has them."""
    page = 4096
    sizes = [int(np.prod(s)) for s in shapes]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // page) * page
    buf = np.empty(total + _HUGE_PAGE, np.uint8)
    start = -buf.ctypes.data % _HUGE_PAGE
    return [buf[start + o:start + o + n].reshape(s) for o, n, s in zip(offsets, sizes, shapes)]


def _repack_each(weights) -> None:
    """Every repackable matrix (`repackable`: the layers' Q4_0 and Q4_1 with rows a multiple of 8,
    and an untied output), each into its own array: for models decoded by `forward`."""
    for layer in weights.layers:
        for w in layer.matrices:
            if repackable(w):
                _repack_alone(w)
    if weights.output is not weights.token_embd and repackable(weights.output):
        _repack_alone(weights.output)


def fused_layers(weights) -> tuple[list | None, LayerStack | None]:
    """Per layer what decode_token needs: (kind, (qkv, wo, gate_up, down), types) as
    runtime.model.forward.Layer takes them. "grouped" when q/k/v share a format and gate/up share one:
    qkv and gate_up each one stacked matrix; else "plain": qkv the 3 matrices and gate_up the 2.
    Every matrix decode reads, the output one too, is a copy made once at load, its file pages
    released (the model's size, 66 MB for SmolLM2 Q4_1), on 2 MiB pages (_arena). Either
    way qkv holds 3 matrices and gate_up 2 (a stacked one repeated, its repeats' kernel numbers
    -1), so every layer of every model has one numba type and decode_layer compiles once. None
    if some matrix has no fused kernel (or the shapes do not suit it): those decode via
    `forward`. Weights whose rows were copied read the copy from then on (their file pages
    released), so nothing is held twice. When every layer is grouped with the same formats and
    shapes (any llama GGUF quantized to one type), the copies are written straight into the
    arrays of a LayerStack (the per-layer entries are views of them), so decode_all_layers
    takes a whole token in one compiled call; else the stack is None."""
    out_w = weights.output
    plan = []
    for layer in weights.layers:
        ws = layer.matrices
        if any(w.ggml_type not in FUSED_TYPES or w.n_in % 32 for w in ws):
            _repack_each(weights)
            return None, None
        types = [int(w.ggml_type) for w in ws]
        if types[0] == types[1] == types[2] and types[4] == types[5]:
            plan.append(((layer.wq, layer.wk, layer.wv), (layer.wo,), (layer.w_gate, layer.w_up), (layer.w_down,)))
        else:
            plan.append(None)

    def shape(groups):  # formats and matrix shapes of a grouped layer
        return tuple((int(g[0].ggml_type), sum(w.n_out for w in g), g[0].rows.shape[1]) for g in groups)

    # per layer its groups of matrices copied side by side (a grouped layer's 4, else its 7 one by one)
    groups_of = [plan[il] or tuple((w,) for w in layer.matrices) for il, layer in enumerate(weights.layers)]
    stacks = None
    if all(p is not None for p in plan) and len({shape(p) for p in plan}) == 1:
        stacks = tuple(_arena([(len(plan), n_out, row_bytes) for _, n_out, row_bytes in shape(plan[0])]))
        places = [[s[il] for s in stacks] for il in range(len(plan))]
    else:  # every copy in one arena (on 2 MiB pages), in order: layer by layer, group by group
        flat = iter(_arena([(sum(w.n_out for w in g), g[0].rows.shape[1]) for gs in groups_of for g in gs]))
        places = [[next(flat) for _ in gs] for gs in groups_of]

    def layer_entry(il):
        groups = groups_of[il]
        mats = []
        for ws_i, m in zip(groups, places[il]):
            packed = all(repackable(w) for w in ws_i)
            start = 0
            for w in ws_i:  # each matrix from the map straight into its place: one copy
                view = m[start:start + w.n_out]
                start += w.n_out
                if packed:  # (8-row groups never straddle two matrices: each has a multiple of 8 rows)
                    pack_x8(w.rows, w.ggml_type, out=view)
                else:
                    view[...] = w.rows
                _release_pages(w.rows)
                w.rows = view  # every product reads the copy
                w.packed = packed
            m = read_only_view(m)  # one array type for every matrix (the memory map's is read-only): one compile
            mats.append(m)
        kernels = [g[0].kernel for g in groups]
        if len(groups) == 4:  # grouped: one matrix stands in for the other places, which are marked -1
            parts = ((mats[0],) * 3, (mats[1],), (mats[2],) * 2, (mats[3],))
            kernels = [kernels[0], -1, -1, kernels[1], kernels[2], -1, kernels[3]]
        else:
            parts = (tuple(mats[0:3]), (mats[3],), tuple(mats[4:6]), (mats[6],))
        types = tuple(np.array(kernels[a:b], np.int64) for a, b in ((0, 3), (3, 4), (4, 6), (6, 7)))
        return "grouped" if len(groups) == 4 else "plain", parts, types

    # the layers on several threads (at most 4: the copies are bound by memory, not arithmetic):
    # the copies are numpy's and the page releases ctypes', both without the GIL, and each layer
    # writes its own slices of the stacks and its own weights
    with ThreadPoolExecutor(max_workers=min(4, available_cores())) as pool:
        out = list(pool.map(layer_entry, range(len(plan))))
    if out_w is not weights.token_embd and repackable(out_w):
        _repack_alone(out_w)
    elif out_w.ggml_type in FUSED_TYPES and out_w.n_in % 32 == 0 and not out_w.packed:
        _copy_alone(out_w)  # (tied: the token embeddings too, whose rows embed then reads from the copy)
    if stacks is None:
        return out, None
    if out_w.ggml_type in FUSED_TYPES and out_w.n_in % 32 == 0:
        head = Head(weights.output_norm, read_only_view(np.ascontiguousarray(out_w.rows)), np.array([out_w.kernel], np.int64))
    else:
        head = Head(weights.output_norm, read_only_view(np.zeros((1, 1), np.uint8)), np.array([-1], np.int64))
    norms = [np.stack([getattr(layer, name) for layer in weights.layers]).astype(np.float32)
             for name in ("attn_norm", "ffn_norm")]
    return out, LayerStack(*(read_only_view(a) for a in stacks), out[0][2], *norms, head)


