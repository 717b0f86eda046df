"""llama-cpp-python's low-level Llama API on the real model: the accessors, eval / sample /
generate, scores with logits_all, logits_to_logprobs and embeddings with llama.cpp's poolings."""

import numpy as np
import pytest

from llamachat.runtime import Llama, UserError
from llamachat.runtime.generation.llama_api import (LLAMA_POOLING_TYPE_CLS, LLAMA_POOLING_TYPE_LAST, LLAMA_POOLING_TYPE_MEAN,
                                         LLAMA_POOLING_TYPE_NONE, LlamaTokenizer)
from llamachat.runtime.quants.matmul import dequantize_rows

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(smollm2_path):
    with Llama(model_path=str(smollm2_path), n_ctx=256, n_batch=64, logits_all=True, seed=7) as llm:
        yield llm


@pytest.fixture(scope="module")
def embedder(smollm2_path):
    with Llama(model_path=str(smollm2_path), n_ctx=256, n_batch=64, embedding=True,
               pooling_type=LLAMA_POOLING_TYPE_NONE) as llm:
        yield llm


def test_small_accessors(llm):
    assert llm.n_ctx() == 256
    assert llm.n_embd() == 576  # SmolLM2-135M's embedding_length
    assert llm.n_vocab() == 49152
    assert llm.token_bos() == 1 and llm.token_eos() == 2  # <|im_start|>, <|im_end|>
    assert llm.detokenize([llm.token_nl()]) == b"\n"
    tok = llm.tokenizer()
    assert isinstance(tok, LlamaTokenizer)
    ids = tok.encode("Hello world")
    assert ids == llm.tokenize(b"Hello world", special=True)
    assert tok.decode(ids) == "Hello world"
    # llamachat's own callers still read the engine tokenizer's attributes through llm.tokenizer
    assert llm.tokenizer.n_vocab == 49152
    assert llm.pooling_type() == -1  # no embedding=True


def test_eval_sample_loop_matches_create_completion(llm):
    want = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    llm.reset()
    assert llm.n_tokens == 0
    tokens = llm.tokenize(PROMPT.encode())
    llm.eval(tokens)
    assert llm.n_tokens == len(tokens)
    assert list(llm.input_ids[:llm.n_tokens]) == tokens and len(llm.input_ids) == 256
    out = []
    for _ in range(8):
        t = llm.sample(temp=0.0)
        out.append(t)
        llm.eval([t])
    assert llm.detokenize(out).decode() == want
    # generate: the same tokens, and it reuses the cached prefix
    got = []
    for t in llm.generate(tokens, temp=0.0):
        got.append(t)
        if len(got) == 8:
            break
    assert got == out


def test_generate_stopping_criteria(llm):
    tokens = llm.tokenize(PROMPT.encode())
    seen = []

    def stop_after_three(input_ids, logits):
        seen.append((len(input_ids), logits.shape))
        return len(seen) == 3

    got = list(llm.generate(tokens, temp=0.0, stopping_criteria=stop_after_three))
    assert len(got) == 2  # the third token's check says stop: it is not yielded
    # as llama-cpp-python: the ids before the sampled token, and the logits it was drawn from
    assert seen[0] == (len(tokens), (49152,))


def test_scores_are_every_positions_logits(llm):
    tokens = llm.tokenize(PROMPT.encode())
    llm.reset()
    llm.eval(tokens)
    scores = llm._scores.copy()
    assert scores.shape == (len(tokens), 49152)
    assert len(llm.eval_logits) == len(tokens)
    # the last row is what the generation loop samples from: the engine's last-token logits
    llm.reset()
    last = llm.model.eval(tokens, logits="last")
    llm.generator.cache_tokens = list(tokens)
    np.testing.assert_array_equal(scores[-1], last)
    # logits_to_logprobs is log_softmax
    lp = Llama.logits_to_logprobs(scores)
    ref = scores.astype(np.float64) - np.log(np.exp(scores.astype(np.float64) - scores.max(-1, keepdims=True)).sum(-1, keepdims=True)) - scores.max(-1, keepdims=True)
    # float32 against float64 over 49152 terms: measured 3.1e-6 and 1.8e-7
    np.testing.assert_allclose(lp, ref, atol=6e-6)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=4e-7)
    llm.reset()


def test_sample_idx_and_seeded_sampling(llm):
    tokens = llm.tokenize(PROMPT.encode())
    llm.reset()
    llm.eval(tokens)
    assert llm.sample(temp=0.0, idx=0) == int(np.argmax(llm.scores[0]))
    llm.set_seed(123)
    a = [llm.sample(temp=1.0) for _ in range(5)]
    llm.set_seed(123)
    b = [llm.sample(temp=1.0) for _ in range(5)]
    assert a == b
    with pytest.raises(UserError, match="idx"):
        llm.sample(idx=999)


def test_sample_without_eval_and_idx_without_logits_all(smollm2_path):
    with Llama(model_path=str(smollm2_path), n_ctx=64) as plain:
        with pytest.raises(UserError, match="eval"):
            plain.sample()
        plain.eval(plain.tokenize(b"Hello there"))
        with pytest.raises(UserError, match="logits_all=True"):
            plain.sample(idx=0)
        assert isinstance(plain.sample(temp=0.0), int)
        with pytest.raises(UserError, match="embedding=True"):
            plain.embed("hi")


def _hidden(embedder, text):
    """Per-token final-norm hidden states (pooling NONE)."""
    return np.array(embedder.embed(text), dtype=np.float64)


def test_hidden_states_times_the_output_matrix_are_the_logits(embedder, llm):
    # independent check of the hidden states: output.weight @ h must give eval's logits
    text = "Paris is a city"
    h = _hidden(embedder, text)
    llm.reset()
    llm.eval(llm.tokenize(text.encode()))
    scores = llm._scores.astype(np.float64)
    # through the engine's own output product (which rounds the activations to 8 bits) the
    # logits come back exactly: the embeddings are the states the logits are made from
    from llamachat.runtime.quants.matmul import matmul

    np.testing.assert_array_equal(matmul(embedder.model.weights.output, h.astype(np.float32)), scores)
    # and in float64 with the dequantized (Q8_0, tied) matrix, up to that rounding: measured
    # max error 0.38, mean 0.056 on logits of magnitude ~20; bounds twice that
    w = embedder.model.weights.output
    out = dequantize_rows(w.rows, w.ggml_type, embedder.n_embd()).astype(np.float64)
    err = np.abs(h @ out.T - scores)
    assert err.max() < 0.8 and err.mean() < 0.12
    llm.reset()


def test_poolings(embedder, smollm2_path):
    text = "The quick brown fox"
    h = _hidden(embedder, text)
    assert h.shape == (len(embedder.tokenize(text.encode())), 576)
    assert embedder.n_tokens == 0  # the cache is empty afterwards
    for pooling, want in [(LLAMA_POOLING_TYPE_MEAN, h.mean(0)), (LLAMA_POOLING_TYPE_CLS, h[0]),
                          (LLAMA_POOLING_TYPE_LAST, h[-1])]:
        with Llama(model_path=str(smollm2_path), n_ctx=256, n_batch=64, embedding=True, pooling_type=pooling) as e:
            v = np.array(e.embed(text))
            np.testing.assert_allclose(v, want, rtol=0, atol=5e-7)  # float32 mean against float64: measured 2.4e-7
            unit = np.array(e.embed(text, normalize=True))
            assert abs(np.linalg.norm(unit) - 1.0) < 1e-12  # float64
            np.testing.assert_array_equal(unit, v / np.linalg.norm(v))
            # each input from an empty cache: a batch gives what the inputs give alone
            both, count = e.embed([text, "hello"], return_count=True)
            np.testing.assert_array_equal(both[0], v)
            assert count == len(e.tokenize(text.encode())) + len(e.tokenize(b"hello"))
            response = e.create_embedding([text, "hello"], model="m")
            assert response["object"] == "list" and response["model"] == "m"
            assert [d["index"] for d in response["data"]] == [0, 1]
            assert response["data"][0]["object"] == "embedding"
            np.testing.assert_array_equal(response["data"][1]["embedding"], both[1])
            assert response["usage"] == {"prompt_tokens": count, "total_tokens": count}


def test_embedding_truncation_and_refusals(embedder):
    long_text = "word " * 200
    n = len(embedder.tokenize(long_text.encode()))
    assert n > 64
    assert len(embedder.embed(long_text)) == 64  # truncated to n_batch tokens (pooling NONE: one row each)
    with pytest.raises(UserError, match=r"Requested tokens \(\d+\) exceed batch size of 64"):
        embedder.embed(long_text, truncate=False)
    with pytest.raises(UserError, match="vocabulary"):
        embedder.embed([[1, 99999999]])
    with pytest.raises(UserError, match="input"):
        embedder.embed(3.5)


def test_pooling_type_must_be_known(smollm2_path):
    with pytest.raises(UserError, match="pooling_type"):
        Llama(model_path=str(smollm2_path), n_ctx=64, embedding=True, pooling_type=7)
    with Llama(model_path=str(smollm2_path), n_ctx=64, embedding=True) as e:
        assert e.pooling_type() == LLAMA_POOLING_TYPE_NONE  # llama.cpp's default for a llama model


def _prompt_logits(llm, prompt):
    with Llama(model_path=llm.model_path, n_ctx=64) as other:
        other.eval(prompt)
        return other._last_logits.astype(np.float64)


def test_completion_logprobs_are_log_softmax_of_the_scores(llm):
    llm.reset()
    prompt = llm.tokenize(PROMPT.encode(), special=True)
    out = llm.create_completion(PROMPT, max_tokens=6, temperature=0.0, logprobs=3)
    text, lp = out["choices"][0]["text"], out["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
    assert "".join(lp["tokens"]) == text and len(lp["tokens"]) == 6
    assert lp["text_offset"][0] == len(PROMPT)
    assert lp["text_offset"] == [len(PROMPT) + len("".join(lp["tokens"][:i])) for i in range(6)]
    scores = llm.scores[len(prompt) - 1:len(prompt) + 5].astype(np.float64)
    ref = scores - scores.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    generated = [int(np.argmax(row)) for row in scores]  # greedy: each token is its row's best
    assert llm.detokenize(generated).decode() == text
    # float32 log-sum-exp against float64: measured 1.3e-7
    np.testing.assert_allclose(lp["token_logprobs"], ref[np.arange(6), generated], atol=3e-7)
    for row, top, best in zip(ref, lp["top_logprobs"], lp["token_logprobs"]):
        assert len(top) <= 3 and max(top.values()) == best  # greedy: the chosen token is the likeliest
        assert sorted(top.values(), reverse=True) == pytest.approx(sorted(row, reverse=True)[:len(top)], abs=3e-7)
    # the first row is the engine's logits after the prompt
    np.testing.assert_array_equal(scores[0], _prompt_logits(llm, prompt))
    llm.reset()
    echo = llm.create_completion(PROMPT, max_tokens=2, temperature=0.0, logprobs=1, echo=True)["choices"][0]
    assert "".join(echo["logprobs"]["tokens"]) == echo["text"]
    assert echo["logprobs"]["token_logprobs"][0] is None and echo["logprobs"]["top_logprobs"][0] is None
    assert echo["logprobs"]["token_logprobs"][-2:] == lp["token_logprobs"][:2]
    with pytest.raises(UserError, match="stream"):
        llm.create_completion(PROMPT, max_tokens=2, logprobs=1, stream=True)


def test_openai_v1_chat_types(llm):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    messages = [{"role": "user", "content": "Say hi"}]
    # each from an empty cache: a prompt evaluated whole or one token at a time can round
    # differently (runtime/quants/matmul.py's prefill paths), and greedy follows the rounding
    llm.reset()
    plain = llm.create_chat_completion(messages, temperature=0.0, max_tokens=4)
    llm.reset()
    typed = llm.create_chat_completion_openai_v1(messages, temperature=0.0, max_tokens=4)
    assert isinstance(typed, ChatCompletion)
    assert typed.choices[0].message.content == plain["choices"][0]["message"]["content"]
    assert typed.usage.completion_tokens == plain["usage"]["completion_tokens"]
    llm.reset()
    chunks = list(llm.create_chat_completion_openai_v1(messages, temperature=0.0, max_tokens=4, stream=True))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == typed.choices[0].message.content
    assert Llama.longest_token_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


def test_generate_send_appends_tokens_and_n_tokens_rewinds(llm):
    tokens = llm.tokenize(PROMPT.encode())
    extra = llm.tokenize(b" Paris, and", add_bos=False)
    llm.reset()
    g = llm.generate(tokens, temp=0.0)
    first = next(g)
    # llama-cpp-python: sent tokens are draft tokens after the yielded one; all are evaluated,
    # and the next token is sampled after the yielded one (logits_all: each row is kept)
    second = g.send(extra)
    assert list(llm.input_ids[:llm.n_tokens]) == tokens + [first] + extra
    assert second == int(np.argmax(llm.scores[len(tokens)]))
    if second != extra[0]:  # a rejected draft: its tokens are dropped before the next step
        g.send(None)
        assert list(llm._input_ids[:len(tokens) + 2]) == tokens + [first, second]
    g.close()
    llm.reset()
    llm.eval(tokens)
    # lowering n_tokens forgets the later positions: eval goes on from there
    llm.n_tokens = len(tokens)
    assert llm.n_tokens == len(tokens) and list(llm._input_ids) == tokens
    llm.eval([first])
    assert list(llm._input_ids) == tokens + [first]
    with pytest.raises(ValueError, match="n_tokens"):
        llm.n_tokens = 1000
    llm.reset()


def test_chat_logprobs_in_openais_shape(llm, smollm2_path):
    messages = [{"role": "user", "content": "Say hi"}]
    llm.reset()
    out = llm.create_chat_completion(messages, temperature=0.0, max_tokens=3, logprobs=True, top_logprobs=2)
    choice = out["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"] and len(content) == 3
    for c in content:
        assert set(c) == {"token", "bytes", "logprob", "top_logprobs"} and len(c["top_logprobs"]) <= 3
        assert max(t["logprob"] for t in c["top_logprobs"]) == c["logprob"]  # greedy: the likeliest
    # as llama-cpp-python: logprobs=True without top_logprobs gives none
    llm.reset()
    assert llm.create_chat_completion(messages, max_tokens=1, logprobs=True)["choices"][0]["logprobs"] is None
    with Llama(model_path=str(smollm2_path), n_ctx=64) as plain:
        with pytest.raises(UserError, match="logits_all=False"):
            plain.create_chat_completion(messages, max_tokens=1, logprobs=True, top_logprobs=1)
