#!/usr/bin/env python3
"""Ask OpenAI-compatible servers the same questions and compare their answers side by side.

    llamachat serve -m FILE --port 8080 &
    llama-server -m FILE --port 8081 -c 2048 -fa on &     # llama.cpp's server, same file
    python bench/check_remote_llama_server.py --url http://127.0.0.1:8080/v1 --url http://127.0.0.1:8081/v1

For each server (loopback addresses only: the script refuses any other): the model list, a
greedy chat and the same chat streamed, a greedy completion from text and from token ids, a stop
string, usage counts, a seed asked twice, and how it answers mistakes (an unknown model, a
negative temperature, broken JSON). Prints one line per check and server, then the greedy replies
of all servers side by side (MATCH when equal: with equal logits, llama.cpp's greedy choice and
ours are the same token). Exit status 1 if a check fails on any server or the greedy replies differ.

llama-server is built from the same llama.cpp sources as bench/build_llama_bench.sh builds
llama-bench (the sdist of llama-cpp-python), with -DLLAMA_BUILD_SERVER=ON and the target
llama-server.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from urllib.parse import urlparse

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "Once upon a time"


def loopback_only(url: str) -> str:
    host = urlparse(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        raise SystemExit(f"{url}: cannot resolve {host!r}")
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"{url}: only servers on this machine (127.0.0.1, ::1, localhost) are checked")
    return url.rstrip("/")


def check_server(url: str, n: int) -> tuple[dict[str, str], dict[str, str]]:
    """{check: "ok" or what went wrong}, {name: greedy text} for one server."""
    import httpx
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
    results: dict[str, str] = {}
    texts: dict[str, str] = {}

    def check(name, fn):
        try:
            outcome = fn()
            results[name] = "ok" if outcome in (None, True) else str(outcome)
        except Exception as err:  # one line per failure, the rest of the checks go on
            results[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    model = client.models.list().data[0].id

    def chat():
        out = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=n)
        texts["chat"] = out.choices[0].message.content
        u = out.usage
        return u.total_tokens == u.prompt_tokens + u.completion_tokens or f"usage {u}"

    def chat_stream():
        chunks = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=n, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text == texts.get("chat") or f"streamed {text!r} != {texts.get('chat')!r}"

    def completion():
        out = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=n)
        texts["completion"] = out.choices[0].text

    def completion_tokens():
        tokens = httpx.post(url.removesuffix("/v1") + "/tokenize", json={"content": PROMPT}).json().get("tokens")
        if not tokens:
            return "no /tokenize endpoint (llama-server's): skipped"
        out = client.completions.create(model=model, prompt=tokens, temperature=0, max_tokens=n)
        return out.choices[0].text == texts.get("completion") or f"{out.choices[0].text!r}"

    def stop():
        words = (texts.get("chat") or "").split()
        if len(words) < 3:
            return "reply too short for a stop check"
        out = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=n, stop=[words[2]])
        got = out.choices[0].message.content
        want = texts["chat"][:texts["chat"].index(words[2])]
        return (got == want and out.choices[0].finish_reason == "stop") or f"{got!r} ({out.choices[0].finish_reason})"

    def seed():
        def ask():
            return client.chat.completions.create(model=model, messages=QUESTION, temperature=1.0, max_tokens=n,
                                                  seed=42).choices[0].message.content
        a, b = ask(), ask()
        return a == b or f"{a!r} != {b!r}"

    def mistakes():
        answers = []
        raw = httpx.post(url + "/chat/completions", content=b"{broken", headers={"Content-Type": "application/json"})
        answers.append(f"broken JSON {raw.status_code}")
        for label, body in (("unknown model", {"model": "no-such-model", "messages": QUESTION, "max_tokens": 2}),
                            ("temperature -1", {"model": model, "messages": QUESTION, "max_tokens": 2, "temperature": -1})):
            answers.append(f"{label} {httpx.post(url + '/chat/completions', json=body).status_code}")
        return "; ".join(answers)  # differences are shown, not judged: the servers' choices differ

    for name, fn in (("chat", chat), ("chat stream", chat_stream), ("completion", completion),
                     ("completion from token ids", completion_tokens), ("stop", stop), ("seed", seed),
                     ("mistakes", mistakes)):
        check(name, fn)
    return results, texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", action="append", required=True, help="base URL ending in /v1 (repeatable)")
    ap.add_argument("-n", type=int, default=32, help="tokens per reply (default 32)")
    args = ap.parse_args()
    urls = [loopback_only(u) for u in args.url]
    failed = False
    texts = {}
    for url in urls:
        results, texts[url] = check_server(url, args.n)
        for name, outcome in results.items():
            bad = outcome != "ok" and name != "mistakes" and "skipped" not in outcome
            failed |= bad
            print(f"{'FAIL' if bad else 'ok  '} {url} {name}: {outcome}")
    for kind in ("chat", "completion"):
        replies = {url: texts[url].get(kind) for url in urls}
        same = len(set(replies.values())) == 1
        failed |= not same
        print(f"{'MATCH' if same else 'DIFFER'} greedy {kind}")
        for url, text in replies.items():
            print(f"    {url}: {text!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
