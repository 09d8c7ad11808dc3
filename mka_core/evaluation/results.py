"""What an evaluation measured about one model (`EvalResult`), its file format, and size counts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from torch import nn

from mka_core.errors import MkaInputError
from mka_core.files import write_text_atomic
from mka_core.models.loading import count_bytes, count_params, n_layers_of

FORMAT = "mka-eval"
VERSION = 1


# ---------------------------------------------------------------------------------------------
# size


def size(model) -> dict:
    """Parameters (tied weights once), bytes in memory, and the shape that compression changes."""
    if not hasattr(model, "config") or not (
        isinstance(model, nn.Module) or hasattr(model, "recipe")
    ):
        raise MkaInputError(f"model must be a transformers causal LM, got {type(model).__name__}")
    cfg = model.config
    n_heads = int(cfg.num_attention_heads)
    return {
        "params": count_params(model),
        "bytes": count_bytes(model),
        "n_layers": n_layers_of(model),
        "intermediate_size": int(cfg.intermediate_size),
        "n_heads": n_heads,
        "n_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or n_heads),
    }


def disk_bytes(path: str | Path) -> int:
    """Bytes on disk of a saved model: a file, or every file under a folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        raise MkaInputError(f"model path not found: {p}")
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class EvalResult:
    """Everything measured about one model. kl/top1 are None for the reference model itself."""

    label: str
    perplexity: float
    params: int
    bytes: int
    n_layers: int
    eval_tokens: int  # predicted positions scored for perplexity (and fidelity)
    kl: float | None = None  # mean KL(P_original || P_this), nats
    top1: float | None = None  # share of positions where the argmax agrees with the original
    disk_bytes: int | None = None  # after export (set with dataclasses.replace)
    intermediate_size: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None
    generations: tuple[str, ...] = ()
    mmlu: dict | None = None  # mmlu_accuracy's dict
    tasks: dict | None = None  # lm-eval scores: harness.run_tasks' dict
    meta: dict = field(default_factory=dict)  # data source, budget, window, device, ...

    def to_dict(self) -> dict:
        d = asdict(self)
        d["generations"] = list(self.generations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EvalResult:
        if not isinstance(d, dict):
            raise MkaInputError(f"an evaluation result must be an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        missing = sorted(required - d.keys())
        if missing:
            raise MkaInputError(f"evaluation result lacks the field(s) {', '.join(missing)}")
        kw = {k: v for k, v in d.items() if k in known}
        if not isinstance(kw["label"], str):
            raise MkaInputError(
                f"evaluation result field 'label' must be a string: {kw['label']!r}"
            )
        for key in ("perplexity", "kl", "top1", "prefill_tps", "decode_tps"):
            value = kw.get(key)
            if value is not None and (
                not isinstance(value, int | float) or isinstance(value, bool)
            ):
                raise MkaInputError(f"evaluation result field {key!r} must be a number: {value!r}")
        for key in ("params", "bytes", "n_layers", "eval_tokens", "disk_bytes"):
            value = kw.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise MkaInputError(
                    f"evaluation result field {key!r} must be an integer: {value!r}"
                )
        gens = kw.get("generations", ())
        if not isinstance(gens, list | tuple) or not all(isinstance(g, str) for g in gens):
            raise MkaInputError("evaluation result field 'generations' must be a list of strings")
        kw["generations"] = tuple(gens)
        for key in ("mmlu", "tasks", "meta"):
            value = kw.get(key)
            if value is not None and not isinstance(value, dict):
                raise MkaInputError(f"evaluation result field {key!r} must be an object")
        if kw.get("meta") is None:
            kw["meta"] = {}
        return cls(**kw)


def save_results(path: str | Path, results: EvalResult | Sequence[EvalResult]) -> Path:
    """Write results as one JSON file (format mka-eval, version 1), atomically."""
    if isinstance(results, EvalResult):
        results = [results]
    if not all(isinstance(r, EvalResult) for r in results):
        raise MkaInputError("save_results expects EvalResult objects")
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "results": [r.to_dict() for r in results],
    }
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    return write_text_atomic(path, text, overwrite=True)


def load_results(path: str | Path) -> list[EvalResult]:
    """Read a file written by save_results; a bad file gets a one-line MkaInputError."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MkaInputError(f"results file not found: {p}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MkaInputError(f"{p.name} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MkaInputError(f"{p.name} is not an MKA Studio evaluation file (format {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise MkaInputError(
            f"{p.name} has evaluation format version {doc.get('version')!r}; expected {VERSION}"
        )
    items = doc.get("results")
    if not isinstance(items, list):
        raise MkaInputError(f"{p.name}: field 'results' must be a list")
    return [EvalResult.from_dict(d) for d in items]
