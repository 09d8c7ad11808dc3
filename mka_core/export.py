"""Writing results to disk (SPEC §10): model folders that plain transformers loads, mergekit YAML,
and an atomic text writer for every other file the tool produces.

Everything is written under a temporary name in the destination's folder and renamed into place
when complete, so a crash never leaves a half-written model or plan behind. The tool refuses to
write into the folder a model was loaded from, and over existing non-empty folders unless told to.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .errors import MkaInputError
from .files import write_text_atomic as save_text_atomic  # noqa: F401 (re-exported)
from .plan import Plan

log = logging.getLogger(__name__)

MERGEKIT_PLACEHOLDER = "path/to/model"


def _check_destination(out: Path, overwrite: bool, loaded_from) -> None:
    if loaded_from is not None and str(loaded_from).strip():
        src = Path(loaded_from).expanduser()
        if src.exists():  # sources such as tiny:llama or bundled:... are not paths
            src = src.resolve()
            src_dir = src if src.is_dir() else src.parent
            dest = out.resolve()
            if dest == src_dir or src_dir in dest.parents:
                raise MkaInputError(
                    f"refusing to write into {src_dir}, the folder the model was loaded from; "
                    f"choose another output folder"
                )
            if dest in src.parents:
                raise MkaInputError(
                    f"refusing to write {dest}: it holds the model's source {src}, which "
                    f"replacing the folder would delete; choose another output folder"
                )
    if out.exists():
        if not out.is_dir():
            raise MkaInputError(f"{out} exists and is a file; expected a folder for the model")
        if any(out.iterdir()) and not overwrite:
            raise MkaInputError(
                f"{out} exists and is not empty; choose another folder or pass overwrite=True "
                f"(--overwrite) to replace it"
            )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder onto `out`, replacing an existing one only once it is done."""
    if not out.exists():
        os.replace(tmp, out)
        return
    backup = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.rmdir(backup)
    os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def save_model(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    plan: Plan | None = None,
    overwrite: bool = False,
    loaded_from: str | os.PathLike | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save a (compressed) model as a standard safetensors folder, with its tokenizer, the plan
    that made it (``plan.json``) and any extra text files; returns the folder's path."""
    model = getattr(model, "model", model) if not hasattr(model, "save_pretrained") else model
    if not hasattr(model, "save_pretrained"):
        raise MkaInputError(f"save_model needs a transformers model, got {type(model).__name__}")
    if plan is not None and not isinstance(plan, Plan):
        raise MkaInputError(f"plan: expected a Plan, got {type(plan).__name__}")
    extra_files = dict(extra_files or {})
    for name, text in extra_files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise MkaInputError(f"extra file name {name!r}: expected a plain file name")
        if not isinstance(text, str):
            raise MkaInputError(f"extra file {name}: expected text, got {type(text).__name__}")
        if name == "plan.json" and plan is not None:
            raise MkaInputError("extra file plan.json would replace the plan written beside it")

    out = Path(out_dir).expanduser()
    _check_destination(out, overwrite, loaded_from)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise MkaInputError(f"cannot write into {out.parent}: {e.strerror}") from None
    try:
        kwargs = {}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True  # older transformers; newer ones always are
        with _without_quantizer(model):
            model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _strip_quantization_config(tmp / "config.json")
        if plan is not None:
            (tmp / "plan.json").write_text(plan.to_json(), encoding="utf-8")
        for name, text in extra_files.items():
            if (tmp / name).exists():
                raise MkaInputError(f"extra file {name} would replace a file of the saved model")
            (tmp / name).write_text(text, encoding="utf-8")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved model to %s", out)
    return out


@contextlib.contextmanager
def _without_quantizer(model):
    """Save a dequantised (GGUF-loaded) model as the plain floats it holds, then put back what
    was there: the caller's model is not ours to change."""
    saved = {
        a: getattr(model, a)
        for a in ("hf_quantizer", "quantization_method")
        if getattr(model, a, None) is not None
    }
    qconfig = getattr(model.config, "quantization_config", None)
    try:
        for attr in saved:
            setattr(model, attr, None)
        if qconfig is not None:
            del model.config.quantization_config
        yield
    finally:
        for attr, value in saved.items():
            setattr(model, attr, value)
        if qconfig is not None:
            model.config.quantization_config = qconfig


def _strip_quantization_config(config_path: Path) -> None:
    """The weights written are plain floats: a leftover GGUF quantization_config would make
    transformers try to quantise (or refuse) on load."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )


def _kept_runs(plan: Plan) -> list[tuple[int, int]]:
    """Half-open [start, end) ranges of consecutive original layers kept unchanged, in order."""
    runs: list[tuple[int, int]] = []
    for pos, group in enumerate(plan.layers):
        if len(group) != 1:
            sources = ",".join(str(i) for i, _ in group)
            weights = ", ".join(f"{w:.4g}" for _, w in group)
            raise MkaInputError(
                f"mergekit cannot express this plan: output layer {pos} mixes layers {sources} "
                f"(weights {weights}); export the model folder instead"
            )
        layer = group[0][0]
        if runs and runs[-1][1] == layer:
            runs[-1] = (runs[-1][0], layer + 1)
        else:
            runs.append((layer, layer + 1))
    return runs


def mergekit_yaml(plan: Plan, model_path: str | None = None) -> str:
    """A mergekit ``passthrough`` config that rebuilds the plan's model, for plans made only of
    kept and dropped layers (mergekit cannot mix a weighted merge into a passthrough stack)."""
    if not isinstance(plan, Plan):
        raise MkaInputError(f"mergekit_yaml needs a Plan, got {type(plan).__name__}")
    runs = _kept_runs(plan)
    model = model_path or plan.model.source
    placeholder = not model or model.startswith(("tiny:", "bundled:"))
    if placeholder:
        model = MERGEKIT_PLACEHOLDER
    config = {
        "slices": [
            {"sources": [{"model": model, "layer_range": [start, end]}]} for start, end in runs
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    header = [
        " ".join(f"# mergekit config written by {plan.created_by} ({plan.created_at})".split()),
        f"# {plan.model.num_layers} -> {plan.n_layers_out} layers; layer_range is [start, end)",
    ]
    if placeholder:
        header.append(
            f"# {plan.model.source} is not a path mergekit reads: replace {MERGEKIT_PLACEHOLDER} "
            f"with the model's folder or hub id"
        )
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    return "\n".join(header) + "\n" + body
