"""`POST /v1/embeddings` of `llamachat serve` against the real model: the `openai` client and
raw HTTP on a loopback server; the vectors must be the engine's own (Llama.embed with MEAN
pooling, what the server uses for a model whose file names no pooling)."""

from __future__ import annotations

import argparse
import base64

import httpx
import numpy as np
import openai
import pytest
from test_serve import RunningServer, check_error

from llamachat.runtime import Llama
from llamachat.runtime.generation.llama_api import LLAMA_POOLING_TYPE_MEAN
from llamachat.tui.server.host import ModelHost, ServedModel

pytestmark = pytest.mark.real_model

N_CTX = 256
TEXTS = ["The capital of France is Paris.", "Numbers: 1 2 3"]


@pytest.fixture(scope="module")
def host(smollm2_path):
    host = ModelHost(ServedModel("smol", smollm2_path, {}), argparse.Namespace(n_ctx=N_CTX), None, queue_size=4)
    host.start()
    yield host
    host.close()


@pytest.fixture(scope="module")
def server(host):
    running = RunningServer(host).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def embedder(smollm2_path):
    with Llama(str(smollm2_path), n_ctx=N_CTX, embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN) as llm:
        yield llm


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, body):
    return httpx.post(server.url + "/v1/embeddings", json=body, timeout=120)


def test_the_openai_client_gets_the_engines_embeddings(client, embedder):
    # the client asks for base64 by default and decodes the float32 bytes itself
    reply = client.embeddings.create(input=TEXTS, model="smol")
    assert [d.index for d in reply.data] == [0, 1]
    want = embedder.embed(TEXTS)
    for got, ref in zip(reply.data, want):
        assert len(got.embedding) == 576
        np.testing.assert_array_equal(got.embedding, ref)  # float32 bytes of the same float32 vector
    n = sum(len(embedder.tokenize(t.encode())) for t in TEXTS)
    assert reply.usage.prompt_tokens == n and reply.usage.total_tokens == n
    assert reply.model == "smol"


def test_float_format_token_ids_and_one_string(server, embedder):
    one = post(server, {"input": TEXTS[0], "encoding_format": "float"})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    np.testing.assert_array_equal(body["data"][0]["embedding"], embedder.embed(TEXTS[0]))
    ids = embedder.tokenize(TEXTS[1].encode())
    for payload in (ids, [ids, ids]):
        r = post(server, {"input": payload, "model": "smol"})
        assert r.status_code == 200, r.text
        for item in r.json()["data"]:
            np.testing.assert_array_equal(item["embedding"], embedder.embed(TEXTS[1]))
    b64 = post(server, {"input": TEXTS[1], "encoding_format": "base64"}).json()["data"][0]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b64), dtype="<f4"),
                                  np.asarray(embedder.embed(TEXTS[1]), dtype=np.float32))


@pytest.mark.parametrize("fields, param", [
    ({}, "input"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": 3}, "input"),
    ({"input": ["ok", 5]}, "input"),
    ({"input": [1, -2]}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": [1, 10 ** 9]}, "input"),  # outside the vocabulary: found by the engine
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "dimensions": 64}, "dimensions"),
    ({"input": "x", "model": 7}, "model"),
])
def test_bad_inputs_are_openai_errors(server, fields, param):
    check_error(post(server, fields), 400, param=param)


def test_an_input_longer_than_the_batch_is_refused_and_unknown_models_are_404(server):
    check_error(post(server, {"input": "word " * 600}), 400, param="input")  # n_batch = min(512, n_ctx)
    check_error(post(server, {"input": "x", "model": "nope"}), 404, param="model", code="model_not_found")


def test_a_chat_after_an_embedding_answers_from_a_restarted_cache(client, host, smollm2_path):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    client.embeddings.create(input="something", model="smol")
    with Llama(str(smollm2_path), n_ctx=N_CTX) as engine:
        want = engine.create_chat_completion(question, temperature=0.0, max_tokens=8)["choices"][0]["message"]["content"]
    reply = client.chat.completions.create(model="smol", messages=question, temperature=0.0, max_tokens=8)
    assert reply.choices[0].message.content == want
