"""`llamachat perplexity -m MODEL -f TEXT [-c 256] [--chunks N] [-b N] [-t N]`, like llama-perplexity.

Running values `[1]x,[2]y,...` after each chunk and the last line
`Final estimate: PPL = X +/- Y` go to stdout; what is being done, to stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from llamachat.runtime.errors import UserError


def configure(parser) -> None:
    parser.add_argument("-m", "--model", help="library model name or path to a .gguf file (default: the library's default model)")
    parser.add_argument("-f", "--file", required=True, help="text file to measure (UTF-8)")
    parser.add_argument("-c", "--ctx-size", dest="n_ctx", type=int, default=512, help="tokens per chunk (default 512, as llama-perplexity)")
    parser.add_argument("--chunks", dest="n_chunks", type=int, default=-1, help="score at most this many chunks (default: all)")
    parser.add_argument("-b", "--batch-size", dest="n_batch", type=int, default=2048, help="tokens per evaluation call (default 2048, capped at the context size)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")


def model_path(name_or_path: str | None) -> Path:
    from llamachat.model_store.library import Library

    return Path(Library.load().resolve(name_or_path).path)


def run(args) -> int:
    from llamachat.runtime.model.model import load_model
    from llamachat.runtime.generation.perplexity import perplexity
    from llamachat.runtime.tokenizer.tokenizer import Tokenizer

    from llamachat.runtime.tokenizer.tokenizer import read_text_input

    try:
        text = read_text_input(args.file, "a text file").decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{args.file}: not valid UTF-8 text (byte offset {e.start})") from None
    if args.n_ctx <= 0:
        raise UserError(f"-c must be a positive number of tokens, not {args.n_ctx}")
    if args.n_batch <= 0:
        raise UserError(f"-b must be a positive number of tokens, not {args.n_batch}")
    n_batch = min(args.n_batch, args.n_ctx)
    if args.n_ctx % n_batch:
        raise UserError(f"the context size ({args.n_ctx}) must be a multiple of the batch size ({n_batch})")

    path = model_path(args.model)
    model = load_model(path, n_ctx=args.n_ctx, n_threads=args.threads, n_batch=n_batch)
    tok = Tokenizer.from_gguf(model.gguf)
    t0 = time.perf_counter()
    tokens = tok.encode(text, add_special=True, parse_special=False)
    print(f"perplexity: tokenizing the input took {time.perf_counter() - t0:.2f} s; {len(tokens)} tokens", file=sys.stderr)
    n_max = len(tokens) // args.n_ctx
    n = n_max if args.n_chunks < 0 else min(args.n_chunks, n_max)
    print(f"perplexity: calculating perplexity over {n} chunks, n_ctx={args.n_ctx}, batch_size={n_batch}, "
          f"threads={model.n_threads}", file=sys.stderr)

    def on_chunk(i, value):
        print(f"[{i}]{value:.4f},", end="", flush=True)

    result = perplexity(model, tokens, args.n_ctx, args.n_chunks, bos_id=tok.bos_id if tok.add_bos else None, on_chunk=on_chunk)
    print()
    print(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.stderr:.5f}", flush=True)
    return 0
