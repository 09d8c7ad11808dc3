"""The command line: `python -m mka_core <command>`. Every command defaults to the bundled model and
the built-in corpus, prints progress on stderr, writes machine-readable output, and exits non-zero
with a one-line error on bad input."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .errors import MkaInputError

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2


class Progress:
    """Prints `[ 42%] message` lines on stderr, at most one per second plus the last one."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.last = 0.0

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if self.quiet or (fraction < 1.0 and now - self.last < 1.0):
            return
        self.last = now
        print(f"[{fraction * 100:3.0f}%] {message}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="bundled:smollm2-135m",
        help="bundled:smollm2-135m (default), a model folder, a .gguf file, a hub id, or tiny:llama",
    )
    p.add_argument(
        "--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps"
    )
    p.add_argument(
        "--dtype", default="auto", help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16, fp16"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for tiny models, sampling and k-means")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", default="builtin", help="builtin (default), a .txt/.jsonl file or an MMLU folder"
    )
    p.add_argument("--samples", type=_positive_int, default=128, help="calibration samples N (128)")
    p.add_argument("--tokens", type=_positive_int, default=128, help="tokens per sample T (128)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--eval-data", default="builtin", help="evaluation text (default: built-in split)"
    )
    p.add_argument("--budget", type=_positive_int, default=8192, help="evaluation tokens (8192)")
    p.add_argument("--window", type=_positive_int, default=512, help="evaluation window (512)")


def _load(args, progress):
    from .models import load_model

    return load_model(
        args.model, device=args.device, dtype=args.dtype, seed=args.seed, progress=progress
    )


# ---------------------------------------------------------------------------------------------
# commands


def cmd_analyze(args) -> int:
    from .files import atomic_dir, check_out_dir
    from .pipeline import analyze

    progress = Progress(args.quiet)
    check_out_dir(args.out, args.overwrite, protect=[args.model])
    loaded = _load(args, progress)
    t0 = time.perf_counter()
    result = analyze(
        loaded,
        data=args.data,
        n_samples=args.samples,
        max_tokens=args.tokens,
        pooling=args.pooling,
        tokens_per_sample=args.tokens_per_sample,
        batch_size=args.batch_size,
        k=args.k,
        d=args.d,
        seed=args.seed,
        progress=progress,
    )
    sim = result.similarity
    sim.timings["total"] = time.perf_counter() - t0
    with atomic_dir(args.out, args.overwrite, protect=[args.model]) as tmp:
        sim.save(tmp)
    summary = {
        "out": str(Path(args.out)),
        "n_layers": sim.n_layers,
        "measures": list(sim.matrices) + ["bi"],
        "timings": {k: round(v, 3) for k, v in sim.timings.items()},
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from .data import load_documents, make_eval_windows
    from .evaluate import evaluate_model, save_results

    progress = Progress(args.quiet)
    loaded = _load(args, progress)
    docs = load_documents(args.eval_data, "evaluation")
    windows = make_eval_windows(
        loaded.tokenizer, docs, budget_tokens=args.budget, window=args.window
    )
    result = evaluate_model(
        loaded.model,
        loaded.tokenizer,
        windows,
        label=args.model,
        with_speed=not args.no_speed,
        with_generations=not args.no_generations,
        mmlu_folder=args.mmlu,
        meta={"model": args.model, "eval_data": args.eval_data},
        progress=progress,
    )
    if args.out:
        save_results(args.out, [result])
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_table([result.to_dict()])
    return 0


def _print_table(rows: list[dict]) -> None:
    cols = ["label", "n_layers", "params", "perplexity", "kl", "top1", "decode_tps"]
    print("  ".join(f"{c:>12}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>12.4g}" if isinstance(v, float) else f"{str(v)[-12:]:>12}")
        print("  ".join(cells))


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mka_core",
        description="MKA Studio: layer similarity, merge plans (MKA) and intra-module pruning (TransAct).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("analyze", help="capture activations and compute layer-similarity matrices")
    _add_model_args(p)
    _add_calib_args(p)
    p.add_argument("--pooling", default="mean", choices=["mean", "last", "tokens"])
    p.add_argument(
        "--tokens-per-sample",
        type=_positive_int,
        default=8,
        help="rows per sample (tokens pooling)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument(
        "--k", type=int, default=8, help="clusters per layer for NPIB (8, capped at N/8)"
    )
    p.add_argument("--d", type=int, default=4, help="diffusion-map dimensions (4)")
    p.add_argument("--out", default="mka-analysis", help="output folder (default ./mka-analysis)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("evaluate", help="perplexity, size, speed and generations of a model")
    _add_model_args(p)
    _add_eval_args(p)
    p.add_argument(
        "--mmlu", default=None, help="an MMLU-format folder for multiple-choice accuracy"
    )
    p.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing")
    p.add_argument("--no-generations", action="store_true", help="skip the sample generations")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--out", default=None, help="also write the result JSON to this file")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    _quiet_libraries()
    try:
        return args.func(args)
    except MkaInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if args.debug:
            raise
        print(f"error: {e.strerror or e} ({e.filename or ''})", file=sys.stderr)
        return 1
    except Exception as e:  # a bug, not bad input: still one line, the traceback on --debug
        if args.debug:
            raise
        print(
            f"error: internal error {type(e).__name__}: {e} (rerun with --debug)", file=sys.stderr
        )
        return 1
