"""`make bench` = `python -m bench.run [--quick] [--only quality|cost|app] [--out DIR]`.

Runs the benchmark sections, writes their results (CSV/JSON) to DIR (default bench/results) and
regenerates BENCHMARKS.md with its figures from those files (bench/render.py). Progress goes to
stderr. --quick runs every section on the tiny random model with tiny sizes (a smoke test of the
whole pipeline, about two minutes; its numbers mean nothing) into bench/results/tmp/quick; it
leaves out `scale` and `gguf_memory`, which write models of real sizes (--only runs them).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import common, render
from .common import (
    DEFAULT_OUT,
    FULL,
    QUICK,
    QUICK_OUT,
    REPO,
    load_average,
    machine_info,
    read_json,
    say,
    write_json,
)

SECTIONS = (
    "quality",
    "frontier",
    "frontier_cost",
    "quant",
    "gguf",
    "gguf_memory",
    "distill",
    "cost",
    "app",
    "dtype",
    "scale",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, tiny sizes: a smoke test")
    ap.add_argument("--only", choices=SECTIONS, action="append", help="run only this section")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument(
        "--md",
        type=Path,
        default=None,
        help="where to write the report (default: BENCHMARKS.md at the repository root for a "
        "full run into bench/results, else DIR/BENCHMARKS.md)",
    )
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else FULL
    out = (args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    md = args.md
    if md is None:
        default_full = not args.quick and out == DEFAULT_OUT.resolve()
        md = REPO / "BENCHMARKS.md" if default_full else out / "BENCHMARKS.md"
    big = ("scale", "gguf_memory")  # models of real sizes: not in --quick
    sections = args.only or [s for s in SECTIONS if not (args.quick and s in big)]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    torch.manual_seed(0)
    command = "python -m bench.run" + (" --quick" if args.quick else "")
    if args.only:
        command += "".join(f" --only {s}" for s in args.only)
    machine_path = out / "machine.json"
    record = read_json(machine_path, {}) if args.only else {}
    for stale in ("wall_s", "wall_note"):  # the whole-run total describes a full run only
        record.pop(stale, None)
    info = machine_info()
    record.update(
        {
            "format": "mka-bench-run",
            "version": 1,
            "command": command,
            "settings": settings.to_dict(),
            "machine": info,
        }
    )
    record.setdefault("sections", {})
    say(
        f"{command}: {', '.join(sections)} on {info['cpu']} ({info['cores']} cores, "
        f"{info['device']}), load average {info['load_average_start']}"
    )
    t0 = time.perf_counter()
    for name in sections:
        say(f"== {name}")
        t_sec = time.perf_counter()
        load_before = load_average()
        if name == "quality":
            from .quality import run
        elif name == "frontier":
            from .frontier import run
        elif name == "frontier_cost":
            from .frontier import run_cost as run
        elif name == "quant":
            from .deploy import run
        elif name == "gguf":
            from .deploy import run_gguf as run
        elif name == "gguf_memory":
            from .deploy import run_gguf_memory as run
        elif name == "distill":
            from .distill import run
        elif name == "cost":
            from .cost import run
        elif name == "dtype":
            from .dtype import run
        elif name == "scale":
            from .scale import run
        else:
            from .apptiming import run
        result = run(settings, out)
        result.update(
            date=machine_info()["date"],
            command=command,
            seconds=round(time.perf_counter() - t_sec, 1),
            load_average_before=load_before,
            load_average_after=load_average(),
        )
        record["sections"][name] = result
        write_json(machine_path, record)
    record["machine"]["load_average_end"] = load_average()
    write_json(machine_path, record)
    say("rendering the report")
    render.render(out, md)
    wall = time.perf_counter() - common.T0  # the whole process: imports, sections, rendering
    if not args.only:
        record["wall_s"] = round(wall, 1)
        write_json(machine_path, record)
        render.render(out, md, figures=False)  # again, now with the total wall time in it
    say(f"done in {wall / 60:.1f} min (sections {time.perf_counter() - t0:.0f} s): {out}, {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
