"""`llamachat import SOURCE [--name N] [--quant TYPE] [--lora ADAPTER] [--report]`: add a
model to the library from a GGUF file, a Hugging Face folder or a Meta checkpoint folder,
converted to GGUF F16 (and quantized with --quant). The work is
model_store.importers.run_import; this module draws its progress (one line per tensor, as
llama.cpp's converters log) and the closing summary.
"""

from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="a .gguf file, a Hugging Face model folder (config.json), a Meta checkpoint folder (params.json) or an old llama.cpp ggml/ggmf/ggjt .bin file")
    parser.add_argument("--name", help="library name (default: made from SOURCE and the quant type)")
    parser.add_argument("--quant", metavar="TYPE", help="quantize after converting: Q4_K_M, Q8_0, Q4_0, ... (as llama-quantize names them)")
    parser.add_argument("--lora", metavar="ADAPTER", help="merge this PEFT LoRA adapter folder into the weights first")
    parser.add_argument("--report", action="store_true", help="with --quant: measure the result against its F16 source on a built-in text (perplexity of both, mean KL divergence, top-token agreement, as llama-perplexity --kl-divergence) and keep the figures in the library")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-tensor log")


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} MB"


class TensorLog:
    """`progress(stage, done, total, what)` -> one stderr line per tensor, like the converters'
    `[  3/ 20] blk.0.attn_q.weight BF16 -> F16 [64, 64]`."""

    def __init__(self, stream, quiet: bool):
        self.stream, self.quiet, self.last_stage, self.last_tenth = stream, quiet, None, -1

    def __call__(self, stage: str, done: int, total: int, what: str = "") -> None:
        if self.quiet:
            return
        if stage != self.last_stage:
            self.last_stage, self.last_tenth = stage, -1
            print(f"{stage}:", file=self.stream)
        if stage in ("convert", "quantize"):
            if what:
                print(f"  [{done + 1:>{len(str(total))}}/{total}] {what}", file=self.stream, flush=True)
        elif stage == "report":  # a bar over both models' chunks, redrawn in place on a terminal
            width = 30
            filled = done * width // max(total, 1)
            bar = f"  [{'#' * filled}{'-' * (width - filled)}] {done}/{total} chunks  {what}"
            if self.stream.isatty():
                print("\r" + bar + "\x1b[K", end="\n" if done >= total else "", file=self.stream, flush=True)
            else:
                print(bar, file=self.stream, flush=True)
        elif stage == "copy":  # byte counts: a line per tenth
            tenth = done * 10 // max(total, 1)
            if tenth != self.last_tenth:
                self.last_tenth = tenth
                print(f"  {what} {_mb(done)} / {_mb(total)}", file=self.stream, flush=True)
        elif what:
            print(f"  {what}", file=self.stream, flush=True)


def run(args) -> int:
    from llamachat.model_store.importers import run_import

    log = TensorLog(sys.stderr, args.quiet)
    result = run_import(args.source, name=args.name, quant=args.quant, lora=args.lora, progress=log, report=args.report)
    for note in result.notes:
        print(f"note: {note}")
    sizes = []
    if result.source_size is not None:
        sizes.append(f"source {_mb(result.source_size)}")
    if result.f16_size is not None:
        sizes.append(f"F16 {_mb(result.f16_size)}")
    sizes.append(f"stored {_mb(result.size)}")
    print(f"Imported {result.entry.name} ({result.kind}; {', '.join(sizes)}) into {result.path}.")
    if result.report:
        print_report(result.report, result.path.stem if args.quant is None else args.quant.upper())
    return 0


def print_report(rep: dict, quant: str, source: str = "F16 source") -> None:
    """importers.quality_report's figures as a small table (import and quantize --report)."""
    print(f"Perplexity on the built-in text (llama-perplexity --kl-divergence's method, context {rep['n_ctx']}, {rep['tokens']} tokens scored):")
    print(f"  {'':<12} {'size':>10}  {'perplexity':>10}")
    print(f"  {source:<12} {_mb(rep['f16_size']):>10}  {rep['f16']:10.4f}")
    print(f"  {quant:<12} {_mb(rep['result_size']):>10}  {rep['result']:10.4f}  ({100 * (rep['result'] / rep['f16'] - 1):+.2f}%)")
    print(f"  mean KL divergence from the source: {rep['kl']:.6f} +/- {rep['kl_stderr']:.6f} nats per token")
    print(f"  same top token as the source:       {100 * rep['top_agree']:.2f}%")
