"""Time to the first token after reopening a long chat, with and without its saved context
(instant resume), through the app's engine worker (tui/engine_worker.Engine) as the app runs it.

    python bench/resume_first_token.py -m MODEL.gguf [--tokens 1500] [-c 2048] [--runs 3]

A chat of about --tokens tokens is built from the package's built-in text (model_store/
quality_text.txt, split into turns), answered once (its context then saved as leaving the chat
saves it), and then "reopened" --runs times in a fresh engine, each time once with the saved
context and once without, with one more user message: the time from the request to the first
token of the reply is printed for both. The kernels are compiled before timing (Engine.load
warms them up), and the state file is read from the page cache, as after a recent save.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def chat_of(n_tokens: int, llm) -> list[dict]:
    text = (Path(__file__).resolve().parents[1] / "model_store" / "quality_text.txt").read_text()
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 80]
    messages = [{"role": "system", "content": "You are a knowledgeable assistant."}]
    i = 0
    while True:
        messages.append({"role": "user", "content": f"Tell me more, please ({i + 1})."})
        messages.append({"role": "assistant", "content": paragraphs[i % len(paragraphs)]})
        i += 1
        n = len(llm.chat_template.encode(messages, llm.tokenizer, add_generation_prompt=False))
        if n >= n_tokens:
            return messages


def first_token_seconds(engine, messages, chat_key, max_tokens=4):
    from llamachat.tui.conversation import Request

    start = time.perf_counter()
    first: list[float] = []

    def on_text(_):
        if not first:
            first.append(time.perf_counter() - start)

    result = engine.generate(Request(messages=messages), {"temperature": 0, "max_tokens": max_tokens}, on_text,
                             chat_key=chat_key)
    if result.error:
        sys.exit(f"resume_first_token: {result.error}")
    stats = engine.llm.generator.last_stats
    return first[0], (stats.prompt_eval_tokens, stats.prompt_ms / 1e3), result.text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("-c", "--ctx", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    from llamachat.tui.engine_worker import Engine
    from llamachat.tui.resume import ResumeStates

    folder = Path(tempfile.mkdtemp(prefix="resume-bench-"))
    engine = Engine()
    engine.load(args.model, n_ctx=args.ctx)
    engine.resume = ResumeStates(folder)
    messages = chat_of(args.tokens, engine.llm)
    held = messages[:-1]  # the chat as it was held: its last reply is the model's own
    *_, reply = first_token_seconds(engine, held, chat_key=1, max_tokens=48)
    messages = held + [{"role": "assistant", "content": reply},
                       {"role": "user", "content": "Thank you. What else should I know?"}]
    n_chat = len(engine.llm.chat_template.encode(messages, engine.llm.tokenizer, add_generation_prompt=True))
    engine.save_state()  # what leaving the chat does
    size = engine.resume.path_for(1).stat().st_size
    print(f"{args.model}: a chat of {n_chat} tokens with the new message, its saved context {size / 2**20:.1f} MiB")

    with_state, without = [], []
    for _ in range(args.runs):
        for saved in (True, False):
            engine.load(args.model, n_ctx=args.ctx)  # a fresh context: the app restarted, or another chat was used
            engine.resume = ResumeStates(folder) if saved else None
            seconds, (evaluated, prompt_s), _ = first_token_seconds(engine, messages, chat_key=1)
            (with_state if saved else without).append(seconds)
            # what is not prompt processing is the state's load (and one sampling)
            print(f"  {'with' if saved else 'without'} the saved context: first token after {seconds:.2f} s "
                  f"({evaluated} prompt tokens evaluated in {prompt_s:.2f} s)")
            if saved:
                engine.resume = None  # the file stays as saved (the reply is not saved into it)
    print(f"median of {args.runs}: with {statistics.median(with_state):.2f} s, without {statistics.median(without):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
