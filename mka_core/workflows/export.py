"""Writing results to disk: model folders that plain transformers loads, written shard
by shard from a model in memory or streamed from disk, mergekit YAML, and an atomic text writer.

Everything is written under a temporary name in the destination's folder and renamed into place
when complete, so a crash never leaves a half-written model or plan behind. The tool refuses to
write into the folder a model was loaded from, and over existing non-empty folders unless told to.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from pathlib import Path

import torch
import yaml
from torch import nn
from transformers import GenerationConfig

from mka_core.compression.plan import Plan
from mka_core.engine.adapters import checkpoint_items, stored_expert_layout
from mka_core.engine.layerpass import Stack, as_stack
from mka_core.engine.weights import check_disk_space, write_shards
from mka_core.errors import MkaInputError, ProgressFn
from mka_core.files import move_into_place, temp_dir

log = logging.getLogger(__name__)

MERGEKIT_PLACEHOLDER = "path/to/model"


OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OUT_DTYPES.update(bfloat16=torch.bfloat16, float16=torch.float16, float32=torch.float32)


def out_dtype_of(value) -> torch.dtype | None:
    """--out-dtype bf16|fp16|fp32 (or a torch dtype) → a torch dtype; None or "auto" → None."""
    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return None if value == "auto" else value
    if value not in OUT_DTYPES:
        raise MkaInputError(f"unknown output dtype {value!r}; expected bf16, fp16 or fp32")
    return OUT_DTYPES[value]


def check_destination(out: Path, overwrite: bool, loaded_from) -> None:
    """Refuse an output that would write into a model folder the model is read from, or over its
    source file (a new folder beside a .gguf is fine), or over a non-empty folder unless asked."""
    if loaded_from is not None and str(loaded_from).strip():
        src = Path(loaded_from).expanduser()
        if src.exists():  # sources such as tiny:llama or bundled:... are not paths
            src = src.resolve()
            dest = out.resolve()
            if src.is_dir() and (dest == src or src in dest.parents):
                raise MkaInputError(
                    f"refusing to write into {src}, the folder the model was loaded from; "
                    f"choose another output folder"
                )
            if dest == src or dest in src.parents:
                raise MkaInputError(
                    f"refusing to write {dest}: it holds the model's source {src}, which "
                    f"replacing it would delete; choose another output folder"
                )
    if out.exists():
        if not out.is_dir():
            raise MkaInputError(f"{out} exists and is a file; expected a folder for the model")
        if any(out.iterdir()) and not overwrite:
            raise MkaInputError(
                f"{out} exists and is not empty; choose another folder or pass overwrite=True "
                f"(--overwrite) to replace it"
            )


def _check_extra(extra_files: dict, plan) -> None:
    for name, text in extra_files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise MkaInputError(f"extra file name {name!r}: expected a plain file name")
        if not isinstance(text, str):
            raise MkaInputError(f"extra file {name}: expected text, got {type(text).__name__}")
        if name == "plan.json" and plan is not None:
            raise MkaInputError("extra file plan.json would replace the plan written beside it")


def _write_config(stack, tmp: Path, dtype: torch.dtype) -> None:

    config = copy.deepcopy(stack.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(tmp)
    _strip_quantization_config(tmp / "config.json")
    gen = getattr(stack.resident, "generation_config", None) if stack.resident is not None else None
    with contextlib.suppress(Exception):  # a model without generation defaults is still a model
        (gen or GenerationConfig.from_model_config(config)).save_pretrained(tmp)


def save_model(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    plan: Plan | None = None,
    overwrite: bool = False,
    loaded_from: str | os.PathLike | None = None,
    extra_files: dict[str, str] | None = None,
    out_dtype=None,
    progress: ProgressFn | None = None,
) -> Path:
    """Save a (compressed) model as a standard folder of safetensors shards
    (``model-0000k-of-0000n.safetensors`` + index), with its config, tokenizer, the plan that made
    it (``plan.json``) and any extra text files; returns the folder's path.

    `model` is a model in memory or a streamed `engine.Stack`: either way the tensors are computed
    and written one at a time (merged ones summed in fp32), so memory holds one tensor plus what
    the model already holds. out_dtype: bf16, fp16 or fp32 (default: the model's weights' dtype).
    The needed disk space is checked before anything is written; a failure leaves nothing behind.
    """

    if not isinstance(model, nn.Module | Stack):
        model = getattr(model, "model", model)
    if not isinstance(model, nn.Module | Stack) or not hasattr(model, "config"):
        raise MkaInputError(f"save_model needs a transformers model, got {type(model).__name__}")
    if plan is not None and not isinstance(plan, Plan):
        raise MkaInputError(f"plan: expected a Plan, got {type(plan).__name__}")
    extra_files = dict(extra_files or {})
    _check_extra(extra_files, plan)
    stack = as_stack(model)
    infos0 = stack.recipe.infos()
    dtype = out_dtype_of(out_dtype) or _main_dtype(infos0)
    # experts go one tensor per expert, as save_pretrained writes them (engine.adapters)
    infos, produce = checkpoint_items(
        stack.recipe.infos(dtype),
        lambda name: stack.recipe.tensor(name, dtype),
        stored_expert_layout(stack.skeleton, stack.store),
    )

    out = Path(out_dir).expanduser()
    check_destination(out, overwrite, loaded_from)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MkaInputError(f"cannot write into {out.parent}: {e.strerror}") from None
    check_disk_space(out.parent, sum(i.nbytes for i in infos), f"the model export to {out}")
    try:
        tmp = temp_dir(out.parent, f".{out.name}.tmp-")
    except OSError as e:
        raise MkaInputError(f"cannot write into {out.parent}: {e.strerror}") from None
    try:
        write_shards(tmp, infos, produce, progress=progress)
        _write_config(stack, tmp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            (tmp / "plan.json").write_text(plan.to_json(), encoding="utf-8")
        for name, text in extra_files.items():
            if (tmp / name).exists():
                raise MkaInputError(f"extra file {name} would replace a file of the saved model")
            (tmp / name).write_text(text, encoding="utf-8")
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved model to %s", out)
    return out


def _main_dtype(infos) -> torch.dtype:
    """The floating dtype most of the weights are stored in."""
    by: dict[torch.dtype, int] = {}
    for i in infos:
        if i.dtype.is_floating_point:
            by[i.dtype] = by.get(i.dtype, 0) + i.numel
    return max(by, key=by.get) if by else torch.float32


def _strip_quantization_config(config_path: Path) -> None:
    """The weights written are plain floats: a leftover GGUF quantization_config would make
    transformers try to quantise (or refuse) on load."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )


def _slices(plan: Plan) -> list[list[tuple[int, int, float]]]:
    """The plan as mergekit slices: each a list of sources (start, end, weight) of equal length.
    Runs of kept layers become one single-source slice; a merged output layer becomes one slice
    with a one-layer source per original layer and its weight."""
    slices: list[list[tuple[int, int, float]]] = []
    for group in plan.layers:
        if len(group) == 1:
            layer = group[0][0]
            last = slices[-1] if slices else None
            if last is not None and len(last) == 1 and last[0][1] == layer:
                slices[-1] = [(last[0][0], layer + 1, 1.0)]
            else:
                slices.append([(layer, layer + 1, 1.0)])
        else:
            slices.append([(i, i + 1, float(w)) for i, w in group])
    return slices


def _layer_comments(plan: Plan) -> list[str]:
    """Which original layers the plan keeps, merges and drops (0-based), and what mergekit cannot
    express of it, as YAML comments."""
    used = {i for group in plan.layers for i, _ in group}
    kept = [g[0][0] for g in plan.layers if len(g) == 1]
    merged = ["+".join(f"{i}x{w:.3g}" for i, w in g) for g in plan.layers if len(g) > 1]
    dropped = [i for i in range(plan.model.num_layers) if i not in used]
    out = [
        f"# original layers kept: {_ranges(kept) or 'none'}",
        f"# original layers dropped: {_ranges(dropped) or 'none'}",
    ]
    if merged:
        out.append(f"# merged (layer x weight): {', '.join(merged)}")
    if not plan.refine.is_default:
        out.append(
            f"# this plan is built with merge mode {plan.refine.merge} and compensation "
            f"{plan.refine.compensation}, which mergekit cannot express: this config builds the "
            f"plain plan; apply the plan JSON for the model itself"
        )
    return out


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → "0-2, 5, 7-8"."""
    parts, start = [], None
    for k, i in enumerate(layers):
        if start is None:
            start = i
        if k + 1 == len(layers) or layers[k + 1] != i + 1:
            parts.append(f"{start}-{i}" if i != start else f"{i}")
            start = None
    return ", ".join(parts)


def _alias(model: str, k: int) -> str:
    """The k-th spelling of one folder (``m``, ``m/.``, ``m/./.``): mergekit 0.1.5 refuses the same
    model twice in one slice ("Duplicate merge inputs") but reads each spelling as its own input,
    from the same files."""
    return model + "/." * k


def mergekit_yaml(plan: Plan, model_path: str | None = None, out_dtype: str | None = None) -> str:
    """A mergekit config that rebuilds the plan's model: ``passthrough`` for plans made only of
    kept and dropped layers, ``linear`` (weights as given, not normalised, computed in fp32) when
    the plan merges layers, each merged layer a slice of one-layer sources (see `_alias`).
    layer_range is half-open [start, end). Run by mergekit, it gives the tensors of our export
    (tests/workflows/test_mergekit.py)."""
    if not isinstance(plan, Plan):
        raise MkaInputError(f"mergekit_yaml needs a Plan, got {type(plan).__name__}")
    slices = _slices(plan)
    model = model_path or plan.model.source
    placeholder = not model or model.startswith(("tiny:", "bundled:"))
    if placeholder:
        model = MERGEKIT_PLACEHOLDER
    merges = any(len(sl) > 1 for sl in slices)
    if merges:
        if not placeholder and not Path(model).expanduser().exists():
            raise MkaInputError(
                f"mergekit lists each model once per slice, so a merge of two layers of one model "
                f"names it by two spellings of its folder; {model!r} is not a local folder: give "
                f"the model's folder (--model-path)"
            )
        config = {
            "slices": [
                {
                    "sources": [
                        {
                            "model": _alias(model, k),
                            "layer_range": [a, b],
                            "parameters": {"weight": w},
                        }
                        for k, (a, b, w) in enumerate(sl)
                    ]
                }
                for sl in slices
            ],
            "merge_method": "linear",
            "parameters": {"normalize": False},
            "dtype": "float32",
        }
    else:
        config = {
            "slices": [
                {"sources": [{"model": model, "layer_range": [a, b]}]} for ((a, b, _),) in slices
            ],
            "merge_method": "passthrough",
            "dtype": "float32",
        }
    if out_dtype:
        config["out_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
            out_dtype, out_dtype
        )
    header = [
        " ".join(f"# mergekit config written by {plan.created_by} ({plan.created_at})".split()),
        f"# {plan.model.num_layers} -> {plan.n_layers_out} layers; layer_range is [start, end)",
        *_layer_comments(plan),
    ]
    if placeholder:
        header.append(
            f"# {plan.model.source} is not a path mergekit reads: replace {MERGEKIT_PLACEHOLDER} "
            f"with the model's folder or hub id"
        )
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    return "\n".join(header) + "\n" + body
