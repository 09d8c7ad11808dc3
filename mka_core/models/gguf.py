"""Converting a GGUF file once into a folder of safetensors shards, one tensor at a time.

transformers reads a GGUF of the Llama family by dequantising every tensor into one state dict
(``modeling_gguf_pytorch_utils.load_gguf_checkpoint``), which needs the whole model in float32 in
memory. This module runs the same steps — transformers' own name map
(``get_gguf_hf_weights_map``), its per-architecture tensor processors (which undo llama.cpp's
permutations), gguf-py's ``dequantize`` — but writes each tensor to a shard as soon as it is
dequantised, so memory holds one tensor. The folder is then an ordinary model folder: loaded into
memory, or streamed block by block (see `engine.Stack`).

The converted weights are float32: dequantised values (scale × code + offset) are not exactly
representable in 16 bits, and the cache keeps what the file means, not a rounding of it.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, dequantize
from transformers import AutoConfig, AutoTokenizer, GenerationConfig
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
    read_field,
)

from mka_core.engine.layerpass import build_skeleton
from mka_core.engine.weights import TensorInfo, check_disk_space, write_shards
from mka_core.errors import MkaInputError, ProgressFn, report

log = logging.getLogger(__name__)

CONVERTED_DTYPE = torch.float32


def _quiet():
    """Silence the progress bars transformers prints while parsing GGUF metadata."""
    return contextlib.redirect_stderr(io.StringIO())


def gguf_magic_ok(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def convert_gguf(gguf: Path, out: Path, progress: ProgressFn | None = None) -> None:
    """Write `gguf` as a model folder into the (empty, temporary) folder `out`."""

    if not gguf_magic_ok(gguf):
        raise MkaInputError(
            f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes)"
        )
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        reader = GGUFReader(str(gguf))
    except MkaInputError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or unsupported file: one clear line
        raise MkaInputError(
            f"cannot read {gguf.name} as a GGUF model ({type(e).__name__}: {str(e)[:160]})"
        ) from None
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = CONVERTED_DTYPE
    skeleton = build_skeleton(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    name_map = get_gguf_hf_weights_map(skeleton, processor)

    items, sources = [], {}
    for tensor in reader.tensors:
        hf_name = name_map.get(tensor.name)
        if hf_name is None:
            continue  # e.g. rope frequency tables llama.cpp stores for itself
        if hf_name not in shapes:
            raise MkaInputError(f"{gguf.name}: tensor {tensor.name} maps to unknown {hf_name}")
        items.append(TensorInfo(hf_name, shapes[hf_name], CONVERTED_DTYPE))
        sources[hf_name] = tensor
    tied = getattr(config, "tie_word_embeddings", False)
    wanted = {k for k in shapes if not (tied and k == "lm_head.weight")}
    missing = sorted(wanted - set(sources))
    if missing:
        raise MkaInputError(f"{gguf.name} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    check_disk_space(out, sum(i.nbytes for i in items), "the converted model")

    def produce(info: TensorInfo) -> torch.Tensor:
        tensor = sources[info.name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=name_map, parsed_parameters={}
        )
        if result.name != tensor.name:
            raise MkaInputError(
                f"{gguf.name}: {architecture} tensors are renamed on load; unsupported"
            )
        t = torch.from_numpy(np.array(result.weights, dtype=np.float32))  # a writable copy
        return t.reshape(info.shape)

    report(progress, 0.05, f"converting {gguf.name} tensor by tensor (first load only)")
    write_shards(out, items, produce, progress=progress)
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(out)
    with contextlib.suppress(Exception):  # a model without generation defaults is still a model
        GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
