"""Deployment commands: `export-gguf` writes a model (a folder `apply --out` wrote, a .gguf, the
bundled model, a tiny model) as a quantized GGUF file that llama.cpp runs."""

from __future__ import annotations

import argparse
import json

from mka_core.cli.commands import Progress
from mka_core.engine.quant import QUANT_HELP, QUANT_TYPES, READ_ONLY_TYPES
from mka_core.workflows.gguf_export import export_gguf
from mka_core.workflows.gguf_layout import families_line


def quant_help() -> str:
    """The --quant choices with their one-liners (argparse help: '%' doubled)."""
    lines = "; ".join(f"{q}: {QUANT_HELP[q]}" for q in QUANT_TYPES)
    return (
        f"{lines}. Norms and biases stay F32; a matrix whose rows are not whole blocks of 32 is "
        f"F16. ({', '.join(READ_ONLY_TYPES)} cannot be written by the gguf package.)"
    ).replace("%", "%%")


def add_export_gguf(sub) -> None:
    p = sub.add_parser(
        "export-gguf",
        help="write a model as a quantized GGUF file (llama.cpp)",
        description=f"Write a model as one GGUF file, tensor by tensor (memory holds about one "
        f"tensor). Families: {families_line()}.",
    )
    p.add_argument(
        "--model",
        default="bundled:smollm2-135m",
        help="a model folder (e.g. what apply --out wrote), a .gguf file, bundled:smollm2-135m "
        "(default) or tiny:<family>",
    )
    p.add_argument("--quant", required=True, metavar="Q", help=quant_help())
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_export_gguf)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    progress = Progress(args.quiet)
    summary = export_gguf(
        args.model, args.out, args.quant, progress=progress, overwrite=args.overwrite
    )
    print(json.dumps(summary, indent=2))
    return 0
