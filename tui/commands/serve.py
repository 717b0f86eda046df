"""`llamachat serve [-m MODEL] [--host 127.0.0.1] [--port 8080] [-t N] [-c N] [--api-key KEY]`:
an OpenAI-compatible HTTP server for other programs (tui/server/).

Binds 127.0.0.1 unless told otherwise; the key comes from --api-key or LLAMACHAT_API_KEY and
is never printed. Prints the URL and how to point an OpenAI client at it; Ctrl+C stops it
(open streams end at once, the model is freed).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import sys

from llamachat.runtime.errors import UserError

API_KEY_ENV = "LLAMACHAT_API_KEY"


def configure(parser) -> None:
    parser.add_argument("-m", "--model", help="library model name or path to a .gguf file (default: the library's default); "
                        "requests may name any other library model, which is then loaded in its place")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 = any free port)")
    parser.add_argument("-t", "--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument("-c", "--ctx-size", dest="n_ctx", type=int, help="context size in tokens (default: the model's library setting, else 2048)")
    parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: ${API_KEY_ENV})")
    parser.add_argument("--queue-size", dest="queue_size", type=int, default=8,
                        help="requests that may wait while one runs; more get 503 with Retry-After (default 8)")
    parser.add_argument("--cors-origin", dest="cors_origins", action="append", default=[], metavar="ORIGIN",
                        help="allow browser pages from this origin (e.g. http://localhost:3000, or * for any); repeatable; default: none")
    parser.add_argument("--verbose", action="store_true", help="log request bodies (prompts) and uvicorn's access log")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_args(args) -> str | None:
    """Refuse impossible flags in one sentence; the API key to require (None: none)."""
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, not {args.port}")
    if args.queue_size < 0:
        raise UserError(f"--queue-size must be 0 or more, not {args.queue_size}")
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        source = "--api-key" if args.api_key is not None else f"${API_KEY_ENV}"
        raise UserError(f"{source} is empty: give a key, or leave it unset to serve without one")
    return key.strip() if key is not None else None


def banner(url: str, model_name: str, key_required: bool) -> str:
    base = f"{url}/v1"
    key_shown = f"${API_KEY_ENV}" if key_required else "anything"
    body = json.dumps({"model": model_name, "messages": [{"role": "user", "content": "Hello!"}]})
    curl = f"curl {base}/chat/completions -H 'Content-Type: application/json'"
    if key_required:
        curl += f' -H "Authorization: Bearer ${API_KEY_ENV}"'
    curl += f" -d {shlex.quote(body)}"
    return "\n".join([
        f"llamachat serve: {model_name} at {base} (OpenAI-compatible: /v1/chat/completions, /v1/completions, /v1/models)",
        f"  OpenAI clients: OPENAI_BASE_URL={base} OPENAI_API_KEY={key_shown}",
        f"  Python: OpenAI(base_url=\"{base}\", api_key=\"{'...' if key_required else 'none'}\")",
        f"  try: {curl}",
        "  Ctrl+C stops the server.",
    ])


def run(args) -> int:
    from llamachat.model_store.library import Library
    from llamachat.tui.conversation import merged_settings, resolve_model
    from llamachat.tui.server.app import bind_socket, create_app, make_server, server_logging, url_of
    from llamachat.tui.server.host import ModelHost, ServedModel

    key = check_args(args)
    entry = resolve_model(args.model)
    merged_settings(args, entry.settings)  # -c / -t checked by the CLI's rules before anything starts
    library_file = Library.load().file
    sock = bind_socket(args.host, args.port)
    if not _is_loopback(args.host):
        warning = f"llamachat: warning: listening on {args.host}: other machines can reach this server"
        print(warning + ("" if key else "; without --api-key anyone who reaches it can use it"), file=sys.stderr)
    host = ModelHost(ServedModel(entry.name, entry.path, dict(entry.settings)), args, library_file,
                     queue_size=args.queue_size, verbose=args.verbose)
    try:
        with server_logging():
            print(f"llamachat serve: loading {entry.name} (a first run compiles the engine: a minute or more)",
                  file=sys.stderr, flush=True)
            host.start()
            app = create_app(host, api_key=key, cors_origins=args.cors_origins, verbose=args.verbose)
            server = make_server(app, host, verbose=args.verbose)
            print(banner(url_of(sock), entry.name, key is not None), flush=True)
            server.run(sockets=[sock])
    finally:
        host.close()
        sock.close()
    return 0

