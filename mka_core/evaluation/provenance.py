"""What produced a number: the versions of the software, and a one-line description of a result's
settings (data, split, windows, tokens, dtype, device, quantization) for tables and hovers."""

from __future__ import annotations

import functools
from importlib import metadata

import mka_core

PACKAGES = ("torch", "transformers", "gguf", "lm_eval")


@functools.cache
def versions() -> dict:
    """Installed versions of the packages a measurement depends on (absent ones left out)."""
    out = {"mka_core": mka_core.__version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def describe(meta: dict | None) -> str:
    """e.g. "builtin (evaluation split) · 16 windows × 512 tokens · bfloat16 on cpu · Q8_0 ·
    torch 2.13.0, transformers 5.23.0" from an EvalResult's meta."""
    m = meta or {}
    parts = []
    data = m.get("eval_data")
    if data:
        split = m.get("split")
        parts.append(f"{data} ({split} split)" if split else str(data))
    if m.get("n_windows") and m.get("window"):
        parts.append(f"{m['n_windows']} windows × {m['window']} tokens")
    if m.get("dtype"):
        streamed = ", streamed" if m.get("streamed") else ""
        parts.append(f"{m['dtype']} on {m.get('device', '?')}{streamed}")
    if m.get("quant"):
        parts.append(f"weights {m['quant']} (quantize → dequantize)")
    if m.get("seed") is not None:
        parts.append(f"seed {m['seed']}")
    v = m.get("versions") or {}
    if v:
        parts.append(", ".join(f"{k} {v[k]}" for k in ("torch", "transformers") if k in v))
    return " · ".join(p for p in parts if p)
