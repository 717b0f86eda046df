"""A saved evaluation state: the tokens in a model's KV cache and their keys and values, as
bytes (`Llama.save_state().llama_state`) or as a file (`Llama.save_state_file`, the app's
instant resume), so a long prompt is not processed again.

Layout (little-endian):

    magic     8 bytes  b"LLCKVST\\0"
    length    u32      of the header that follows
    header    JSON     what the rows depend on (below), the shapes, a CRC-32 of the payload;
                       padded with spaces to end at a multiple of 64 bytes
    payload   tokens   int32[n_tokens]
              logits   float32[n_vocab] of the last token, when known (`has_logits`)
              keys     float16[n_layer, n_tokens, kv_dim]   only the used rows
              values   float16[n_layer, n_tokens, kv_dim]

The cache holds half-float values (runtime/model/kv_cache.py), so float16 rows give back the very
bits: logits after a load equal those after processing the prompt again. The rows are valid
only for the weights, context and arithmetic that made them; the header names them and a
state whose dependencies differ from the model it is loaded into is refused with
`StateMismatch` (one sentence saying what changed), never used:

- the model file: its size, modification time and a SHA-256 of its header and tensor index
  plus samples of its tensor data (a file replaced by another of the same size and metadata
  still differs there);
- n_ctx, the cache's type (f16), the layer count and row width;
- the engine: the package version and a digest of the engine's source files, so any change
  to the arithmetic (a release or a local edit) invalidates old states;
- FORMAT_VERSION, this layout.

Files are written atomically (a temp file in the same folder, fsync, os.replace): a crash
leaves the old file or none, never a half-written one; a damaged file fails its length or
CRC check and is refused (`StateError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic_file import atomic_output
from ..errors import UserError

MAGIC = b"LLCKVST\0"
FORMAT_VERSION = 1
KV_TYPE = "f16"
MAX_HEADER_BYTES = 1 << 16  # ours are a few hundred bytes; anything longer is not one of ours
_SAMPLE_BYTES = 1 << 16  # of tensor data hashed at each end of the data section


class StateError(UserError):
    """A state that cannot be read: not a state, damaged, or cut short."""


class StateMismatch(StateError):
    """A readable state made for another model, context or engine: it must be rebuilt."""


# -- what a state depends on ------------------------------------------------------------------

_engine_version: str | None = None


def engine_version() -> str:
    """The package version and a digest of every source file of the engine (runtime/ and its
    subfolders): states made by other code are not trusted to hold the same numbers."""
    global _engine_version
    if _engine_version is None:
        try:
            from importlib.metadata import version

            package = version("llamachat")
        except Exception:  # noqa: BLE001 - running from a source tree without metadata
            package = "unknown"
        digest = hashlib.sha256()
        root = Path(__file__).resolve().parents[1]  # llamachat.runtime's folder
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = Path(folder) / name
                digest.update(str(path.relative_to(root)).encode() + b"\0")
                digest.update(path.read_bytes())
        _engine_version = f"{package}+{digest.hexdigest()[:16]}"
    return _engine_version


_identities: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_identity(model) -> dict:
    """Size, modification time and a digest of the loaded file (computed once per model)."""
    known = _identities.get(model)
    if known is not None:
        return known
    g = model.gguf
    path = Path(g.path)
    st = os.stat(path)
    digest = hashlib.sha256()
    # the file as mapped (what the weights were read from), not whatever the path holds now
    buf = g._buffer()
    data_offset = int(g.data_offset)
    digest.update(bytes(buf[:data_offset]))
    digest.update(bytes(buf[data_offset:data_offset + _SAMPLE_BYTES]))
    digest.update(bytes(buf[max(data_offset, len(buf) - _SAMPLE_BYTES):]))
    identity = {"file": path.name, "size": int(g.file_size), "mtime_ns": int(st.st_mtime_ns),
                "sha256": digest.hexdigest()}
    _identities[model] = identity
    return identity


def dependencies(model) -> dict:
    """Everything the saved rows depend on, as the header records it."""
    cache = model.cache
    return {"format": FORMAT_VERSION, "engine": engine_version(), "model": model_identity(model),
            "n_ctx": int(model.n_ctx), "kv_type": KV_TYPE, "n_layer": int(cache.n_layer),
            "kv_dim": int(cache.kv_dim), "n_vocab": int(model.config.n_vocab)}


def _differences(saved: dict, now: dict) -> list[str]:
    out = []
    if saved.get("format") != now["format"]:
        out.append(f"its format is {saved.get('format')!r}, this llamachat writes {now['format']}")
    if saved.get("engine") != now["engine"]:
        out.append(f"it was made by engine {saved.get('engine')!r}, this is {now['engine']}")
    model, then = now["model"], saved.get("model")
    then = then if isinstance(then, dict) else {}
    if then.get("sha256") != model["sha256"] or then.get("size") != model["size"]:
        out.append(f"the model file is not the same ({then.get('file')!r} then, {model['file']!r} now)")
    elif then.get("mtime_ns") != model["mtime_ns"]:
        out.append(f"the model file {model['file']!r} was modified since")
    for key, what in (("n_ctx", "n_ctx"), ("kv_type", "KV cache type"), ("n_layer", "layer count"),
                      ("kv_dim", "KV row width"), ("n_vocab", "vocabulary size")):
        if saved.get(key) != now[key]:
            out.append(f"{what} was {saved.get(key)!r}, now {now[key]!r}")
    return out


# -- bytes ------------------------------------------------------------------------------------

def encode(model, tokens: Sequence[int], logits: np.ndarray | None = None) -> bytes:
    """The state of `model`'s cache holding `tokens` (its first len(tokens) positions)."""
    n = len(tokens)
    cache = model.cache
    if n > cache.n_past:
        raise ValueError(f"{n} tokens given but the cache holds {cache.n_past}")
    k, v = cache.rows(n)
    parts = [np.asarray(tokens, dtype="<i4").tobytes()]
    if logits is not None:
        parts.append(np.asarray(logits, dtype="<f4").reshape(-1).tobytes())
    parts += [k.astype("<f2").tobytes(), v.astype("<f2").tobytes()]
    payload = b"".join(parts)
    header = dict(dependencies(model), n_tokens=n, has_logits=logits is not None,
                  payload_bytes=len(payload), crc32=zlib.crc32(payload))
    head = json.dumps(header, sort_keys=True).encode()
    # spaces after the JSON put the rows at a multiple of 64 bytes, so numpy reads them as
    # aligned half floats (its unaligned conversion is somewhat slower)
    head += b" " * (-(len(MAGIC) + 4 + len(head)) % 64)
    return MAGIC + struct.pack("<I", len(head)) + head + payload


@dataclass
class SavedState:
    """A state's header and payload, checked against a model by `check`, applied by `load_into`."""

    header: dict
    payload: memoryview
    where: str  # for messages: the file, or "the state"

    @property
    def n_tokens(self) -> int:
        return int(self.header["n_tokens"])

    @property
    def tokens(self) -> list[int]:
        return np.frombuffer(self.payload, dtype="<i4", count=self.n_tokens).tolist()

    def check(self, model) -> None:
        """StateMismatch (what changed) unless the rows were made for this model as it is."""
        check_header(self.header, model, self.where)

    def load_into(self, model) -> tuple[list[int], np.ndarray | None]:
        """Check, then put the rows into model's cache (positions 0..n-1, the rest forgotten);
        the tokens and the last token's logits (None if not saved)."""
        self.check(model)
        h, n = self.header, self.n_tokens
        n_layer, kv_dim, n_vocab = int(h["n_layer"]), int(h["kv_dim"]), int(h["n_vocab"])
        if n > model.n_ctx:
            raise StateMismatch(f"{self.where} holds {n} tokens, more than n_ctx = {model.n_ctx}")
        offset = 4 * n
        logits = None
        if h["has_logits"]:
            logits = np.frombuffer(self.payload, dtype="<f4", count=n_vocab, offset=offset).astype(np.float32)
            offset += 4 * n_vocab
        rows = n_layer * n * kv_dim
        k = np.frombuffer(self.payload, dtype="<f2", count=rows, offset=offset).reshape(n_layer, n, kv_dim)
        v = np.frombuffer(self.payload, dtype="<f2", count=rows, offset=offset + 2 * rows).reshape(n_layer, n, kv_dim)
        model.cache.set_rows(k, v)
        return self.tokens, logits


def decode(data: bytes | memoryview, where: str = "the state") -> SavedState:
    """Parse and verify a state's bytes (StateError if they are not a whole, intact state)."""
    data = memoryview(data)
    if len(data) < len(MAGIC) + 4 or bytes(data[:len(MAGIC)]) != MAGIC:
        raise StateError(f"{where} is not a llamachat state")
    (length,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if length > MAX_HEADER_BYTES or start + length > len(data):
        raise StateError(f"{where} is damaged (its header is cut short)")
    try:
        header = json.loads(bytes(data[start:start + length]))
    except (ValueError, UnicodeDecodeError):
        raise StateError(f"{where} is damaged (its header is not readable)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        found = header.get("format") if isinstance(header, dict) else None
        raise StateMismatch(f"{where} has format {found!r}; this llamachat reads {FORMAT_VERSION}; it has to be rebuilt")
    payload = data[start + length:]
    try:
        n, n_layer, kv_dim, n_vocab = (int(header[k]) for k in ("n_tokens", "n_layer", "kv_dim", "n_vocab"))
        expected = 4 * n + (4 * n_vocab if header["has_logits"] else 0) + 2 * 2 * n_layer * n * kv_dim
        crc = int(header["crc32"])
    except (KeyError, TypeError, ValueError):
        raise StateError(f"{where} is damaged (its header lacks a field)") from None
    if min(n, n_layer, kv_dim, n_vocab) < 0 or expected != len(payload) or header.get("payload_bytes") != len(payload):
        raise StateError(f"{where} is damaged ({len(payload)} bytes of data where {expected} belong)")
    if zlib.crc32(payload) != crc:
        raise StateError(f"{where} is damaged (its checksum does not match)")
    return SavedState(header, payload, where)


# -- files ------------------------------------------------------------------------------------

def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` all at once (atomic_output), readable by this user only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, mode=0o600) as f:
        f.write(data)


def read_file(path: str | os.PathLike, model=None) -> SavedState:
    """The state in `path`, verified (StateError; OSError if it cannot be read at all). With
    `model`, a state made for another model, context or engine is refused (StateMismatch)
    from its header, before its rows are read."""
    path = Path(path)
    where = f"saved state {path}"
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 4)
        if len(head) < len(MAGIC) + 4 or head[:len(MAGIC)] != MAGIC:
            raise StateError(f"{where} is not a llamachat state")
        (length,) = struct.unpack("<I", head[len(MAGIC):])
        if length > MAX_HEADER_BYTES:
            raise StateError(f"{where} is damaged (its header is cut short)")
        raw = f.read(length)
        if model is not None:
            try:
                header = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise StateError(f"{where} is damaged (its header is not readable)") from None
            if not isinstance(header, dict):
                raise StateError(f"{where} is damaged (its header is not readable)")
            check_header(header, model, where)
        data = head + raw + f.read()
    return decode(data, where=where)


def check_header(header: dict, model, where: str) -> None:
    """StateMismatch unless a header's dependencies are this model's (before reading rows)."""
    diffs = _differences(header, dependencies(model))
    if diffs:
        raise StateMismatch(f"{where} cannot be used: {'; '.join(diffs)}; it has to be rebuilt")
