"""`llamachat quantize IN.gguf OUT.gguf TYPE`: convert a GGUF model like llama-quantize.

Prints one line per tensor as llama.cpp's log does (shape, type, size before -> after), a
progress bar while it runs, and the totals at the end. The work is runtime.gguf.quantize_model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llamachat.runtime.gguf.quantize_model import QUANT_TYPES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN.gguf", help="the model to convert")
    parser.add_argument("output", metavar="OUT.gguf", help="the file to write (written atomically)")
    parser.add_argument("type", metavar="TYPE", help="one of: " + ", ".join(QUANT_TYPES))
    parser.add_argument("--allow-requantize", action="store_true",
                        help="allow converting tensors that are already quantized (loses quality)")
    parser.add_argument("--pure", action="store_true",
                        help="use TYPE for every tensor: no per-layer mixes, no special output tensor")
    parser.add_argument("--leave-output-tensor", action="store_true",
                        help="copy output.weight as it is instead of quantizing it")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.add_argument("--report", action="store_true",
                        help="then measure OUT against IN on a built-in text: perplexity of both, mean KL divergence, "
                             "top-token agreement (as llama-perplexity --kl-divergence); IN must be F16/BF16/F32")


def _mib(n: int, decimals: int = 2) -> str:
    return f"{n / 1024 / 1024:8.{decimals}f} MiB"


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llamachat.runtime.gguf.quantize_model import parse_quant_type, quantize_model

    console = Console(highlight=False, soft_wrap=True)
    quant_type = parse_quant_type(args.type)  # an unknown TYPE fails before anything is opened
    if args.report:
        _check_float_source(args.input)
    console.print(f"quantizing [bold]{args.input}[/] to [bold]{args.output}[/] as [bold]{quant_type}[/]")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("tensors", total=None)

        def on_tensor(i, n, plan, before, after):
            shape = ", ".join(f"{d:5d}" for d in plan.shape)
            line = f"[{i + 1:4d}/{n:4d}] {plan.name:36s} - [{shape}], type = {plan.src_type.name:>6s}, "
            if plan.converted:
                note = " (fallback)" if plan.fell_back else ""
                line += f"converting to {plan.dst_type.name}{note} .. size = {_mib(before)} -> {_mib(after)}"
            else:
                line += f"size = {_mib(before, 3)}"
            progress.console.print(line, markup=False)
            progress.update(task, total=n, completed=i + 1, description=plan.name)

        result = quantize_model(args.input, args.output, quant_type, allow_requantize=args.allow_requantize,
                                pure=args.pure, leave_output_tensor=args.leave_output_tensor, force=args.force,
                                on_tensor=on_tensor)

    bpw = lambda n: n * 8.0 / result.n_elements  # noqa: E731
    console.print(f"model size  = {_mib(result.size_before)} ({bpw(result.size_before):.2f} BPW)")
    console.print(f"quant size  = {_mib(result.size_after)} ({bpw(result.size_after):.2f} BPW)")
    n_fallback = sum(p.fell_back for p in result.plans)
    if n_fallback:
        console.print(f"{n_fallback} of {len(result.plans)} tensor(s) required fallback quantization "
                      "(row length not a multiple of the type's block)")
    console.print(f"wrote {result.out_path} in {result.seconds:.1f} s")
    if args.report:
        from llamachat.model_store.importers import quality_report

        from .import_ import print_report

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("measuring", total=None)

            def on_chunk(stage, done, total, what=""):
                progress.update(task, total=total, completed=done, description=f"measuring {what}")

            rep = quality_report(Path(args.input), Path(result.out_path), on_chunk)
        print_report(rep, quant_type, source="source")
    return 0


def _check_float_source(path) -> None:
    from llamachat.runtime.errors import UserError
    from llamachat.runtime.gguf.reader import GGUFFile

    with GGUFFile(path) as g:
        quantized = sorted({t.ggml_type.name for t in g.tensors.values() if t.ggml_type.name not in ("F32", "F16", "BF16")})
    if quantized:
        raise UserError(f"{path}: --report measures a quantization against its float source, but this file is already quantized ({', '.join(quantized)})")
