"""`llamachat tokenize -m MODEL (-p TEXT | -f FILE) [--ids] [--no-bos] [--parse-special]`, like llama-tokenize.

Prints one `    ID -> 'PIECE'` line per token (the piece's raw bytes, as llama-tokenize writes
them), or with --ids the list `[1, 2, 3]`. As in llama-tokenize, escapes in the prompt (\\n, \\t,
\\xHH, ...) are processed unless --no-escape, BOS is added when the vocabulary wants it unless
--no-bos, and special tokens written in the text are parsed (--parse-special, the default;
--no-parse-special turns it off). -m takes a library model name or a path to a .gguf file.

Only the GGUF reader and the tokenizer are imported: no Textual (numba only for words of
hundreds of characters without a break).
"""

from __future__ import annotations

import sys
from pathlib import Path

from llamachat.runtime.errors import UserError


def configure(parser) -> None:
    parser.add_argument("-m", "--model", help="library model name or path to a .gguf file (default: the library's default model)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--prompt", help="text to tokenize")
    source.add_argument("-f", "--file", help="file whose text to tokenize (UTF-8)")
    source.add_argument("--stdin", action="store_true", help="tokenize standard input")
    parser.add_argument("--ids", action="store_true", help="print only the ids, as [1, 2, 3]")
    parser.add_argument("--no-bos", action="store_true", help="do not add the BOS token")
    special = parser.add_mutually_exclusive_group()
    special.add_argument("--parse-special", dest="parse_special", action="store_true", default=True,
                         help="turn special-token text such as <|im_start|> into its token (the default, as in llama-tokenize)")
    special.add_argument("--no-parse-special", dest="parse_special", action="store_false", help="keep special-token text as plain text")
    parser.add_argument("--no-escape", action="store_true", help="do not process escapes (\\n, \\t, ...) in the prompt")
    parser.add_argument("--show-count", action="store_true", help="print the number of tokens at the end")


def process_escapes(data: bytes) -> bytes:
    """llama.cpp's string_process_escapes: \\n \\r \\t \\' \\" \\\\ and \\xHH; others stay as written."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c == 0x5C and i + 1 < n:  # backslash
            i += 1
            e = data[i]
            simple = {ord("n"): 0x0A, ord("r"): 0x0D, ord("t"): 0x09, ord("'"): 0x27, ord('"'): 0x22, ord("\\"): 0x5C}
            if e in simple:
                out.append(simple[e])
            elif e == ord("x") and i + 2 < n and all(chr(h) in "0123456789abcdefABCDEF" for h in data[i + 1 : i + 3]):
                out.append(int(data[i + 1 : i + 3], 16))
                i += 2
            else:
                out += bytes((0x5C, e))
        else:
            out.append(c)
        i += 1
    return bytes(out)


def _read_prompt(args) -> tuple[bytes, str]:
    if args.prompt is not None:
        return args.prompt.encode("utf-8", "surrogateescape"), "the prompt"
    from llamachat.runtime.tokenizer.tokenizer import read_text_input

    if args.stdin:
        return read_text_input(None, "standard input", stream=sys.stdin.buffer), "standard input"
    from llamachat.prompts import find_prompt_file

    path = find_prompt_file(args.file)
    if path is None:
        raise UserError(f"{args.file}: no such file")
    return read_text_input(path, "a text file"), str(args.file)


def resolve_model_path(name_or_path: str | None) -> Path:
    """-m through the model library when there is one, else as a path."""
    try:
        from llamachat.model_store.library import Library
    except ImportError:
        Library = None
    if Library is not None:
        return Path(Library.load().resolve(name_or_path).path)
    if name_or_path is None:
        raise UserError("no model given; pass -m FILE.gguf")
    return Path(name_or_path).expanduser()


def run(args) -> int:
    from llamachat.runtime.tokenizer.tokenizer import Tokenizer, decode_utf8

    raw, what = _read_prompt(args)
    if not args.no_escape:
        raw = process_escapes(raw)
    text = decode_utf8(raw, what)
    tok = Tokenizer.from_gguf(resolve_model_path(args.model))
    for w in tok.warnings:
        print(f"llamachat: warning: {w}", file=sys.stderr)
    add_special = tok.add_bos and not args.no_bos
    ids = tok.encode(text, add_special=add_special, parse_special=args.parse_special)
    out = sys.stdout.buffer
    sys.stdout.flush()
    if args.ids:
        out.write(("[" + ", ".join(map(str, ids)) + "]\n").encode())
    else:
        for tid in ids:
            out.write(f"{tid:6d} -> '".encode() + tok.token_to_piece(tid, special=True) + b"'\n")
    if args.show_count:
        out.write(f"Total number of tokens: {len(ids)}\n".encode())
    out.flush()
    return 0
