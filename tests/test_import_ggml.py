"""`llamachat import FILE.bin` of llama.cpp's files from before GGUF: unversioned ggml, ggmf v1,
ggjt v1/v2/v3, in every type they held. The files are written here with struct, from a tiny
random model whose tensors are first quantized in GGUF's layout; the old layouts are made from
those blocks by this file's own encoders (interleaved nibbles before ggjt v2, float32 scales
before v3), so the import must give back GGUF's bytes exactly. The converted models run and
give the same logits as the same model written directly as GGUF, and a float one matches a
plain numpy forward pass."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

import import_fixtures as fx
from llamachat.model_store.importers import run_import
from llamachat.runtime.errors import UserError
from llamachat.runtime.gguf.reader import GGUFFile
from llamachat.runtime.gguf.writer import write_gguf
from llamachat.runtime.quants import dequantize, quantize
from test_import_engine import engine_logits, reference_logits

MAGIC = {"ggml": 0x67676D6C, "ggmf": 0x67676D66, "ggjt": 0x67676A74}
DIMS = dict(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=768)  # n_mult 256 gives n_ff 768
N_MULT = 256
N_VOCAB = 400
EPS = 5e-6  # what the import states (not stored in these files)
FTYPE = {T.F32: 0, T.F16: 1, T.Q4_0: 2, T.Q4_1: 3, T.Q8_0: 7, T.Q5_0: 8, T.Q5_1: 9,
         T.Q2_K: 10, T.Q3_K: 12, T.Q4_K: 15, T.Q5_K: 17, T.Q6_K: 18}
TOKENS = [1, 57, 300, 12, 99, 250, 7, 388]

META_TO_GGUF = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "output.weight": "output.weight",
                "attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
                "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
                "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight", "feed_forward.w2.weight": "ffn_down.weight"}


def gguf_name(meta: str) -> str:
    if meta in META_TO_GGUF:
        return META_TO_GGUF[meta]
    _, layer, rest = meta.split(".", 2)
    return f"blk.{layer}.{META_TO_GGUF[rest]}"


# --- the old files, written by hand ------------------------------------------------------

def interleave(qs: np.ndarray) -> np.ndarray:
    """GGUF's split nibbles (value j low, j+16 high) -> the pre-v2 order (2k low, 2k+1 high)."""
    values = np.concatenate((qs & 0x0F, qs >> 4), axis=1)  # values 0..31 in order
    return (values[:, 0::2] | (values[:, 1::2] << 4)).astype(np.uint8)


def old_layout(raw: np.ndarray, t: T, qnt: int) -> bytes:
    """GGUF blocks -> as a file of quantization version `qnt` stored them (0: ggml/ggmf/ggjt v1,
    1: ggjt v2, 2: v3)."""
    if qnt == 2 or t in (T.F32, T.F16) or t.name.endswith("_K"):
        return raw.tobytes()
    size = GGML_QUANT_SIZES[t][1]
    b = raw.reshape(-1, size)
    if t in (T.Q5_0, T.Q5_1):
        if qnt == 1:
            return raw.tobytes()
        return np.concatenate((b[:, :size - 16], interleave(b[:, size - 16:])), axis=1).tobytes()
    n = 2 if t == T.Q4_1 else 1
    scales = np.ascontiguousarray(b[:, :2 * n]).view("<f2").astype("<f4")
    qs = b[:, 2 * n:]
    if t != T.Q8_0 and qnt == 0:
        qs = interleave(qs)
    return np.concatenate((scales.view(np.uint8), qs), axis=1).tobytes()


def write_old_file(path, fmt, version, vocab, tensors, hp=None):
    """tensors: (meta name, ne, type number, stored bytes)."""
    hp = {**dict(n_vocab=len(vocab), n_embd=DIMS["n_embd"], n_mult=N_MULT, n_head=DIMS["n_head"],
                 n_layer=DIMS["n_layer"], n_rot=DIMS["n_embd"] // DIMS["n_head"], ftype=1), **(hp or {})}
    out = bytearray(struct.pack("<I", MAGIC[fmt]))
    if fmt != "ggml":
        out += struct.pack("<I", version)
    out += struct.pack("<7i", *(hp[k] for k in ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")))
    for text, score in vocab:
        out += struct.pack("<I", len(text)) + text
        if fmt != "ggml":
            out += struct.pack("<f", score)
    for name, ne, t, data in tensors:
        nb = name.encode()
        out += struct.pack("<3i", len(ne), len(nb), t) + struct.pack(f"<{len(ne)}i", *ne) + nb
        if fmt == "ggjt":
            out += b"\0" * (-len(out) % 32)
        out += data
    path.write_bytes(bytes(out))
    return path


def old_vocab(sp) -> list[tuple[bytes, float]]:
    """The vocabulary as llama.cpp's convert-pth-to-ggml.py wrote it from tokenizer.model."""
    items = []
    for i in range(sp.vocab_size()):
        if sp.is_unknown(i):
            text = " \u2047 ".encode()
        elif sp.is_control(i):
            text = b""
        elif sp.is_byte(i):
            text = bytes([int(sp.id_to_piece(i)[3:-1], 16)])
        else:
            text = sp.id_to_piece(i).replace("\u2581", " ").encode()
        items.append((text, sp.get_score(i)))
    return items


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    import sentencepiece

    path = fx.train_sentencepiece(tmp_path_factory.mktemp("spm") / "tokenizer.model", vocab_size=N_VOCAB)
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def weights():
    """Meta name -> float32 (numpy order: rows, row length)."""
    return {fx.meta_name(n): w for n, w in fx.random_llama(N_VOCAB, seed=5, dims=DIMS).items()}


def gguf_blocks(weights, t: T) -> dict[str, np.ndarray]:
    """Meta name -> the tensor in GGUF's layout (uint8): norms F32, matrices `t`."""
    out = {}
    for name, w in weights.items():
        if w.ndim == 1 or t == T.F32:
            out[name] = np.ascontiguousarray(w, np.float32).view(np.uint8).reshape(-1)
        elif t == T.F16:
            out[name] = w.astype(np.float16).view(np.uint8).reshape(-1)
        else:
            out[name] = quantize(w, t).reshape(-1)
    return out


def make_old(path, fmt, version, t, weights, spm, hp=None):
    blocks = gguf_blocks(weights, t)
    qnt = 0 if fmt != "ggjt" or version == 1 else version - 1
    tensors = []
    for name, w in weights.items():
        tt = T.F32 if w.ndim == 1 else t
        tensors.append((name, tuple(reversed(w.shape)), int(tt), old_layout(blocks[name], tt, qnt)))
    write_old_file(path, fmt, version, old_vocab(spm), tensors, {"ftype": FTYPE[t], **(hp or {})})
    return blocks


VERSIONS = [("ggml", None), ("ggmf", 1), ("ggjt", 1), ("ggjt", 2), ("ggjt", 3)]
LEGACY = [T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
CASES = [(f, v, t) for f, v in VERSIONS for t in LEGACY] + [("ggjt", 3, t) for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)]


@pytest.mark.parametrize("fmt,version,t", CASES, ids=[f"{f}{v or ''}-{t.name}" for f, v, t in CASES])
def test_every_version_and_type_converts_bit_exactly(tmp_path, weights, spm, fmt, version, t):
    src = tmp_path / "ggml-model.bin"
    blocks = make_old(src, fmt, version, t, weights, spm)
    result = run_import(src, name="old")
    assert result.kind == "ggml"
    with GGUFFile(result.path) as g:
        assert set(g.tensors) == {gguf_name(n) for n in weights}
        for name, w in weights.items():
            info = g.tensors[gguf_name(name)]
            assert info.ggml_type == (T.F32 if w.ndim == 1 else t), name
            assert tuple(info.shape) == tuple(reversed(w.shape)), name
            # GGUF's own blocks back, byte for byte: the old scales were the float16 ones widened
            np.testing.assert_array_equal(np.asarray(info.data()).view(np.uint8).reshape(-1), blocks[name], err_msg=name)
        assert g.get("llama.feed_forward_length") == DIMS["n_ff"]
        assert g.get("llama.attention.head_count_kv") == DIMS["n_head_kv"]
        assert g.get("general.file_type") == FTYPE[t]
    if t in (T.Q4_0, T.Q4_1, T.Q8_0) and (fmt != "ggjt" or version < 3):
        assert any("float32 block scales" in n and "largest relative change 0" in n for n in result.notes), result.notes


def direct_gguf(path, blocks, weights, t, spm):
    """The same model written straight as GGUF (no old file in between)."""
    from gguf.constants import TokenType

    types = [TokenType.UNKNOWN if spm.is_unknown(i) else TokenType.CONTROL if spm.is_control(i)
             else TokenType.BYTE if spm.is_byte(i) else TokenType.NORMAL for i in range(spm.vocab_size())]
    md = {"general.architecture": "llama", "llama.context_length": 2048, "llama.embedding_length": DIMS["n_embd"],
          "llama.block_count": DIMS["n_layer"], "llama.feed_forward_length": DIMS["n_ff"],
          "llama.rope.dimension_count": DIMS["n_embd"] // DIMS["n_head"], "llama.attention.head_count": DIMS["n_head"],
          "llama.attention.head_count_kv": DIMS["n_head_kv"], "llama.attention.layer_norm_rms_epsilon": EPS,
          "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [spm.id_to_piece(i) for i in range(spm.vocab_size())],
          "tokenizer.ggml.scores": [float(spm.get_score(i)) for i in range(spm.vocab_size())],
          "tokenizer.ggml.token_type": [int(x) for x in types], "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    entries = [(gguf_name(n), tuple(reversed(w.shape)), T.F32 if w.ndim == 1 else t, blocks[n]) for n, w in weights.items()]
    return write_gguf(path, md, entries)


@pytest.mark.parametrize("fmt,version,t", [("ggjt", 1, T.Q4_0), ("ggml", None, T.Q4_1), ("ggjt", 2, T.Q5_1), ("ggjt", 3, T.Q4_K)])
def test_converted_model_gives_the_logits_of_the_same_model_as_gguf(tmp_path, weights, spm, fmt, version, t):
    blocks = make_old(tmp_path / "m.bin", fmt, version, t, weights, spm)
    result = run_import(tmp_path / "m.bin", name="old")
    direct = direct_gguf(tmp_path / "direct.gguf", blocks, weights, t, spm)
    got, want = engine_logits(result.path, TOKENS), engine_logits(direct, TOKENS)
    np.testing.assert_array_equal(got, want)  # the same bytes and settings: the same arithmetic


def test_float_ggml_file_matches_a_numpy_forward_pass(tmp_path, weights, spm):
    make_old(tmp_path / "ggml-model-f16.bin", "ggml", None, T.F16, weights, spm)
    result = run_import(tmp_path / "ggml-model-f16.bin", name="f16")
    inverse = {fx.meta_name(n): n for n in fx.random_llama(8, dims=DIMS)}
    held = {inverse[n]: w for n, w in weights.items()}
    want = reference_logits(held, TOKENS, rope="pairs", eps=EPS, dims=DIMS)
    got = engine_logits(result.path, TOKENS)
    scale = np.abs(want).max()
    # measured 6.7e-3 of the largest logit (the engine's arithmetic against float64); a wrong
    # layout or setting gives errors of order 1
    assert np.abs(got - want).max() < 1.4e-2 * scale
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("fmt,version", [("ggmf", 1), ("ggml", None)])
def test_vocabulary_tokenizes_like_sentencepiece(tmp_path, weights, spm, fmt, version):
    from llamachat.runtime.tokenizer.tokenizer import Tokenizer

    make_old(tmp_path / "m.bin", fmt, version, T.F16, weights, spm)
    result = run_import(tmp_path / "m.bin", name="old")
    tok = Tokenizer.from_gguf(result.path)
    for text in ("Licensed under the Apache License, Version 2.0", "copyright © 2024 ünïcode ~~ 42"):
        assert tok.encode(text, add_special=False) == spm.encode(text), text
    with GGUFFile(result.path) as g:
        tokens = list(g.get("tokenizer.ggml.tokens"))
        assert tokens[:3] == ["<unk>", "<s>", "</s>"]
        assert tokens[3 + 0x41] == "<0x41>" and tokens == [spm.id_to_piece(i) for i in range(N_VOCAB)]
    if fmt == "ggml":
        assert any("no token scores" in n for n in result.notes)


def test_float32_scales_are_rounded_and_the_quants_kept(tmp_path, weights, spm):
    """A ggjt v1 Q4_0 file made by the old quantizer (float32 scales, not float16 values)."""
    rng = np.random.default_rng(1)
    tensors = []
    expected = {}
    for name, w in weights.items():
        ne = tuple(reversed(w.shape))
        if w.ndim == 1:
            tensors.append((name, ne, 0, w.astype("<f4").tobytes()))
            continue
        blocks = w.reshape(-1, 32)
        amax_idx = np.abs(blocks).argmax(1)
        d = (blocks[np.arange(len(blocks)), amax_idx] / -8).astype(np.float32)
        q = np.clip(np.trunc(blocks / np.where(d == 0, 1, d)[:, None] + 8.5), 0, 15).astype(np.uint8)
        q[rng.random(q.shape) < 0.01] ^= 1  # any quants must survive, not only the quantizer's
        split = q[:, :16] | (q[:, 16:] << 4)
        tensors.append((name, ne, 2, np.concatenate((d.view(np.uint8).reshape(-1, 4), interleave(split)), axis=1).tobytes()))
        expected[name] = ((q.astype(np.float32) - 8) * d[:, None]).reshape(w.shape)
    write_old_file(tmp_path / "q.bin", "ggjt", 1, old_vocab(spm), tensors, {"ftype": 2})
    result = run_import(tmp_path / "q.bin", name="q")
    note = next(n for n in result.notes if "float32 block scales" in n)
    worst = float(note.split("largest relative change ")[1].split(")")[0])
    # float16 rounding moves a scale by at most half a unit of its 11-bit mantissa, 2**-11
    # (4.88e-4), which the note prints to two digits
    assert 0 < worst <= 4.9e-4
    with GGUFFile(result.path) as g:
        for name, want in expected.items():
            info = g.tensors[gguf_name(name)]
            got = dequantize(np.asarray(info.data()).view(np.uint8).reshape(want.shape[0], -1), T.Q4_0, want.shape[1])
            assert np.all(np.abs(got - want) <= np.abs(want) * 2.0 ** -11 + 1e-30), name


@pytest.mark.parametrize("fmt,version,t", [("ggmf", 1, T.F16), ("ggml", None, T.Q4_0)])
def test_model_in_parts_is_joined(tmp_path, weights, spm, fmt, version, t):
    """A 13B-style split in two files, FILE and FILE.1, cut as llama.cpp's converter cut them."""
    n_parts = 2
    parts = [[] for _ in range(n_parts)]
    for name, w in weights.items():
        if w.ndim == 1:
            for p in parts:
                p.append((name, (w.shape[0],), 0, w.astype("<f4").tobytes()))
            continue
        by_columns = name.startswith("tok_embeddings.") or name.endswith((".attention.wo.weight", ".feed_forward.w2.weight"))
        for p, piece in zip(parts, np.split(w, n_parts, axis=1 if by_columns else 0)):
            raw = gguf_blocks({name: piece}, t)[name]
            p.append((name, tuple(reversed(piece.shape)), int(t), old_layout(raw, t, 0)))
    src = tmp_path / "ggml-model.bin"
    write_old_file(src, fmt, version, old_vocab(spm), parts[0], {"ftype": FTYPE[t]})
    write_old_file(tmp_path / "ggml-model.bin.1", fmt, version, old_vocab(spm), parts[1], {"ftype": FTYPE[t]})
    result = run_import(src, name="joined")
    assert "in 2 parts" in result.notes[0]
    blocks = gguf_blocks(weights, t)
    with GGUFFile(result.path) as g:
        for name, w in weights.items():
            np.testing.assert_array_equal(np.asarray(g.tensors[gguf_name(name)].data()).view(np.uint8).reshape(-1), blocks[name], err_msg=name)
    # a part from another model is refused
    write_old_file(tmp_path / "ggml-model.bin.1", fmt, version, old_vocab(spm), parts[1], {"ftype": FTYPE[t], "n_layer": 1})
    assert "the parts do not belong together" in _error(src)


# --- refusals ----------------------------------------------------------------------------

def _error(src, **kw) -> str:
    with pytest.raises(UserError) as err:
        run_import(src, name="x", **kw)
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _old_tensors(weights, t_number=1, data_of=None):
    out = []
    for name, w in weights.items():
        ne = tuple(reversed(w.shape))
        if w.ndim == 1:
            out.append((name, ne, 0, w.astype("<f4").tobytes()))
        else:
            out.append((name, ne, t_number, data_of(w) if data_of else w.astype("<f2").tobytes()))
    return out


def test_gone_and_unknown_types_are_refused(tmp_path, weights, spm):
    q4_2 = _old_tensors(weights, 4, lambda w: bytes(w.size // 16 * 10))
    write_old_file(tmp_path / "a.bin", "ggjt", 1, old_vocab(spm), q4_2, {"ftype": 2})
    assert "Q4_2, a format removed from ggml in May 2023" in _error(tmp_path / "a.bin")
    write_old_file(tmp_path / "b.bin", "ggjt", 1, old_vocab(spm), q4_2, {"ftype": 5})
    assert "Q4_2 file; that format was removed" in _error(tmp_path / "b.bin")
    write_old_file(tmp_path / "c.bin", "ggjt", 3, old_vocab(spm), _old_tensors(weights, 99, lambda w: b""), {"ftype": 1})
    assert "has type 99, which no llama model file held" in _error(tmp_path / "c.bin")
    k_in_v2 = _old_tensors(weights, int(T.Q4_K), lambda w: quantize(w, T.Q4_K).tobytes())
    write_old_file(tmp_path / "d.bin", "ggjt", 2, old_vocab(spm), k_in_v2, {"ftype": 15})
    assert "K-quants only ever appeared in ggjt v3" in _error(tmp_path / "d.bin")
    write_old_file(tmp_path / "e.bin", "ggjt", 4, old_vocab(spm), [], {})
    assert "ggjt version 4 is not one llama.cpp wrote" in _error(tmp_path / "e.bin")


def test_hostile_files_end_in_one_sentence(tmp_path, weights, spm):
    src = write_old_file(tmp_path / "good.bin", "ggjt", 3, old_vocab(spm), _old_tensors(weights))
    data = src.read_bytes()
    for cut in (6, 20, 40, 5000, len(data) - 100):
        (tmp_path / "cut.bin").write_bytes(data[:cut])
        msg = _error(tmp_path / "cut.bin")
        assert "truncated" in msg or "incomplete" in msg or "cannot fit" in msg, (cut, msg)
    for key, value in (("n_vocab", 2**31 - 1), ("n_embd", 2**30), ("n_layer", 0), ("n_head", -3), ("n_mult", 0)):
        write_old_file(tmp_path / "h.bin", "ggjt", 3, old_vocab(spm), _old_tensors(weights), {key: value})
        msg = _error(tmp_path / "h.bin")
        assert key in msg, msg
    write_old_file(tmp_path / "v.bin", "ggjt", 3, old_vocab(spm), _old_tensors(weights), {"n_vocab": 300})
    assert "the hyperparameters imply" in _error(tmp_path / "v.bin") or "damaged" in _error(tmp_path / "v.bin")
    write_old_file(tmp_path / "m.bin", "ggjt", 3, old_vocab(spm), _old_tensors(weights), {"n_mult": 64})
    assert "n_mult 64 gives n_ff" in _error(tmp_path / "m.bin")
    assert "not a regular file or a folder" in _error("/dev/zero")  # never opened (a FIFO would block)
    (tmp_path / "junk.bin").write_bytes(b"\0" * 64)
    assert "not a GGUF file" in _error(tmp_path / "junk.bin")
    (tmp_path / "huge-item.bin").write_bytes(data[:4 + 4 + 28] + b"\xff\xff\xff\x7f" + data[40:])
    assert "vocabulary item 0 claims 2147483647 bytes" in _error(tmp_path / "huge-item.bin")


def test_quantized_old_file_with_quant_is_refused_and_float_one_quantizes(tmp_path, weights, spm):
    make_old(tmp_path / "q.bin", "ggjt", 3, T.Q4_0, weights, spm)
    assert "already quantized" in _error(tmp_path / "q.bin", quant="Q8_0")
    make_old(tmp_path / "f.bin", "ggmf", 1, T.F16, weights, spm)
    result = run_import(tmp_path / "f.bin", name="f-q8", quant="Q8_0")
    with GGUFFile(result.path) as g:
        assert g.tensors["blk.0.attn_q.weight"].ggml_type == T.Q8_0


def test_cli_imports_an_old_file(tmp_path, weights, spm, capsys):
    from llamachat.tui.cli import main

    make_old(tmp_path / "ggml-model-q4_0.bin", "ggjt", 1, T.Q4_0, weights, spm)
    assert main(["import", str(tmp_path / "ggml-model-q4_0.bin"), "--name", "legacy", "-q"]) == 0
    out = capsys.readouterr().out
    assert "read a ggjt v1 file (MOSTLY_Q4_0)" in out and "Imported legacy (ggml;" in out
