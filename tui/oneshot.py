"""`llamachat -m MODEL (-p TEXT | -f FILE) ... --no-tui`: one completion, like llama.cpp's
`llama-cli -no-cnv`, streamed to stdout.

Owns what the one-shot command does with the flags tui/cli.py parsed: the model from the library
(a name, a path, or the default), settings merged flag > library entry > llama.cpp default, the
prompt (-p with llama.cpp's escapes, or -f: a path or a shipped prompt name, one trailing newline
dropped), special tokens in it parsed and BOS added as the vocabulary says, only the generated
text on stdout (the prompt first with --echo), flushed piece by piece; -r reverse prompts act as
stop strings here (there is no user to hand over to): the completion ends before them, and they
are not printed; llama.cpp's timing lines on stderr with --verbose.

Ctrl-C while generating leaves what was printed and lets KeyboardInterrupt reach tui/cli.py
(exit 130, no traceback). Never imports Textual.
"""

from __future__ import annotations

import sys

from llamachat.runtime.errors import UserError
from llamachat.runtime.params import SamplingParams, check_setting

# argparse dest -> the flag as the user typed it (for error messages)
FLAGS = {
    "n_predict": "-n/--n-predict", "n_ctx": "-c/--ctx-size", "temp": "--temp", "top_k": "--top-k",
    "top_p": "--top-p", "min_p": "--min-p", "typical_p": "--typical", "repeat_penalty": "--repeat-penalty",
    "repeat_last_n": "--repeat-last-n", "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty", "mirostat": "--mirostat", "mirostat_eta": "--mirostat-lr",
    "mirostat_tau": "--mirostat-ent", "seed": "-s/--seed", "threads": "-t/--threads",
}


def check_flags(args) -> None:
    """Every value given on the command line, before anything loads: one sentence naming the flag."""
    for dest, flag in FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        try:
            check_setting(dest, value)
        except ValueError as err:
            raise UserError(f"{flag}: {err}") from None
    if getattr(args, "n_ctx", None) is not None and args.n_ctx <= 0:
        raise UserError(f"-c/--ctx-size: the context size must be a positive number of tokens, got {args.n_ctx}")
    if getattr(args, "threads", None) is not None and args.threads <= 0:
        raise UserError(f"-t/--threads: the number of threads must be at least 1, got {args.threads}")
    if getattr(args, "n_keep", 0) is not None and args.n_keep < -1:
        raise UserError(f"--keep: must be -1 (the whole prompt) or a number of tokens, got {args.n_keep}")
    if args.prompt is not None and args.file is not None:
        raise UserError("-p/--prompt and -f/--file both give the prompt: use one of them")


def process_escapes(text: str) -> str:
    """llama.cpp's string_process_escapes for -p and -r: \\n \\r \\t \\' \\" \\\\ and \\xNN."""
    if "\\" not in text:
        return text
    src = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    i, n = 0, len(src)
    simple = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("'"): b"'", ord('"'): b'"', ord("\\"): b"\\"}
    while i < n:
        c = src[i]
        if c == 0x5C and i + 1 < n:
            i += 1
            e = src[i]
            if e in simple:
                out += simple[e]
            elif e == ord("x") and i + 2 < n and all(chr(h) in "0123456789abcdefABCDEF" for h in src[i + 1:i + 3]):
                out.append(int(src[i + 1:i + 3], 16))
                i += 2
            else:
                out += bytes([0x5C, e])
        else:
            out.append(c)
        i += 1
    return out.decode("utf-8", "surrogateescape")


def read_prompt(args) -> str:
    """The prompt text: -p (escapes processed) or -f (a path or a shipped prompt's name)."""
    if args.prompt is not None:
        return process_escapes(args.prompt)
    from llamachat.prompts import find_prompt_file, shipped_prompt_names

    path = find_prompt_file(args.file)
    if path is None:
        raise UserError(f"{args.file}: no such prompt file (give a path, or one of the shipped prompts: "
                        f"{', '.join(shipped_prompt_names())})")
    from llamachat.runtime.tokenizer.tokenizer import MAX_PROMPT_BYTES, read_text_input

    data = read_text_input(path, "a prompt file", MAX_PROMPT_BYTES)  # /dev/zero, a FIFO, 5 GB: refused at once
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: the prompt file is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})") from None
    return text[:-1] if text.endswith("\n") else text  # llama.cpp drops one trailing newline


def _write(stream, text: str) -> None:
    if text:
        try:
            stream.write(text)
        except UnicodeEncodeError:  # raw bytes from a \xNN escape: shown as U+FFFD
            stream.write(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        stream.flush()


def run(args) -> int:
    from llamachat.tui.conversation import merged_settings, parse_logit_bias, resolve_model

    check_flags(args)
    prompt_text = read_prompt(args)
    bias = parse_logit_bias(getattr(args, "logit_bias", None))
    reverse = [process_escapes(r) for r in (getattr(args, "reverse_prompt", None) or []) if r]
    entry = resolve_model(args.model)
    settings = merged_settings(args, entry.settings)
    params = SamplingParams().updated(**{k: settings[k] for k in (
        "temp", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
        "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta", "seed")})
    if getattr(entry, "remote", False):
        params = params.updated(logit_bias=tuple(bias.items()), ignore_eos=bool(args.ignore_eos))
        return _run_remote(args, entry, prompt_text, params, settings, reverse)

    from llamachat.runtime.generation.llama_api import Llama, timing_lines

    from .compile_progress import StderrProgress, model_is_warm
    from .engine_worker import warm_up

    threads = settings["threads"] or None  # 0 = all cores
    with StderrProgress():  # a first run compiles the kernels: a line on stderr says so
        llm = Llama(str(entry.path), n_ctx=settings["n_ctx"], n_threads=threads, seed=settings["seed"],
                    context_shift=settings["context_policy"] == "shift", n_keep=int(args.n_keep or 0))
        if not model_is_warm(llm):  # a first run or a format's first use: compile now, with the
            # line showing, rather than between the first words: a batch (the prompt's length, at
            # least 2: every later prompt then finds its kernels), then decode
            n_prompt = len(llm.tokenizer.encode(prompt_text, add_special=True, parse_special=True))
            warm_up(llm, sizes=(max(2, n_prompt), 1))  # (notes the model warm once all is cached)
    for warning in getattr(llm.model, "warnings", []):
        print(f"llamachat: warning: {warning}", file=sys.stderr)
    n_vocab = llm.tokenizer.n_vocab
    for token in bias:
        if not 0 <= token < n_vocab:
            raise UserError(f"--logit-bias: token id {token} is outside the vocabulary (0..{n_vocab - 1})")
    params = params.updated(logit_bias=tuple(bias.items()), ignore_eos=bool(args.ignore_eos))

    from .backends import Finished, GenerationRequest, TextPiece, backend_for

    backend = backend_for(llm)
    request = GenerationRequest(prompt=prompt_text, params=params, n_predict=settings["n_predict"],
                                stop=tuple(reverse), continue_stream=False)
    notice = backend.take_notice()
    if notice:
        print(f"llamachat: {notice}", file=sys.stderr)
    out = sys.stdout
    if args.echo:
        _write(out, prompt_text)
    events = backend.stream(request)
    stats = None
    try:
        for event in events:
            if isinstance(event, TextPiece):
                _write(out, event.text)
            elif isinstance(event, Finished):
                stats = event.stats
    finally:
        events.close()
        if out.isatty():  # the shell's prompt on a line of its own, also after Ctrl-C
            out.write("\n")
            out.flush()
        detail = stats.detail if stats is not None else getattr(llm.generator, "last_stats", None)
        if args.verbose and detail is not None:
            lines = [f"sampler seed: {detail.seed}", f"stop reason: {detail.stop_reason}",
                     *timing_lines(llm.load_ms, detail)]
            print("\n" + "\n".join(lines), file=sys.stderr)
        elif detail is not None and detail.stop_reason == "context_full":
            print(f"\nllamachat: the context is full ({llm.n_ctx()} tokens), so the completion stopped there; "
                  "use a larger -c/--ctx-size, or --context-shift to keep going", file=sys.stderr)
    out.flush()
    return 0


def _run_remote(args, entry, prompt_text: str, params: SamplingParams, settings: dict, reverse: list[str]) -> int:
    """The same completion from a model on an OpenAI-compatible server (/v1/completions)."""
    from .backends import Finished, GenerationRequest, TextPiece
    from .remote_backend import RemoteBackend

    backend = RemoteBackend(entry.base_url, entry.model, api_key_env=entry.api_key_env, name=entry.name)
    out = sys.stdout
    stats = None
    try:
        backend.connect()
        request = GenerationRequest(prompt=prompt_text, params=params, n_predict=settings["n_predict"],
                                    stop=tuple(reverse), continue_stream=False)
        if args.echo:
            _write(out, prompt_text)
        events = backend.stream(request)
        try:
            for event in events:
                if isinstance(event, TextPiece):
                    _write(out, event.text)
                elif isinstance(event, Finished):
                    stats = event.stats
        except KeyboardInterrupt:
            backend.cancel()
            raise
        finally:
            events.close()
            if out.isatty():
                out.write("\n")
                out.flush()
    finally:
        backend.close()
    if args.verbose and stats is not None:
        tps = stats.tokens_per_second
        print(f"\nstop reason: {stats.stop_reason}\nremote: {entry.base_url} model {backend.model}: prompt "
              f"{stats.prompt_tokens} tokens, generated {stats.completion_tokens} tokens"
              f"{f' ({tps:.1f} tokens/s)' if tps else ''}", file=sys.stderr)
    out.flush()
    return 0
