#!/usr/bin/env python3
"""Greedy continuations of llamachat and llama.cpp's llama-cli side by side.

    python bench/compare_greedy.py --llama-cli PATH -m FILE [-m FILE...] [--no-repack]

For each file and each prompt of the reference data's `greedy` list (../shared/reference
/smollm2.json, or --prompts FILE with one prompt per line): `llamachat -p PROMPT -n 32 --temp 0
--no-tui` against `llama-cli -p PROMPT -n 32 --temp 0 -fa -no-cnv` (flash attention: the F16
attention our engine replays). MATCH, or both texts. llama.cpp repacks Q4_0 and Q4_K weights on
AVX2 CPUs unless --no-repack; its summation order then differs (see runtime/quants/matmul.py).
`bash bench/build_llama_bench.sh` builds llama-cli too. Exit status 1 if any pair differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "smollm2.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cli", required=True, help="path to a llama-cli binary")
    ap.add_argument("-m", "--model", action="append", required=True, help=".gguf file (repeatable)")
    ap.add_argument("--prompts", help="a text file of prompts, one per line (default: the reference's)")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--no-repack", action="store_true", help="pass -nr to llama-cli")
    args = ap.parse_args()
    if args.prompts:
        prompts = [p for p in Path(args.prompts).read_text().splitlines() if p.strip()]
    else:
        prompts = [case["prompt"] for case in json.loads(REFERENCE.read_text())["greedy"]]
    differ = 0
    for model in args.model:
        for prompt in prompts:
            cli = [args.llama_cli, "-m", model, "-p", prompt, "-n", str(args.n), "--temp", "0", "-fa", "-no-cnv",
                   "--no-display-prompt", "--no-warmup", "-t", "2"] + (["-nr"] if args.no_repack else [])
            theirs = subprocess.run(cli, capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
            theirs = theirs.rstrip().removesuffix("[end of text]").rstrip()  # llama-cli's end-of-sequence mark
            ours = subprocess.run(["llamachat", "-m", model, "-p", prompt, "-n", str(args.n), "--temp", "0", "--no-tui",
                                   "-t", "2"], capture_output=True, text=True).stdout.rstrip()
            same = theirs == ours
            differ += not same
            print(f"{Path(model).name}  {prompt[:30]!r}: {'MATCH' if same else 'DIFF'}")
            if not same:
                print(f"    llama.cpp: {theirs!r}\n    llamachat: {ours!r}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
