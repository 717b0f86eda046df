"""llama.cpp's model files from before GGUF (2023): unversioned `ggml`, `ggmf` v1 and `ggjt`
v1, v2, v3, read and rewritten as GGUF, keeping the quantized bits wherever the layouts allow.

The file, as llama.cpp's loader read it (all integers little-endian int32/uint32):

    magic       'ggml' (no version) | 'ggmf' + version 1 | 'ggjt' + version 1, 2 or 3
    hparams     n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype
    vocab       n_vocab x (uint32 length, bytes, float32 score); no score in 'ggml' files
    tensors     until the end of the file: n_dims, name length, ggml type, ne[n_dims]
                (row length first, as GGUF), the name, then (ggjt only) zero padding to a
                multiple of 32 bytes from the file's start, then the data.

Before ggjt, a 13B or larger model was written in parts, FILE, FILE.1, FILE.2, ..., each with
the whole header and vocabulary and a slice of every matrix (tok_embeddings, wo and w2 cut
along their rows' length, the others into groups of rows, norms whole in each): they are
joined as llama.cpp's loader joined them.

Tensor names are Meta's (tok_embeddings.weight, layers.N.attention.wq.weight, ...) with q/k
rows already in llama.cpp's order. n_ff is not stored: llama.cpp derived it from n_mult,
((2*4*n_embd/3 + n_mult - 1) / n_mult) * n_mult; n_head_kv is not stored either (the 70B
Llama 2 files needed `--gqa 8`): it is read off the shape of wk here.

The block layouts changed twice inside these files (ggml's `QNT_VERSION`, visible in
llama.cpp's history and in the dequantizers of ggml effcfa62, kept as "qnt0" by rustformers):
- before ggjt v2 (#1405, May 2023, "remove bit shuffling"): the 4-bit quants of Q4_0, Q4_1,
  Q5_0 and Q5_1 were interleaved, low nibble of qs[j] = value 2j, high nibble = value 2j+1;
  since v2 they are split, low nibble = value j, high nibble = value j+16. Q5's fifth bits
  (qh bit i = value i) did not move.
- before ggjt v3 (#1508): Q4_0 {float d}, Q4_1 {float d, float m} and Q8_0 {float d} had
  float32 scales; since v3 they are float16, as in GGUF. Q5_0/Q5_1 always had float16.
- the K-quants (Q2_K..Q6_K) exist only in v3 files, with GGUF's layouts (QK_K 256).
Q4_2 and Q4_3 (April 2023) were removed from ggml without a successor: such files are
refused, as are types no llama file ever held (Q8_1, Q8_K) and anything unknown.

Re-shuffling nibbles is lossless. A float32 scale becomes the nearest float16 (GGUF's block
has no room for more); the quants stay as they were and the largest relative change of a
scale is told to the user. Nothing is requantized.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from llamachat.runtime.gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, TokenType

from llamachat.runtime.errors import UserError
from llamachat.runtime.gguf.writer import write_gguf

from .conversion import Progress, new_recorder, recorded_metadata
from .import_meta import GLOBAL_TENSORS, LAYER_TENSORS

T = GGMLQuantizationType
MAGICS = {b"lmgg": "ggml", b"fmgg": "ggmf", b"tjgg": "ggjt"}  # the uint32 magics as stored
VERSIONS = {"ggml": (None,), "ggmf": (1,), "ggjt": (1, 2, 3)}
FTYPE_NAMES = {0: "ALL_F32", 1: "MOSTLY_F16", 2: "MOSTLY_Q4_0", 3: "MOSTLY_Q4_1", 4: "MOSTLY_Q4_1_SOME_F16",
               5: "MOSTLY_Q4_2", 6: "MOSTLY_Q4_3", 7: "MOSTLY_Q8_0", 8: "MOSTLY_Q5_0", 9: "MOSTLY_Q5_1",
               10: "MOSTLY_Q2_K", 11: "MOSTLY_Q3_K_S", 12: "MOSTLY_Q3_K_M", 13: "MOSTLY_Q3_K_L",
               14: "MOSTLY_Q4_K_S", 15: "MOSTLY_Q4_K_M", 16: "MOSTLY_Q5_K_S", 17: "MOSTLY_Q5_K_M", 18: "MOSTLY_Q6_K"}
GONE_TYPES = {4: "Q4_2", 5: "Q4_3"}  # ggml types removed in May 2023, no GGUF equivalent
K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
FILE_TYPES = (T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0) + K_QUANTS
ALIGNMENT = 32  # ggjt: tensor data starts at a multiple of 32 bytes
MAX_DIM = 1 << 20  # no llama hyperparameter comes near this; a larger one is a broken file
MAX_TOKEN_BYTES = 4096  # llama.cpp's converter calls longer vocabulary items absurd
CONTEXT_LENGTH = 2048  # not stored: LLaMA 1's, convert-llama-ggml-to-gguf.py's default
RMS_EPS = 5e-6  # not stored: that converter's default, between LLaMA 1 (1e-6) and Llama 2 (1e-5)

# Stored block sizes before ggjt v3: (bytes per 32 values, float32 scales in the block)
OLD_BLOCK_BYTES = {T.Q4_0: 20, T.Q4_1: 24, T.Q8_0: 36}


@dataclass
class OldTensor:
    name: str  # as stored (Meta's name)
    ne: tuple[int, ...]  # row length first
    ggml_type: GGMLQuantizationType
    offset: int  # of the data in the file
    nbytes: int  # stored bytes
    pieces: list = field(default_factory=list)  # a split file's parts: [(path, OldTensor)], joined along ne[axis]
    axis: int = 0


@dataclass
class GGMLFile:
    path: Path
    fmt: str  # "ggml" | "ggmf" | "ggjt"
    version: int | None
    n_vocab: int
    n_embd: int
    n_mult: int
    n_head: int
    n_layer: int
    n_rot: int
    ftype: int
    vocab: list[tuple[bytes, float]] = field(default_factory=list)
    tensors: list[OldTensor] = field(default_factory=list)
    file_size: int = 0  # all parts together
    n_parts: int = 1

    @property
    def label(self) -> str:
        return self.fmt if self.version is None else f"{self.fmt} v{self.version}"

    @property
    def qnt_version(self) -> int:
        """0: interleaved nibbles, float32 scales; 1: split nibbles (ggjt v2); 2: float16 scales (v3)."""
        return 0 if self.fmt != "ggjt" or self.version == 1 else self.version - 1

    @property
    def n_ff(self) -> int:
        return (2 * (4 * self.n_embd) // 3 + self.n_mult - 1) // self.n_mult * self.n_mult


def is_ggml(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in MAGICS
    except OSError:
        return False


def stored_nbytes(ggml_type: GGMLQuantizationType, qnt_version: int, n_elements: int) -> int:
    block, size = GGML_QUANT_SIZES[ggml_type]
    if qnt_version < 2 and ggml_type in OLD_BLOCK_BYTES:
        size = OLD_BLOCK_BYTES[ggml_type]
    return n_elements // block * size


class _Reader:
    """Sequential reads that end in one sentence naming the file when it is too short."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def read(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise UserError(f"{self.path}: truncated in {what} (the file ends at byte {self.size}); the file is incomplete")
        return data

    def ints(self, n: int, what: str) -> tuple[int, ...]:
        return struct.unpack(f"<{n}i", self.read(4 * n, what))


def read_ggml(path) -> GGMLFile:
    """The header, vocabulary and tensor table of an old llama.cpp file (joined with its
    parts FILE.1, FILE.2, ... when it has them), every size checked against the file's before
    anything large is read."""
    path = Path(path)
    gf = _read_one(path)
    part_paths = []
    if gf.fmt != "ggjt":  # ggjt files were always whole; older 13B+ conversions were split
        while (p := path.with_name(f"{path.name}.{len(part_paths) + 1}")).exists():
            part_paths.append(p)
    if part_paths:
        gf = _join_parts(gf, [gf] + [_read_one(p) for p in part_paths])
    _check_tensors(gf)
    return gf


def _read_one(path: Path) -> GGMLFile:
    try:
        f = open(path, "rb")
    except OSError as err:
        raise UserError(f"{path}: cannot open ({err.strerror})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        r = _Reader(f, path, size)
        magic = f.read(4)
        if magic not in MAGICS:
            raise UserError(f"{path}: not a llama.cpp ggml/ggmf/ggjt model file (it starts with {magic[:4]!r})")
        fmt = MAGICS[magic]
        version = None if fmt == "ggml" else r.ints(1, "the header")[0]
        if version not in VERSIONS[fmt]:
            raise UserError(f"{path}: {fmt} version {version} is not one llama.cpp wrote "
                            f"(known: {', '.join(str(v) for v in VERSIONS[fmt])}); it cannot be converted")
        names = ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")
        hp = dict(zip(names, r.ints(7, "the hyperparameters")))
        gf = GGMLFile(path=path, fmt=fmt, version=version, file_size=size, **hp)
        _check_hparams(gf)
        gf.vocab = _read_vocab(r, gf)
        gf.tensors = _read_tensor_table(r, gf)
    return gf


def split_axis(meta_name: str) -> int:
    """The ne axis a multi-part file split a matrix along, as llama.cpp's loader joined them:
    tok_embeddings, wo and w2 by columns (ne0), every other matrix by rows (ne1)."""
    if meta_name.startswith("tok_embeddings.") or meta_name.endswith((".attention.wo.weight", ".feed_forward.w2.weight")):
        return 0
    return 1


def _join_parts(first: GGMLFile, parts: list[GGMLFile]) -> GGMLFile:
    """One GGMLFile whose matrices list their pieces, one per part file, in order."""
    hp = ("fmt", "version", "n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot")
    for part in parts[1:]:
        if any(getattr(part, k) != getattr(first, k) for k in hp) or [n for n, _ in part.vocab] != [n for n, _ in first.vocab]:
            raise UserError(f"{part.path}: its header differs from {first.path.name}'s; the parts do not belong together")
        if [t.name for t in part.tensors] != [t.name for t in first.tensors]:
            raise UserError(f"{part.path}: holds different tensors from {first.path.name}; the parts do not belong together")
    joined = []
    for i, t in enumerate(first.tensors):
        pieces = [p.tensors[i] for p in parts]
        if any(q.ggml_type != t.ggml_type or len(q.ne) != len(t.ne) for q in pieces):
            raise UserError(f"{parts[1].path}: tensor {t.name} differs in type from {first.path.name}'s; the parts do not belong together")
        if len(t.ne) == 1:  # norms are whole in every part
            if any(q.ne != t.ne for q in pieces):
                raise UserError(f"{parts[1].path}: tensor {t.name} has another size than in {first.path.name}; the parts do not belong together")
            joined.append(t)
            continue
        axis = split_axis(t.name)
        other = 1 - axis
        if any(q.ne[other] != t.ne[other] for q in pieces):
            raise UserError(f"{parts[1].path}: tensor {t.name} is not split the way llama.cpp split it (along ne{axis}); the parts do not belong together")
        ne = list(t.ne)
        ne[axis] = sum(q.ne[axis] for q in pieces)
        joined.append(OldTensor(t.name, tuple(ne), t.ggml_type, t.offset, sum(q.nbytes for q in pieces),
                                pieces=[(part.path, q) for part, q in zip(parts, pieces)], axis=axis))
    first.tensors = joined
    first.file_size = sum(p.file_size for p in parts)
    first.n_parts = len(parts)
    return first


def _check_hparams(gf: GGMLFile) -> None:
    for key in ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot"):
        value = getattr(gf, key)
        if not 0 < value <= MAX_DIM:
            raise UserError(f"{gf.path}: hyperparameter {key} is {value}; a llama model file has a positive value below {MAX_DIM} there (a damaged file?)")
    if gf.n_embd % gf.n_head:
        raise UserError(f"{gf.path}: n_embd {gf.n_embd} is not a multiple of n_head {gf.n_head}")
    head_dim = gf.n_embd // gf.n_head
    if gf.n_rot % 2 or gf.n_rot > head_dim:
        raise UserError(f"{gf.path}: n_rot {gf.n_rot} must be even and at most the head size {head_dim}")
    if gf.ftype in (5, 6):
        raise UserError(f"{gf.path}: a {FTYPE_NAMES[gf.ftype][7:]} file; that format was removed from ggml in May 2023 and has no GGUF equivalent: convert the original weights again")
    if gf.ftype not in FTYPE_NAMES:
        raise UserError(f"{gf.path}: ftype {gf.ftype} is not one llama.cpp wrote; it cannot be converted")
    # every vocabulary item takes at least 4 bytes: an absurd n_vocab is caught before reading
    if gf.n_vocab * (4 if gf.fmt == "ggml" else 8) > gf.file_size:
        raise UserError(f"{gf.path}: n_vocab {gf.n_vocab} cannot fit in a file of {gf.file_size} bytes; the file is damaged or incomplete")


def _read_vocab(r: _Reader, gf: GGMLFile) -> list[tuple[bytes, float]]:
    vocab = []
    scored = gf.fmt != "ggml"
    for i in range(gf.n_vocab):
        (n,) = struct.unpack("<I", r.read(4, f"vocabulary item {i}"))
        if n > MAX_TOKEN_BYTES:
            raise UserError(f"{gf.path}: vocabulary item {i} claims {n} bytes; the file is damaged")
        text = r.read(n, f"vocabulary item {i}")
        score = struct.unpack("<f", r.read(4, f"vocabulary item {i}"))[0] if scored else 0.0
        vocab.append((text, score))
    return vocab


def _type_of(gf: GGMLFile, raw_type: int, name: str) -> GGMLQuantizationType:
    if raw_type in GONE_TYPES:
        raise UserError(f"{gf.path}: tensor {name} is {GONE_TYPES[raw_type]}, a format removed from ggml in May 2023 with no GGUF equivalent; convert the original weights again")
    try:
        t = T(raw_type)
    except ValueError:
        t = None
    if t not in FILE_TYPES:
        raise UserError(f"{gf.path}: tensor {name} has type {t.name if t else raw_type}, which no llama model file held; it cannot be converted")
    if t in K_QUANTS and gf.qnt_version < 2:
        raise UserError(f"{gf.path}: tensor {name} is {t.name} in a {gf.label} file, but K-quants only ever appeared in ggjt v3 files; the file is damaged")
    return t


def _read_tensor_table(r: _Reader, gf: GGMLFile) -> list[OldTensor]:
    tensors = []
    f = r.f
    while f.tell() < gf.file_size:
        i = len(tensors)
        n_dims, name_len, raw_type = r.ints(3, f"the header of tensor {i}")
        if not 1 <= n_dims <= 2 or not 0 < name_len <= 512:
            raise UserError(f"{gf.path}: tensor {i}'s header is damaged ({n_dims} dimensions, name of {name_len} bytes)")
        ne = r.ints(n_dims, f"the header of tensor {i}")
        raw_name = r.read(name_len, f"the name of tensor {i}")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{gf.path}: tensor {i}'s name is not text; the file is damaged") from None
        if any(not 0 < d <= 1 << 31 for d in ne):
            raise UserError(f"{gf.path}: tensor {name} has dimensions {list(ne)}; the file is damaged")
        t = _type_of(gf, raw_type, name)
        block = GGML_QUANT_SIZES[t][0]
        if ne[0] % block:
            raise UserError(f"{gf.path}: tensor {name}'s rows ({ne[0]} values) are not whole {t.name} blocks of {block}; the file is damaged")
        offset = f.tell()
        if gf.fmt == "ggjt":
            offset += -offset % ALIGNMENT
        nbytes = stored_nbytes(t, gf.qnt_version, int(np.prod(ne, dtype=np.int64)))
        if offset + nbytes > gf.file_size:
            raise UserError(f"{gf.path}: truncated: tensor {name} needs bytes {offset} to {offset + nbytes}, the file has {gf.file_size}; the file is incomplete")
        tensors.append(OldTensor(name, tuple(ne), t, offset, nbytes))
        f.seek(offset + nbytes)
    return tensors


def expected_shapes(gf: GGMLFile, n_embd_kv: int) -> dict[str, tuple[int, ...]]:
    """Meta name -> ne (row length first) of every tensor a llama file holds."""
    e, ff = gf.n_embd, gf.n_ff
    shapes = {"tok_embeddings.weight": (e, gf.n_vocab), "norm.weight": (e,), "output.weight": (e, gf.n_vocab)}
    layer = {"attention_norm.weight": (e,), "attention.wq.weight": (e, e), "attention.wk.weight": (e, n_embd_kv),
             "attention.wv.weight": (e, n_embd_kv), "attention.wo.weight": (e, e), "ffn_norm.weight": (e,),
             "feed_forward.w1.weight": (e, ff), "feed_forward.w3.weight": (e, ff), "feed_forward.w2.weight": (ff, e)}
    for i in range(gf.n_layer):
        for suffix, shape in layer.items():
            shapes[f"layers.{i}.{suffix}"] = shape
    return shapes


def n_embd_kv(gf: GGMLFile) -> int:
    by_name = {t.name: t for t in gf.tensors}
    wk = by_name.get("layers.0.attention.wk.weight")
    if wk is None or len(wk.ne) != 2:
        raise UserError(f"{gf.path}: tensor layers.0.attention.wk.weight is missing; this is not a llama model file")
    head_dim = gf.n_embd // gf.n_head
    rows = wk.ne[1]
    if rows % head_dim or gf.n_head % (rows // head_dim):
        raise UserError(f"{gf.path}: layers.0.attention.wk.weight has {rows} rows, not a whole number of heads of {head_dim} dividing n_head {gf.n_head}")
    return rows


def _check_tensors(gf: GGMLFile) -> None:
    seen = set()
    for t in gf.tensors:
        if t.name in seen:
            raise UserError(f"{gf.path}: tensor {t.name} appears twice; the file is damaged")
        seen.add(t.name)
    w1 = next((t for t in gf.tensors if t.name == "layers.0.feed_forward.w1.weight"), None)
    if w1 is not None and len(w1.ne) == 2 and w1.ne[1] != gf.n_ff:
        raise UserError(f"{gf.path}: layers.0.feed_forward.w1.weight has {w1.ne[1]} rows but n_mult {gf.n_mult} gives "
                        f"n_ff {gf.n_ff} (llama.cpp's rule); the file is inconsistent")
    expected = expected_shapes(gf, n_embd_kv(gf))
    for t in gf.tensors:
        if t.name not in expected:
            raise UserError(f"{gf.path}: tensor {t.name!r} is not part of a llama model with n_layer {gf.n_layer}; it cannot be converted")
        if t.ne != expected[t.name]:
            raise UserError(f"{gf.path}: tensor {t.name} has shape {list(t.ne)}, the hyperparameters imply {list(expected[t.name])}")
        if len(t.ne) == 1 and t.ggml_type != T.F32:
            raise UserError(f"{gf.path}: tensor {t.name} is {t.ggml_type.name}; norms are always F32 in llama files (a damaged file?)")
    missing = [n for n in expected if n not in seen]
    if missing:
        raise UserError(f"{gf.path}: tensor {missing[0]} is missing{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the file is incomplete")


def gguf_name(meta_name: str) -> str:
    if meta_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[meta_name]
    _, layer, rest = meta_name.split(".", 2)
    return f"blk.{layer}.{LAYER_TENSORS[rest]}"


# --- blocks ------------------------------------------------------------------------------

def _split_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] interleaved nibbles (value 2j low, 2j+1 high) -> split (value j low, j+16 high)."""
    values = np.stack((qs & 0x0F, qs >> 4), axis=-1).reshape(qs.shape[0], 32)
    return (values[:, :16] | (values[:, 16:] << 4)).astype(np.uint8)


def _to_f16(x: np.ndarray, what: str) -> np.ndarray:
    h = x.astype(np.float16)
    if not np.isfinite(h[np.isfinite(x)]).all():
        raise UserError(f"{what} has scales beyond float16's range (largest {np.abs(x).max():.3g}); GGUF cannot hold them without requantizing")
    return h


@dataclass
class ScaleRounding:
    """Largest relative change of a float32 scale rounded to float16, over the whole file."""
    worst: float = 0.0
    count: int = 0

    def add(self, x: np.ndarray, h: np.ndarray) -> None:
        nz = x != 0
        if nz.any():
            self.worst = max(self.worst, float(np.max(np.abs(h[nz].astype(np.float32) - x[nz]) / np.abs(x[nz]))))
        self.count += x.size


def convert_blocks(raw: np.ndarray, t: GGMLQuantizationType, qnt_version: int, what: str,
                   rounding: ScaleRounding | None = None) -> np.ndarray:
    """A tensor's stored bytes -> the same blocks in GGUF's layout (uint8)."""
    if qnt_version >= 2 or t in (T.F32, T.F16):
        return raw
    if t in (T.Q5_0, T.Q5_1):  # fp16 scales from the start: only the nibbles move
        if qnt_version == 1:
            return raw
        size = GGML_QUANT_SIZES[t][1]
        blocks = raw.reshape(-1, size).copy()
        blocks[:, size - 16:] = _split_nibbles(blocks[:, size - 16:])
        return blocks.reshape(-1)
    n_f32 = {T.Q4_0: 1, T.Q4_1: 2, T.Q8_0: 1}[t]
    old = raw.reshape(-1, OLD_BLOCK_BYTES[t])
    scales = np.ascontiguousarray(old[:, :4 * n_f32]).view("<f4")
    quants = old[:, 4 * n_f32:]
    if t != T.Q8_0 and qnt_version == 0:
        quants = _split_nibbles(quants)
    half = _to_f16(scales, what)
    if rounding is not None:
        rounding.add(scales, half)
    return np.concatenate((np.ascontiguousarray(half).view(np.uint8), quants), axis=1).reshape(-1)


# --- vocabulary --------------------------------------------------------------------------

def gguf_vocab(gf: GGMLFile) -> tuple[list[str], list[float], list[int], list[str]]:
    """tokens, scores, token types as convert-llama-ggml-to-gguf.py makes them from the file's
    items (which llama.cpp's convert-pth-to-ggml.py wrote from tokenizer.model: unknown as
    ' \\u2047 ', control tokens empty, byte pieces as the raw byte, '\\u2581' as a space),
    and notes for the user."""
    notes = []
    tokens, scores, types = [], [], []
    for i, (text, score) in enumerate(gf.vocab):
        tt = TokenType.NORMAL
        if i == 0:
            text, tt = b"<unk>", TokenType.UNKNOWN
        elif i in (1, 2):
            text, tt = (b"<s>", b"</s>")[i - 1], TokenType.CONTROL
        elif not text:
            tt = TokenType.CONTROL
        elif 3 <= i <= 258 and text == bytes([i - 3]):  # SentencePiece's byte pieces <0x00>..<0xFF>
            text, tt = f"<0x{i - 3:02X}>".encode(), TokenType.BYTE
        else:
            text = text.replace(b" ", "\u2581".encode())
        tokens.append(text.decode("utf-8", "surrogateescape"))
        scores.append(float(score))
        types.append(int(tt))
    if gf.fmt == "ggml":
        # no scores: SentencePiece's BPE pieces are stored in merge order, best first
        scores = [-float(i) for i in range(len(tokens))]
        notes.append("this unversioned ggml file has no token scores; the tokens are ranked by their id, as SentencePiece orders its merges")
    return tokens, scores, types, notes


# --- conversion --------------------------------------------------------------------------

def convert_ggml(source, out: Path, name: str, progress: Progress | None = None) -> tuple[Path, list[str], GGMLFile]:
    """Rewrite an old llama.cpp file as GGUF at `out` (atomically); returns (out, notes, file)."""
    gf = read_ggml(source)
    parts = f" in {gf.n_parts} parts" if gf.n_parts > 1 else ""
    notes = [f"read a {gf.label} file{parts} ({FTYPE_NAMES[gf.ftype]}); context length {CONTEXT_LENGTH} and "
             f"RMS norm epsilon {RMS_EPS:g} are not stored in it: llama.cpp's converter defaults used"]
    kv = n_embd_kv(gf)
    gw = new_recorder(name)
    gw.add_description(f"converted from a {gf.label} {FTYPE_NAMES[gf.ftype]} file")
    gw.add_context_length(CONTEXT_LENGTH)
    gw.add_embedding_length(gf.n_embd)
    gw.add_block_count(gf.n_layer)
    gw.add_feed_forward_length(gf.n_ff)
    gw.add_rope_dimension_count(gf.n_rot)
    gw.add_head_count(gf.n_head)
    gw.add_head_count_kv(kv // (gf.n_embd // gf.n_head))
    gw.add_layer_norm_rms_eps(RMS_EPS)
    gw.add_vocab_size(gf.n_vocab)
    gw.add_file_type(gf.ftype)
    gw.add_quantization_version(2)
    tokens, scores, types, vocab_notes = gguf_vocab(gf)
    notes += vocab_notes
    gw.add_tokenizer_model("llama")
    gw.add_tokenizer_pre("default")
    gw.add_token_list(tokens)
    gw.add_token_scores(scores)
    gw.add_token_types(types)
    gw.add_unk_token_id(0)
    gw.add_bos_token_id(1)
    gw.add_eos_token_id(2)
    metadata, value_types = recorded_metadata(gw)

    maps = {p: np.memmap(p, dtype=np.uint8, mode="r") for p in {gf.path} | {p for t in gf.tensors for p, _ in t.pieces}}
    rounding = ScaleRounding()
    total = len(gf.tensors)

    def loader(i: int, t: OldTensor):
        def load():
            if progress:
                progress("convert", i, total, f"{t.name} {t.ggml_type.name} ({gf.label}) -> {gguf_name(t.name)} {t.ggml_type.name} {list(t.ne)}")
            what = f"{gf.path}: tensor {t.name}"
            if not t.pieces:
                out_bytes = convert_blocks(maps[gf.path][t.offset:t.offset + t.nbytes], t.ggml_type, gf.qnt_version, what, rounding)
            else:  # each part's rows (axis 1) or each row's parts (axis 0), in part order
                converted = [convert_blocks(maps[p][q.offset:q.offset + q.nbytes], q.ggml_type, gf.qnt_version, what, rounding).reshape(q.ne[1], -1)
                             for p, q in t.pieces]
                out_bytes = np.concatenate(converted, axis=0 if t.axis == 1 else 1).reshape(-1)
            if progress and i + 1 == total:
                progress("convert", total, total, "")
            return out_bytes

        return load

    entries = [(gguf_name(t.name), t.ne, t.ggml_type, loader(i, t)) for i, t in enumerate(gf.tensors)]
    try:
        write_gguf(out, metadata, entries, value_types=value_types)
    finally:
        maps.clear()
    if rounding.count:
        notes.append(f"{rounding.count} float32 block scales of the {gf.label} file were rounded to GGUF's float16 "
                     f"(largest relative change {rounding.worst:.2g}); the quantized values are kept bit for bit")
    return out, notes, gf
