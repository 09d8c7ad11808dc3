"""Scores from EleutherAI's lm-evaluation-harness (lm-eval) on the model in memory.

The original and the compressed model are scored the same way: lm-eval's own Hugging Face wrapper
(`HFLM`) around the nn.Module, through `lm_eval.simple_evaluate`, with lm-eval's command-line
default seeds, so a run here gives the numbers `lm_eval --model hf` gives for the same weights at
the same batch size. Tasks are lm-eval's built-in ones (their datasets come from the Hugging Face
hub) or task YAMLs in a folder (`tasks_dir`, e.g. reading local JSONL files, for machines without
the hub).

lm-eval is optional and slow to import, so it is imported inside the functions that need it; its
index of the built-in tasks (some 15,000 names, tens of seconds) is built once per process and
folder, and only when a task is not the folder's own. Nothing is written outside the datasets
cache: no request cache, no sample logs, no files in the current directory.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import logging
import math
import random
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn

from mka_core.engine.layerpass import Stack
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.evaluation.generation import check_batch_size, check_model, eval_mode

log = logging.getLogger(__name__)

INSTALL = "pip install lm-eval"
# lm_eval's command-line defaults (--seed 0,1234,1234,1234), so both give the same numbers
SEEDS = {
    "random_seed": 0,
    "numpy_random_seed": 1234,
    "torch_random_seed": 1234,
    "fewshot_random_seed": 1234,
}
TASKS_DIR_HINT = "put a task YAML reading local JSONL files in a folder and pass --tasks-dir"

_LOCK = threading.Lock()  # lm_eval seeds the process-wide generators: one run at a time
_MANAGERS: dict[tuple, object] = {}  # (folder, with built-ins, folder state) -> TaskManager


# ---------------------------------------------------------------------------------------------
# arguments


def parse_tasks(tasks: list[str] | str) -> list[str]:
    """Task names from "a,b" or ["a", "b"]: stripped, in order, each once."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    if not isinstance(tasks, list | tuple) or not all(isinstance(t, str) for t in tasks):
        raise MkaInputError(f"tasks must be names such as 'arc_easy,hellaswag', got {tasks!r}")
    names = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    if not names:
        raise MkaInputError("no lm-eval tasks given; name at least one, e.g. --tasks arc_easy")
    return names


def _folder(tasks_dir) -> Path | None:
    if tasks_dir is None:
        return None
    p = Path(tasks_dir).expanduser()
    if not p.exists():
        raise MkaInputError(f"tasks folder not found: {p}")
    if not p.is_dir():
        raise MkaInputError(f"tasks folder {p} is a file; expected a folder of task YAMLs")
    return p.resolve()


def _check_limit(limit) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise MkaInputError(f"limit must be an integer >= 1 or None, got {limit!r}")


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError:
        raise MkaInputError(
            f"lm-eval tasks need the lm_eval package, which is not installed: {INSTALL}"
        ) from None
    return lm_eval


def require_in_memory(*models) -> list[nn.Module]:
    """The nn.Module of each model; a model streamed from disk is refused in one line."""
    out = []
    for model in models:
        if not isinstance(model, nn.Module | Stack) and hasattr(model, "model"):
            model = model.model  # a LoadedModel
        if isinstance(model, Stack) and model.resident is not None:
            model = model.resident
        if isinstance(model, Stack):
            raise MkaInputError(
                "lm-eval tasks need the model in memory: lm_eval's Hugging Face wrapper (HFLM) "
                "cannot run a model streamed from disk; load it with --no-offload"
            )
        check_model(model)
        out.append(model)
    return out


# ---------------------------------------------------------------------------------------------
# the task index


def _first_line(e: BaseException) -> str:
    text = str(e).strip().strip("\"'") or type(e).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 300 else line[:297] + "..."


def _manager(folder: Path | None, defaults: bool):
    """lm_eval's TaskManager, kept per folder while the folder's YAMLs are unchanged (indexing
    the built-in tasks takes tens of seconds)."""
    from lm_eval.tasks import TaskManager

    state = ()
    if folder is not None:
        files = [f for f in folder.rglob("*") if f.suffix in (".yaml", ".yml", ".py")]
        state = tuple(sorted((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    key = (str(folder), defaults, state)
    if key not in _MANAGERS:
        try:
            tm = TaskManager(
                include_path=str(folder) if folder else None, include_defaults=defaults
            )
        except Exception as e:  # lm_eval's own error, e.g. a folder it cannot walk
            raise MkaInputError(
                f"lm-eval could not index the tasks{f' in {folder}' if folder else ''}: "
                f"{_first_line(e)}"
            ) from e
        if len(_MANAGERS) >= 4:
            _MANAGERS.pop(next(iter(_MANAGERS)))
        _MANAGERS[key] = tm
    return _MANAGERS[key]


def _known(tm, name: str) -> bool:
    return name in tm.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file())


def _resolve(names: list[str], folder: Path | None):
    """The TaskManager that knows every name: the folder's alone when its own tasks (or groups)
    are all that is asked for (seconds), else lm_eval's built-in tasks with the folder's on top."""
    if folder is not None:
        local = _manager(folder, defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    tm = _manager(folder, defaults=True)
    unknown = [n for n in names if not _known(tm, n)]
    if unknown:
        name = unknown[0]
        import lm_eval.tasks

        where = f"lm_eval's built-in tasks ({Path(lm_eval.tasks.__file__).parent})"
        if folder is None:
            where += " (no tasks folder was given)"
        else:
            own = _manager(folder, defaults=False).all_tasks
            where += f" and {folder} ({', '.join(own[:8]) if own else 'no task YAMLs'})"
        close = difflib.get_close_matches(name, tm.all_tasks, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise MkaInputError(
            f"unknown lm-eval task {name!r}: looked in {where}{hint}; "
            f"for a task of your own, put its YAML in a folder and pass --tasks-dir"
        )
    return tm


def check_tasks(
    tasks: list[str] | str | None, tasks_dir: str | Path | None = None, limit: int | None = None
) -> list[str] | None:
    """Check the arguments of `run_tasks` before any model is loaded: the task names (each known
    to lm_eval or the folder), the folder and the limit. None when no tasks were asked for."""
    if tasks is None:
        if tasks_dir is not None or limit is not None:
            raise MkaInputError("a tasks folder or a limit was given without any lm-eval tasks")
        return None
    names = parse_tasks(tasks)
    folder = _folder(tasks_dir)
    _check_limit(limit)
    _import_lm_eval()
    with _LOCK, _quiet():
        _resolve(names, folder)
    return names


# ---------------------------------------------------------------------------------------------
# running


@contextlib.contextmanager
def _logger_level(name: str, level: int):
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def _quiet():
    return _logger_level("lm_eval", logging.WARNING)


@contextlib.contextmanager
def _isolated(model: nn.Module):
    """Run lm_eval without side effects on the caller: the random generators it seeds are given
    back, HFLM's `eval()` is undone and its `tie_weights()` skipped (the model is scored as it
    is), and it does not ask git for the current directory's commit (git prints 'fatal: not a
    git repository' on the terminal outside one; the record does not keep it)."""
    from lm_eval import evaluator

    py_state, np_state = random.getstate(), np.random.get_state()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng())
        stack.enter_context(eval_mode(model))
        stack.enter_context(mock.patch.object(model, "tie_weights", lambda *a, **k: None))
        if hasattr(evaluator, "get_git_commit_hash"):
            stack.enter_context(mock.patch.object(evaluator, "get_git_commit_hash", lambda: None))
        stack.enter_context(_quiet())
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _hub_unreachable(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return isinstance(e, ConnectionError) or any(
        s in text for s in ("OfflineModeIsEnabled", "Couldn't reach", "LocalEntryNotFound")
    )


def _load_tasks(tm, names: list[str], local: bool = False) -> list | None:
    """Each named task, group or tag built (its dataset read) one by one, so that a failure
    names its task. None when `tm` holds only the folder's tasks and a group names another."""
    built = []
    for name in names:
        try:
            loaded = tm.load([name])
        except Exception as e:
            if local and isinstance(e, KeyError):
                return None
            if _hub_unreachable(e):
                raise MkaInputError(
                    f"task {name} needs its dataset from the Hugging Face hub and this machine is "
                    f"offline; {TASKS_DIR_HINT}"
                ) from e
            if isinstance(e, OSError):
                raise MkaInputError(f"task {name} could not read its data: {_first_line(e)}") from e
            raise MkaInputError(
                f"lm-eval could not load task {name}: {type(e).__name__}: {_first_line(e)}"
            ) from e
        top = loaded["groups"].get(name, loaded["tasks"].get(name))
        built += [top] if top is not None else list(loaded["tasks"].values())  # a tag
    return built


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _metrics(row: dict) -> dict:
    """{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} -> {"acc": 0.5, "acc_stderr": 0.1}
    (a filter other than lm_eval's "none" stays in the name: "exact_match,strict-match")."""
    out = {}
    for key, value in row.items():
        if "," not in key:
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else key] = _number(value)
    return out


def _summary(raw: dict, version: str, limit, folder, batch_size: int) -> dict:
    """The plain JSON-able part of simple_evaluate's answer, for a run record."""
    n_samples = raw.get("n-samples", {})
    subtasks = raw.get("group_subtasks", {})

    def count(name: str, key: str) -> int | None:
        if name in n_samples:
            return int(n_samples[name][key])
        parts = [count(s, key) for s in subtasks.get(name, [])]
        return sum(parts) if parts and None not in parts else None

    tasks = {}
    for name, row in raw["results"].items():
        tasks[name] = {
            "metrics": _metrics(row),
            "n": count(name, "effective"),
            "n_total": count(name, "original"),
            "n_shot": raw.get("n-shot", {}).get(name),
            "version": raw.get("versions", {}).get(name),
            "higher_is_better": raw.get("higher_is_better", {}).get(name, {}),
        }
        if name in subtasks:
            tasks[name]["subtasks"] = list(subtasks[name])
    return {
        "lm_eval_version": version,
        "limit": limit,
        "tasks_dir": str(folder) if folder else None,
        "batch_size": batch_size,
        "seeds": dict(SEEDS),
        "tasks": tasks,
    }


def run_tasks(
    model,
    tokenizer,
    tasks: list[str] | str,
    tasks_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
) -> dict:
    """Score `model` (a causal LM in memory) on lm-eval tasks with lm_eval's own HFLM wrapper.

    tasks: names ("arc_easy,hellaswag" or a list) of lm_eval's built-in tasks, groups or tags, or
    of tasks defined by YAMLs in `tasks_dir`. limit: only the first N examples of each task.
    Returns a JSON-able dict: ``tasks`` ({name: {"metrics": {"acc": .., "acc_stderr": ..,
    "acc_norm": .., ...}, "n": examples scored, "n_total", "n_shot", "version",
    "higher_is_better"}}, groups with their ``subtasks``), ``lm_eval_version``, ``limit``,
    ``tasks_dir``, ``batch_size`` and ``seeds``.
    """
    names = parse_tasks(tasks)
    folder = _folder(tasks_dir)
    _check_limit(limit)
    check_batch_size(batch_size)
    (module,) = require_in_memory(model)
    if tokenizer is None or not callable(tokenizer):
        raise MkaInputError("lm-eval tasks need the model's tokenizer; none was given")
    lm_eval = _import_lm_eval()

    report(progress, 0.0, f"lm-eval: loading {', '.join(names)}")
    with _LOCK, _isolated(module):
        tm = _resolve(names, folder)
        built = _load_tasks(tm, names, local=folder is not None and tm is _manager(folder, False))
        if built is None:  # a group of the folder's naming built-in tasks: index those too
            tm = _manager(folder, defaults=True)
            built = _load_tasks(tm, names)
        report(progress, 0.1, f"lm-eval: scoring {', '.join(names)}")
        raw = _evaluate(module, tokenizer, built, tm, limit, batch_size)
    summary = _summary(raw, lm_eval.__version__, limit, folder, batch_size)
    report(progress, 1.0, "lm-eval: " + "; ".join(task_lines(summary)))
    return summary


def _evaluate(module: nn.Module, tokenizer, built: list, tm, limit, batch_size: int) -> dict:
    """simple_evaluate on HFLM around `module`; lm_eval's errors become one line."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    try:
        with _logger_level("lm_eval", logging.ERROR):  # "pretrained is not a str": we know
            # a copy: the wrapper gives a tokenizer without a pad token one
            lm = HFLM(pretrained=module, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        return simple_evaluate(
            model=lm,
            tasks=built,
            task_manager=tm,
            limit=limit,
            batch_size=batch_size,
            use_cache=None,
            cache_requests=False,
            log_samples=False,
            write_out=False,
            **SEEDS,
        )
    except Exception as e:
        names = ", ".join(getattr(t, "task_name", None) or getattr(t, "name", "?") for t in built)
        raise MkaInputError(
            f"lm-eval failed on {names}: {type(e).__name__}: {_first_line(e)}"
        ) from e


def task_lines(summary: dict | None) -> list[str]:
    """One line per task of a `run_tasks` result: "arc_easy: acc 0.4310 ± 0.0102, ... (n=2376)"."""
    lines = []
    for name, task in ((summary or {}).get("tasks") or {}).items():
        metrics = task.get("metrics", {})
        parts = []
        for key, value in metrics.items():
            if key.endswith("_stderr") or "_stderr," in key or value is None:
                continue
            stderr = metrics.get(key.replace(",", "_stderr,", 1) if "," in key else key + "_stderr")
            parts.append(f"{key} {value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
        shots = f", {task['n_shot']}-shot" if task.get("n_shot") is not None else ""
        lines.append(f"{name}: {', '.join(parts) or 'no metrics'} (n={task.get('n')}{shots})")
    return lines


def attach_tasks(
    results: list,
    models: list,
    tokenizer,
    tasks: list[str] | str | None,
    tasks_dir: str | Path | None = None,
    limit: int | None = None,
    progress: ProgressFn | None = None,
) -> list:
    """Each EvalResult with `run_tasks` of its model in `.tasks` (new results; as is when no tasks
    are asked for). results[i] belongs to models[i]: the original and the compressed model are
    scored the same way."""
    if tasks is None:
        return list(results)
    if len(results) != len(models):
        raise MkaInputError(f"{len(results)} results but {len(models)} models to score")
    out = []
    for r, m in zip(results, models, strict=True):
        step = (
            None if progress is None else (lambda f, msg, lab=r.label: progress(f, f"{lab}: {msg}"))
        )
        out.append(
            dataclasses.replace(
                r, tasks=run_tasks(m, tokenizer, tasks, tasks_dir, limit, progress=step)
            )
        )
    return out


def tasks_report(results: list) -> list[str]:
    """Lines "label: task: acc 0.4310 ± 0.0102, ..." of every result that holds lm-eval scores."""
    return [f"{r.label}: {line}" for r in results for line in task_lines(r.tasks)]
