"""Builds GGUF files byte by byte for the tests, including broken ones.

`RawGGUF` is deliberately not the project's writer: every field (magic, version, counts,
key bytes, value types, dims, tensor types, offsets) can be set to anything, so a test can
make exactly one thing wrong. `build()` also records where each length/count field sits, so
the fuzz test can aim at them. `MALFORMED` is the corpus: (case id, builder, exact reason).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from gguf.constants import GGMLQuantizationType as T
from gguf.constants import GGUFValueType as V

U64_MAX = (1 << 64) - 1


def s(b: str | bytes) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


@dataclass
class KV:
    key: bytes
    vtype: int
    payload: bytes  # the encoded value (after the u32 type)


def kv_u32(key, v, vtype=V.UINT32):
    return KV(key.encode() if isinstance(key, str) else key, int(vtype), struct.pack("<I", v))


def kv_str(key, text, vtype=V.STRING):
    return KV(key.encode() if isinstance(key, str) else key, int(vtype), s(text))


def kv_arr(key, etype, items: list, count: int | None = None):
    if etype == V.STRING:
        body = b"".join(s(x) for x in items)
    else:
        fmt = {V.INT32: "<i", V.FLOAT32: "<f", V.UINT8: "<B", V.BOOL: "<B", V.UINT64: "<Q"}[etype]
        body = b"".join(struct.pack(fmt, x) for x in items)
    n = len(items) if count is None else count
    return KV(key.encode(), int(V.ARRAY), struct.pack("<IQ", int(etype), n) + body)


@dataclass
class Tensor:
    name: bytes
    dims: list[int]
    ggml_type: int
    offset: int | None = None  # None: packed after the previous one, aligned
    n_dims: int | None = None  # None: len(dims)
    name_len: int | None = None  # None: len(name)


def _nbytes(t: Tensor) -> int:
    from gguf.constants import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[T(t.ggml_type)]
    n = 1
    for d in t.dims:
        n *= d
    return n // block * size


@dataclass
class RawGGUF:
    magic: bytes = b"GGUF"
    version: int = 3
    n_tensors: int | None = None
    n_kv: int | None = None
    kvs: list[KV] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    alignment: int = 32
    truncate: int | None = None  # keep this many bytes; negative: drop that many from the end
    fields: list[tuple[int, int]] = field(default_factory=list)  # (position, size) of counts/lengths

    def build(self) -> bytes:
        out = bytearray(self.magic + struct.pack("<I", self.version))
        self.fields = [(4, 4)]

        def count(v: int):
            self.fields.append((len(out), 8))
            out.extend(struct.pack("<Q", v))

        count(len(self.tensors) if self.n_tensors is None else self.n_tensors)
        count(len(self.kvs) if self.n_kv is None else self.n_kv)
        for kv in self.kvs:
            self.fields.append((len(out), 8))
            out += s(kv.key)
            self.fields.append((len(out), 4))
            out += struct.pack("<I", kv.vtype)
            if kv.vtype in (V.STRING, V.ARRAY):
                self.fields.append((len(out) + (4 if kv.vtype == V.ARRAY else 0), 8))
            out += kv.payload
        offset = 0
        sizes = []
        for t in self.tensors:
            nb = _nbytes(t) if t.ggml_type in set(int(x) for x in T) and all(d >= 0 for d in t.dims) and len(t.dims) <= 4 else 0
            nb = nb if nb < 1 << 24 else 0  # absurd shapes (the overflow cases) get no data
            off = offset if t.offset is None else t.offset
            if off < 1 << 24:  # absurd offsets (the past-EOF cases) point at nothing written
                sizes.append((off, nb))
            offset = off + -(-nb // self.alignment) * self.alignment
            self.fields.append((len(out), 8))
            out += struct.pack("<Q", len(t.name) if t.name_len is None else t.name_len) + t.name
            self.fields.append((len(out), 4))
            out += struct.pack("<I", len(t.dims) if t.n_dims is None else t.n_dims)
            for d in t.dims:
                self.fields.append((len(out), 8))
                out += struct.pack("<q", d)
            self.fields.append((len(out), 4))
            out += struct.pack("<I", t.ggml_type)
            self.fields.append((len(out), 8))
            out += struct.pack("<Q", off)
        if self.tensors:
            out += b"\0" * (-len(out) % self.alignment)
            start = len(out)
            end = max((o + n for o, n in sizes), default=0)
            data = bytearray(end)
            for i, (o, n) in enumerate(sizes):
                data[o : o + n] = bytes((i * 7 + j) % 251 for j in range(min(n, 4096))) + bytes(max(0, n - 4096))
            out += data
            out += b"\0" * (-(len(out) - start) % self.alignment)
        if self.truncate is not None:
            out = out[: self.truncate]
        return bytes(out)


def valid_base() -> RawGGUF:
    """A small valid file: a few keys of each kind and three tensors of different types."""
    return RawGGUF(
        kvs=[
            kv_str("general.architecture", "llama"),
            kv_str("general.name", "tiny test"),
            kv_u32("llama.context_length", 64),
            kv_u32("llama.embedding_length", 32),
            kv_arr("tokenizer.ggml.tokens", V.STRING, ["<s>", "</s>", "a", "b"]),
            kv_arr("tokenizer.ggml.scores", V.FLOAT32, [0.0, 0.0, -1.0, -2.0]),
        ],
        tensors=[
            Tensor(b"token_embd.weight", [32, 4], T.F32),
            Tensor(b"blk.0.attn_q.weight", [32, 32], T.Q8_0),
            Tensor(b"output_norm.weight", [32], T.F16),
        ],
    )


def _with(**changes) -> Callable[[], bytes]:
    def make() -> bytes:
        g = valid_base()
        for k, v in changes.items():
            setattr(g, k, v)
        return g.build()

    return make


def _edit(fn: Callable[[RawGGUF], None]) -> Callable[[], bytes]:
    def make() -> bytes:
        g = valid_base()
        fn(g)
        return g.build()

    return make


def _add_kv(kv: KV, first=False):
    return _edit(lambda g: g.kvs.insert(0, kv) if first else g.kvs.append(kv))


def _tensor(i: int, **changes):
    def fn(g: RawGGUF):
        for k, v in changes.items():
            setattr(g.tensors[i], k, v)

    return _edit(fn)


def _valid_size() -> int:
    return len(valid_base().build())


def _header_end() -> int:
    """Where the tensor infos of the base file end (before the data padding)."""
    g = valid_base()
    g.build()
    last_pos, last_size = g.fields[-1]
    return last_pos + last_size


def _only_kvs(*kvs: KV, truncate=None) -> Callable[[], bytes]:
    return lambda: RawGGUF(kvs=list(kvs), truncate=truncate).build()


_SIZE = _valid_size()
_HEADER_END = _header_end()

# (case id, builder, exact reason in "PATH: not a valid GGUF file: REASON")
MALFORMED: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty-file", lambda: b"", "the file is 0 bytes long, too short for a GGUF header (24 bytes)"),
    ("shorter-than-header", lambda: b"GGUF\x03\0\0\0\0\0", "the file is 10 bytes long, too short for a GGUF header (24 bytes)"),
    ("bad-magic", _with(magic=b"GGML"), "it does not start with the GGUF magic (found b'GGML', expected b'GGUF')"),
    ("text-file", lambda: b"this is a plain text file, not a model\n", "it does not start with the GGUF magic (found b'this', expected b'GGUF')"),
    ("version-0", _with(version=0), "unsupported GGUF version 0 (only versions 2 and 3)"),
    ("version-1", _with(version=1), "GGUF version 1 is not supported (only versions 2 and 3)"),
    ("version-4", _with(version=4), "unsupported GGUF version 4 (only versions 2 and 3)"),
    ("version-byte-swapped", _with(version=0x03000000), "version 50331648 looks like version 3 byte-swapped: probably a big-endian GGUF file, and only little-endian files are supported"),
    ("tensor-count-2^62", _with(n_tensors=1 << 62), f"the header claims {1 << 62} tensors and 6 metadata keys, more than the file's {_SIZE} bytes can hold"),
    ("kv-count-2^62", _with(n_kv=1 << 62), f"the header claims 3 tensors and {1 << 62} metadata keys, more than the file's {_SIZE} bytes can hold"),
    ("kv-count-u64-max", _with(n_kv=U64_MAX), f"the header claims 3 tensors and {U64_MAX} metadata keys, more than the file's {_SIZE} bytes can hold"),
    ("tensor-count-too-many-for-file", _with(n_tensors=1000), f"the header claims 1000 tensors and 6 metadata keys, more than the file's {_SIZE} bytes can hold"),
    # the 7th key is read from the first tensor info, and the tensor infos from what follows
    ("kv-count-one-too-many", _with(n_kv=7), "the name of tensor #0 has length 1125899906842624, more than the 1806 bytes left in the file"),
    ("key-length-past-eof", lambda: b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40) + b"abcd" + b"\0" * 10,
     f"metadata key #0 has length {1 << 40}, more than the 14 bytes left in the file"),
    ("key-empty", _add_kv(kv_u32(b"", 1), first=True), "metadata key #0 is empty"),
    ("key-not-utf8", _add_kv(kv_u32(b"general.\xff\xfe", 1), first=True), "metadata key #0 (b'general.\\xff\\xfe') is not valid UTF-8"),
    ("key-duplicate", _add_kv(kv_str("general.name", "again")), "duplicate metadata key 'general.name'"),
    ("value-type-unknown", _add_kv(KV(b"general.odd", 13, b"\0" * 8)), "key 'general.odd' has unknown value type 13"),
    ("value-type-u32-max", _add_kv(KV(b"general.odd", 0xFFFFFFFF, b"\0" * 8)), "key 'general.odd' has unknown value type 4294967295"),
    ("array-of-arrays", _add_kv(KV(b"general.nested", int(V.ARRAY), struct.pack("<IQ", int(V.ARRAY), 1) + struct.pack("<IQ", int(V.UINT8), 1) + b"\1")),
     "key 'general.nested' is an array of arrays, which GGUF does not allow"),
    ("array-element-type-unknown", _add_kv(KV(b"general.arr", int(V.ARRAY), struct.pack("<IQ", 77, 1) + b"\0" * 8)), "key 'general.arr' is an array of unknown value type 77"),
    ("array-count-past-eof", _only_kvs(kv_arr("general.arr", V.INT32, [1, 2], count=1 << 61)), f"key 'general.arr' claims {1 << 61} INT32 items, more than the 8 bytes left in the file"),
    ("string-array-count-past-eof", _only_kvs(kv_arr("general.strs", V.STRING, ["a"], count=1 << 62)), f"key 'general.strs' claims {1 << 62} strings, more than the 9 bytes left in the file"),
    ("string-in-array-too-long", _only_kvs(KV(b"general.strs", int(V.ARRAY), struct.pack("<IQ", int(V.STRING), 2) + s("ok") + struct.pack("<Q", 99) + b"abc")),
     "string #1 of key 'general.strs' has length 99, more than the 3 bytes left in the file"),
    ("string-array-truncated", _only_kvs(KV(b"general.strs", int(V.ARRAY), struct.pack("<IQ", int(V.STRING), 3) + s("okokokokokokok") + s("k") + b"\0\0")),
     "string #2 of key 'general.strs' runs past the end of the file at byte 93 (truncated?)"),
    ("string-value-too-long", _only_kvs(KV(b"general.name", int(V.STRING), struct.pack("<Q", U64_MAX) + b"abc")),
     f"the value of key 'general.name' has length {U64_MAX}, more than the 3 bytes left in the file"),
    ("scalar-value-truncated", _only_kvs(KV(b"general.big", int(V.UINT64), b"\1\2\3")),
     "the value of key 'general.big' runs past the end of the file at byte 50 (truncated?)"),
    ("truncated-in-kv-section", _with(truncate=200), "metadata key #4 has length 21, more than the 8 bytes left in the file"),
    ("alignment-wrong-type", _add_kv(KV(b"general.alignment", int(V.UINT64), struct.pack("<Q", 32))), "general.alignment must be a UINT32, not UINT64"),
    ("alignment-signed", _add_kv(kv_u32("general.alignment", 32, vtype=V.INT32)), "general.alignment must be a UINT32, not INT32"),
    ("alignment-zero", _add_kv(kv_u32("general.alignment", 0)), "general.alignment 0 is not a non-zero power of two"),
    ("alignment-not-power-of-two", _add_kv(kv_u32("general.alignment", 48)), "general.alignment 48 is not a non-zero power of two"),
    ("alignment-over-1MiB", _add_kv(kv_u32("general.alignment", 1 << 21)), "general.alignment 2097152 is larger than 1 MiB"),
    ("tensor-name-empty", _tensor(1, name=b""), "tensor #1 has an empty name"),
    ("tensor-name-64-bytes", _tensor(0, name=b"t" * 64), f"tensor name {'t' * 64!r}... is 64 bytes long (at most 63)"),
    ("tensor-name-not-utf8", _tensor(2, name=b"output\xc3("), "the name of tensor #2 (b'output\\xc3(') is not valid UTF-8"),
    ("tensor-name-duplicate", _tensor(2, name=b"token_embd.weight"), "duplicate tensor name 'token_embd.weight'"),
    ("tensor-name-length-past-eof", _tensor(2, name_len=1 << 50), "the name of tensor #2 has length 1125899906842624, more than the 1721 bytes left in the file"),
    ("tensor-5-dims", _tensor(1, dims=[32, 1, 1, 1, 1]), "tensor 'blk.0.attn_q.weight' has 5 dimensions (at most 4)"),
    ("tensor-n-dims-huge", _tensor(0, n_dims=0xFFFFFFFF), "tensor 'token_embd.weight' has 4294967295 dimensions (at most 4)"),
    ("tensor-negative-dim", _tensor(0, dims=[32, -4]), "tensor 'token_embd.weight' has a negative dimension (-4) in shape [32, -4]"),
    ("tensor-elements-overflow", _tensor(0, dims=[1 << 32, 1 << 31]), f"tensor 'token_embd.weight' has shape [{1 << 32}, {1 << 31}]: {1 << 63} elements overflow int64"),
    ("tensor-type-removed-q4_2", _tensor(1, ggml_type=4), "tensor 'blk.0.attn_q.weight' has unknown ggml type 4"),
    ("tensor-type-unknown", _tensor(1, ggml_type=1000), "tensor 'blk.0.attn_q.weight' has unknown ggml type 1000"),
    ("tensor-row-not-block-multiple", _tensor(1, dims=[33, 32]), "tensor 'blk.0.attn_q.weight' of type Q8_0 has a row length 33 that is not a multiple of the block size 32"),
    ("tensor-offset-unaligned", _tensor(1, offset=144), "tensor 'blk.0.attn_q.weight' data offset 144 is not a multiple of the alignment 32"),
    ("tensor-offset-unaligned-64", _edit(lambda g: (g.kvs.append(kv_u32("general.alignment", 64)), setattr(g, "alignment", 64), setattr(g.tensors[1], "offset", 160))),
     "tensor 'blk.0.attn_q.weight' data offset 160 is not a multiple of the alignment 64"),
    ("tensors-overlap", _tensor(1, offset=96), "tensor 'blk.0.attn_q.weight' data at offset 96 overlaps tensor 'token_embd.weight' (which ends at 512); offsets must increase in file order"),
    ("tensors-out-of-order", _edit(lambda g: (setattr(g.tensors[0], "offset", 1088), setattr(g.tensors[1], "offset", 0), setattr(g.tensors[2], "offset", 1216))),
     "tensor 'blk.0.attn_q.weight' data at offset 0 overlaps tensor 'token_embd.weight' (which ends at 1600); offsets must increase in file order"),
    ("tensor-offset-past-eof", _tensor(2, offset=1 << 40), "tensor 'output_norm.weight' data (bytes 1099511628288..1099511628352) runs past the end of the file (2112 bytes): truncated"),
    ("truncated-by-one-byte", _with(truncate=-1), "tensor 'output_norm.weight' data (bytes 2112..2176) runs past the end of the file (2175 bytes): truncated"),
    ("truncated-in-data", _with(truncate=_HEADER_END + 200), "tensor 'token_embd.weight' data (bytes 512..1024) runs past the end of the file (697 bytes): truncated"),
    ("truncated-before-data", _with(truncate=_HEADER_END), "the tensor data section would start at byte 512, past the end of the file (497 bytes): truncated"),
    ("truncated-in-tensor-infos", _with(truncate=_HEADER_END - 30), "the name of tensor #2 has length 18, more than the 12 bytes left in the file"),
    ("truncated-in-tensor-dims", _with(truncate=_HEADER_END - 10), "the info of tensor 'output_norm.weight' runs past the end of the file at byte 487 (truncated?)"),
]
