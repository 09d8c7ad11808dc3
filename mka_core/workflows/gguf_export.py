"""Writing a model folder as one quantized GGUF file, the format llama.cpp runs.

`export_gguf` reads the folder's safetensors one tensor at a time and writes each tensor as soon
as it is computed, so memory holds about one tensor (a layer's stacked experts for a mixture of
experts), never the model: the GGUF header, metadata and every tensor's name, shape and type are
written first (they are known from the safetensors headers), then the tensors' data in order.

Each tensor's type follows `engine.quant.storage_type` (norms and biases F32, matrices the chosen
type, F16 where rows are not whole blocks), with gguf-py's reference quantizers, so the file's
dequantized model is the model `engine.quant.round_trip` gives. Names and layout conventions are in
`gguf_layout`, the tokenizer in `gguf_vocab`.

The file is written inside a temporary folder beside the destination and renamed into place when
complete, so no half-written ``.gguf`` ever exists under the destination's name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter
from transformers import AutoConfig

from mka_core.engine.quant import check_quant, encode, storage_type, stored_bytes
from mka_core.engine.weights import SafetensorsStore, check_disk_space
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.files import hold_for_tests, temp_dir
from mka_core.models.cache import BUNDLED, bundled_gguf_path, gguf_folder
from mka_core.models.tiny import TINY_ARCHS, tiny_folder
from mka_core.workflows.gguf_layout import (
    Family,
    Job,
    arch_name,
    check_config,
    family_of,
    tensor_jobs,
    write_hparams,
)
from mka_core.workflows.gguf_vocab import Vocab, vocab_for

log = logging.getLogger(__name__)

# values read and encoded at once for a matrix stored unchanged (64 MB in float32)
CHUNK_VALUES = 16 * 1024**2
SOURCES_HELP = "a model folder, a .gguf file, bundled:smollm2-135m or tiny:<family>"


def _origin_of(source: str) -> Path | None:
    """The GGUF file a model source names, if it names one that exists."""
    source = str(source).strip()
    if source in BUNDLED:
        try:
            return bundled_gguf_path(source)
        except MkaInputError:
            return None
    path = Path(source).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def _recorded_origin(folder: Path) -> Path | None:
    """The GGUF a folder this tool wrote was compressed from (its run record or plan says)."""
    for name, key in (("mka-run.json", ("source",)), ("plan.json", ("model", "source"))):
        try:
            value = json.loads((folder / name).read_text(encoding="utf-8"))
            for k in key:
                value = value[k]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, str) and (origin := _origin_of(value)) is not None:
            return origin
    return None


def resolve_source(source, progress: ProgressFn | None = None) -> tuple[Path, Path | None]:
    """(the model folder a source resolves to, the GGUF file it came from or None)."""
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str) or not source.strip():
        raise MkaInputError(f"model source is empty; expected {SOURCES_HELP}")
    source = source.strip()
    if source.startswith("bundled:"):
        if source not in BUNDLED:
            raise MkaInputError(
                f"unknown bundled model {source!r}; available: {', '.join(BUNDLED)}"
            )
        gguf = bundled_gguf_path(source)
        return gguf_folder(gguf, progress), gguf
    if source.startswith("tiny:"):
        arch = source.split(":", 1)[1]
        if arch not in TINY_ARCHS:
            raise MkaInputError(
                f"unknown tiny model {source!r}; available: {', '.join(TINY_ARCHS)}"
            )
        return tiny_folder(arch, 0), None
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MkaInputError(f"GGUF file not found: {path}")
        return gguf_folder(path, progress), path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MkaInputError(f"{path} is a folder but has no config.json (not a model folder)")
        return path, _recorded_origin(path)
    raise MkaInputError(f"model source not found: {source} (expected {SOURCES_HELP})")


def _read_config(folder: Path):
    """The folder's family (checked on the raw config.json, so an unknown model type gets the GGUF
    line, not transformers') and its transformers config."""
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise MkaInputError(f"{folder}: cannot read config.json ({str(e)[:120]})") from None
    family = family_of(raw)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MkaInputError(f"{folder}: cannot read config.json ({str(e)[:120]})") from None
    check_config(config, family)
    return family, config


def _check_out(out, overwrite: bool, origin: Path | None) -> Path:
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise MkaInputError(f"output {out}: expected a file name ending in .gguf")
    if out.is_dir():
        raise MkaInputError(f"output {out} is a folder; expected a .gguf file name")
    if origin is not None and out.exists() and out.resolve() == origin.resolve():
        raise MkaInputError(f"refusing to write {out}: it is the GGUF the model is read from")
    if out.exists() and not overwrite:
        raise MkaInputError(
            f"{out} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    return out


def export_gguf(
    source, out, quant: str, progress: ProgressFn | None = None, overwrite: bool = False
) -> dict:
    """Write the model `source` resolves to (a folder with safetensors, a .gguf file,
    ``bundled:…`` or ``tiny:…``) as the GGUF file `out`, its matrices stored as `quant` (one of
    `engine.quant.QUANT_TYPES`). Returns a summary: path, quant, bytes, tensor counts per stored
    type, architecture, model type, layers, and where the tokenizer came from.

    Everything is checked before the first byte is written (quant, output, source, family,
    tensor names, tokenizer, disk space); a failure leaves no file behind, temporary or not."""
    quant = check_quant(quant)
    out = _check_out(out, overwrite, None)
    folder, origin = resolve_source(source, progress)
    out = _check_out(out, overwrite, origin)
    family, config = _read_config(folder)
    store = SafetensorsStore(folder)
    jobs = tensor_jobs(store, config, family)
    embed = "model.embed_tokens.weight"
    if embed not in store:
        raise MkaInputError(f"{folder} holds no {embed}")
    n_vocab = int(store.info(embed).shape[0])
    vocab = vocab_for(folder, origin, n_vocab)
    types = [storage_type(j.shape, quant) for j in jobs]
    plan = [(j, t, stored_bytes(j.shape, t)) for j, t in zip(jobs, types)]
    total = sum(size for _, _, size in plan)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MkaInputError(f"cannot write into {out.parent}: {e.strerror}") from None
    # the metadata (a vocabulary of a few MB at most) on top of the tensors
    check_disk_space(out.parent, total + 16 * 1024**2, f"the GGUF export to {out}")

    label = str(source).strip().rstrip("/")
    name = label.replace(":", "-") if label.startswith(("bundled:", "tiny:")) else Path(label).stem
    report(
        progress, 0.0, f"writing {out.name}: {len(jobs)} tensors, {total / 1e9:.2f} GB ({quant})"
    )
    try:
        tmp = temp_dir(out.resolve().parent, f".{out.name}.tmp-")
    except OSError as e:
        raise MkaInputError(f"cannot write into {out.parent}: {e.strerror}") from None
    try:
        args = (name, config, family, n_vocab, quant, vocab, plan, store, progress)
        _write_file(tmp / out.name, *args)
        hold_for_tests()
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts = Counter(t.name for t in types)
    log.info("wrote %s (%d tensors)", out, len(jobs))
    return {
        "path": str(out),
        "quant": quant,
        "bytes": out.stat().st_size,
        "tensor_types": dict(sorted(counts.items())),
        "architecture": arch_name(family),
        "model_type": config.model_type,
        "n_layers": int(config.num_hidden_layers),
        "tokenizer": vocab.origin,
    }


def _write_file(
    path: Path,
    name: str,
    config,
    family: Family,
    n_vocab: int,
    quant: str,
    vocab: Vocab,
    plan: list[tuple[Job, GGMLQuantizationType, int]],
    store: SafetensorsStore,
    progress: ProgressFn | None,
) -> None:
    """The GGUF file: header, metadata and every tensor's info first, then each tensor's data as
    soon as it is computed and encoded (memory: one tensor and its encoding)."""
    w = GGUFWriter(path, arch_name(family))
    try:
        w.add_type("model")
        w.add_name(name)
        write_hparams(w, config, family, n_vocab, quant)
        w.add_quantization_version(GGML_QUANT_VERSION)
        vocab.write(w)
        for job, qtype, size in plan:
            # a float dtype: the shape is given in elements, not in bytes
            w.add_tensor_info(job.name, job.shape, np.dtype(np.float32), size, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total, written = sum(size for _, _, size in plan), 0
        for job, qtype, size in plan:
            data = _encoded(job, qtype, size, store)
            w.write_tensor_data(data)
            del data
            written += size
            report(progress, written / max(total, 1), f"wrote {job.name} ({qtype.name})")
    finally:
        w.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _encoded(job: Job, qtype: GGMLQuantizationType, size: int, store: SafetensorsStore):
    """A tensor in its stored form. A matrix stored unchanged is read and encoded CHUNK_VALUES at a
    time into the output buffer (quantization works row by row, so the bytes are those of the
    whole): memory is the encoded tensor plus one chunk, not the tensor in float32 (a 128 K-token
    embedding is 2 GB in float32)."""
    if job.source is None or len(job.shape) != 2:
        t = job.produce()
        if tuple(t.shape) != job.shape:
            raise AssertionError(f"{job.name}: computed {tuple(t.shape)}, planned {job.shape}")
        return encode(t, qtype)
    out = np.empty(size, dtype=np.uint8)
    rows, cols = job.shape
    step = max(1, CHUNK_VALUES // cols)
    pos = 0
    for start in range(0, rows, step):
        chunk = store.get_row_range(job.source, start, min(rows, start + step))
        raw = np.ascontiguousarray(encode(chunk.to(torch.float32), qtype)).view(np.uint8)
        out[pos : pos + raw.size] = raw.reshape(-1)
        pos += raw.size
    if pos != size:
        raise AssertionError(f"{job.name}: encoded {pos} bytes, planned {size}")
    return out


def write_gguf_beside(
    folder, quant: str, progress: ProgressFn | None = None, overwrite: bool = False
) -> Path:
    """Write ``<folder>/model-<quant>.gguf`` from the model folder `folder` (as `apply --out`
    writes it) and return its path."""
    quant = check_quant(quant)
    out = Path(folder).expanduser() / f"model-{quant}.gguf"
    export_gguf(folder, out, quant, progress=progress, overwrite=overwrite)
    return out
