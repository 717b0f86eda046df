"""The attention key/value cache of one sequence: keys (already rotated by RoPE) and values of
every position processed so far, per layer.

Stored as float32 holding half-float values: llama.cpp keeps its cache in F16, so every value
written is rounded to half precision first and attention sees the numbers llama.cpp sees. The
forward pass writes the rows itself, rounding as it goes (runtime.model.forward's
rope_store_rows for a batch, decode_layer for one token). The
arrays are allocated zeroed (np.zeros: pages are only touched when written), so a large n_ctx
costs memory only as it fills.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, n_layer: int, n_ctx: int, kv_dim: int):
        self.n_layer = n_layer
        self.n_ctx = n_ctx
        self.kv_dim = kv_dim
        self.k = np.zeros((n_layer, n_ctx, kv_dim), np.float32)
        self.v = np.zeros((n_layer, n_ctx, kv_dim), np.float32)
        self.n_past = 0  # positions 0..n_past-1 hold valid entries

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def truncate(self, n: int) -> None:
        self.n_past = max(0, min(int(n), self.n_past))

    def remove(self, start: int, count: int) -> None:
        """Drop positions [start, start+count) and move the later ones down by count (their
        keys still carry the old rotation: the caller re-rotates them)."""
        end = self.n_past
        self.k[:, start:end - count] = self.k[:, start + count:end]
        self.v[:, start:end - count] = self.v[:, start + count:end]
        self.n_past = end - count

    def rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of positions 0..n-1 of every layer [n_layer, n, kv_dim] (views)."""
        return self.k[:, :n], self.v[:, :n]

    def set_rows(self, k: np.ndarray, v: np.ndarray) -> None:
        """Make positions 0..n-1 hold k, v [n_layer, n, kv_dim] (saved half-float rows) and
        forget the rest."""
        n = k.shape[1]
        self.k[:, :n] = k
        self.v[:, :n] = v
        self.n_past = n
