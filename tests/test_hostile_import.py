"""Hostile import sources (issue 17, item 6): config.json and params.json deeply nested or with
absurd values, safetensors headers with unknown dtypes, overflowing shapes, overlapping or
out-of-file offsets or a 2^60 header length, truncated .pth archives, /dev/zero as a source:
refused with one sentence before any large allocation."""

from __future__ import annotations

import json
import resource
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llamachat.model_store.conversion import LLAMA_LAYER_SHAPES, LlamaDims
from llamachat.model_store.import_hf import LAYER_TENSORS as HF_LAYERS
from llamachat.model_store.import_hf import plan_hf
from llamachat.model_store.import_meta import LAYER_TENSORS as META_LAYERS
from llamachat.model_store.import_meta import plan_meta
from llamachat.model_store.pth_reader import PthFile
from llamachat.model_store.safetensors_reader import SafetensorsFile
from llamachat.runtime.errors import UserError
from llamachat.tui.cli import main

sys.path.insert(0, str(Path(__file__).parent))
import import_fixtures as fx  # noqa: E402

DEEP = "[" * 100_000 + "]" * 100_000


def refused(call, expected: str, mb: float = 100):
    """`call()` raises one UserError containing `expected`, quickly and without a big allocation."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        call()
    assert time.monotonic() - t0 < 30
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < mb  # ru_maxrss: KiB
    message = str(err.value)
    assert expected in message, message
    assert "\n" not in message and len(message) < 400 and "Traceback" not in message
    return message


def _config(**changes):
    config = fx.hf_config(64, tied=True)
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


@pytest.mark.parametrize("config,expected", [
    ('{"a": ' + DEEP + "}", "config.json: cannot be read as JSON (nested too deeply)"),
    (_config(num_hidden_layers=1e9), "num_hidden_layers must be a whole number, not 1000000000.0"),
    (_config(num_hidden_layers=10 ** 9), "num_hidden_layers is 1000000000; it must be between 1 and 4096"),
    (_config(vocab_size=10 ** 9), "vocab_size is 1000000000; it must be between 1 and 1048576"),
    (_config(hidden_size=0), "hidden_size is 0; it must be between 1 and"),
    (_config(hidden_size="4096"), "hidden_size must be a whole number, not '4096'"),
    (_config(num_attention_heads=[4]), "num_attention_heads must be a whole number, not [4]"),
    (_config(num_key_value_heads=3), "do not form a llama model"),
    (_config(intermediate_size=None), "intermediate_size is missing"),
    (_config(rms_norm_eps=float("nan")), "rms_norm_eps must be a positive number, not nan"),
    (_config(rope_theta=-1), "rope_theta must be a positive number, not -1"),
    (_config(max_position_embeddings=1 << 40), "max_position_embeddings is 1099511627776"),
    (_config(architectures=["x" * 1_000_000]), "(1000000 characters) is not supported"),
    (_config(architectures=[{"a": 1}]), "architecture {'a': 1} is not supported"),
    ("[1, 2]", "not a JSON object"),
])
def test_hostile_config_json(tmp_path, config, expected):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    refused(lambda: plan_hf(folder, "m"), expected)


def test_hostile_rope_scaling(tmp_path):
    folder = tmp_path / "hf"
    fx.write_hf_model(folder, fx.random_llama(64, tied=True), _config(rope_scaling=[1]))
    (folder / "tokenizer.json").write_text("{}")
    refused(lambda: plan_hf(folder, "m"), "rope_scaling must be an object, not [1]")


def _safetensors(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize("header,data,length,expected", [
    ({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), None, "dtype F8_E4M3; only F32, F16 and BF16"),
    ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "dtype ['F32']; only F32"),
    ({"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 0]}}, b"", None, "offsets 0..0 do not hold a F32"),
    ({"a": {"dtype": "F32", "shape": [1 << 62, 4], "data_offsets": [0, 0]}}, b"", None, "do not hold a F32"),
    ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, bytes(8), None, "shape [2.5], not a list of non-negative whole numbers"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None, "not a list of non-negative whole numbers"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, bytes(8), None, "data_offsets ['0', '8'], not two whole numbers"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
     bytes(12), None, "tensors 'a' and 'b' overlap (bytes 4..8 belong to both)"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [1 << 40, (1 << 40) + 8]}}, bytes(8), None, "inside the file (truncated?)"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), 1 << 60, f"header length {1 << 60} does not fit in the file"),
    ({"a": "F32"}, b"", None, "tensor 'a' has no dtype/shape/data_offsets"),
    (b'{"a": ' + DEEP.encode() + b"}", b"", None, "header is nested too deeply"),
    (b"\xff\xfe{}", b"", None, "header is not JSON"),
    ({"x" * 1_000_000: {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]}}, bytes(1), None, "(1000000 characters) has dtype I8"),
])
def test_hostile_safetensors(tmp_path, header, data, length, expected):
    path = _safetensors(tmp_path / "x.safetensors", header, data, length)
    refused(lambda: SafetensorsFile(path), expected)


@pytest.mark.parametrize("params,expected", [
    ('{"dim": ' + DEEP + "}", "params.json: cannot be read as JSON (nested too deeply)"),
    ({"dim": 64, "n_layers": 1e9, "n_heads": 4, "norm_eps": 1e-5}, "n_layers must be a whole number, not 1000000000.0"),
    ({"dim": 64, "n_layers": 10 ** 9, "n_heads": 4, "norm_eps": 1e-5}, "n_layers is 1000000000; it must be between 1 and 4096"),
    ({"dim": 0, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5}, "dim is 0"),
    ({"dim": "64", "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5}, "dim must be a whole number, not '64'"),
    ({"dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": "small"}, "norm_eps must be a positive number, not 'small'"),
    ({"dim": 64, "n_layers": 2, "n_heads": 5, "norm_eps": 1e-5}, "dim 64 is not a multiple of n_heads 5"),
    ({"dim": 64, "n_layers": 2, "n_heads": 4}, "norm_eps is missing"),
])
def test_hostile_params_json(tmp_path, params, expected):
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(params if isinstance(params, str) else json.dumps(params))
    refused(lambda: plan_meta(folder, "m"), expected)


@pytest.mark.parametrize("cut", [10, 200, -40, -3])
def test_truncated_pth_is_refused(tmp_path, cut):
    path = tmp_path / "consolidated.00.pth"
    fx.write_torch_checkpoint(path, {"w": ("F32", np.ones((16, 16), np.float32)), "v": ("F16", np.ones(8, np.float32))})
    data = path.read_bytes()
    path.write_bytes(data[:cut])

    def open_and_read():
        f = PthFile(path)
        for name in f.names:
            f.tensor(name).to_f32()

    refused(open_and_read, f"{path}: not a readable PyTorch checkpoint")


@pytest.mark.parametrize("source", ["/dev/zero", "/dev/urandom"])
def test_device_as_import_source_is_refused(capsys, source):
    t0 = time.monotonic()
    assert main(["import", source]) == 2
    out, err = capsys.readouterr()
    assert time.monotonic() - t0 < 30
    assert err == (f"llamachat: {source}: not a regular file or a folder; import takes a .gguf file, a Hugging Face model "
                   "folder, a Meta checkpoint folder or one of llama.cpp's older ggml/ggmf/ggjt .bin files\n")


def test_one_llama_shape_table_for_both_importers():
    # both importers map their names onto the same llama.cpp names, whose shapes come from one table
    assert set(HF_LAYERS.values()) == set(META_LAYERS.values()) == set(LLAMA_LAYER_SHAPES)
    d = LlamaDims(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=96, head_dim=16, n_vocab=100)
    assert d.layer_shapes()["attn_k.weight"] == (32, 64) and d.layer_shapes()["ffn_down.weight"] == (64, 96)
    assert d.global_shape("token_embd.weight") == (100, 64)
