"""Quantization as GGUF stores it: which tensors get which type, and a quantize → dequantize round
trip with the very quantizers the GGUF export writes with (gguf-py's `quants`, the reference
implementation of llama.cpp's formats).

One rule, shared by the export and the round trip, so a model evaluated with `--quant Q8_0` is the
model a Q8_0 GGUF file holds: tensors of one dimension (norms, biases) stay F32; every weight
matrix (2-D or more: projections, experts, embeddings and the LM head) takes the chosen type; a
matrix whose rows are not a whole number of the type's blocks falls back to F16, as llama.cpp's
converter does. Block types quantize each row in blocks of 32 values with one scale per block
(Q8_0: 8-bit codes; Q5_0 / Q4_0: 5 / 4 bits, symmetric; Q5_1 / Q4_1 add an offset).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize, quantize
from torch import nn

from mka_core.engine.layerpass import Stack, as_stack
from mka_core.engine.weights import SafetensorsStore, TensorInfo, TensorStore
from mka_core.errors import MkaInputError

QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
QUANT_HELP = {
    "F32": "no quantization (4 bytes per weight)",
    "F16": "half precision (2 bytes per weight)",
    "BF16": "bfloat16 (2 bytes per weight)",
    "Q8_0": "8-bit blocks of 32 with one fp16 scale (8.5 bits per weight)",
    "Q5_1": "5-bit blocks of 32 with a scale and an offset (6 bits per weight)",
    "Q5_0": "5-bit blocks of 32 with one scale (5.5 bits per weight)",
    "Q4_1": "4-bit blocks of 32 with a scale and an offset (5 bits per weight)",
    "Q4_0": "4-bit blocks of 32 with one scale (4.5 bits per weight)",
}
# the k-quants: gguf-py reads them but cannot write them (no quantizer in the package)
READ_ONLY_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FALLBACK = GGMLQuantizationType.F16


def check_quant(name) -> str:
    """A quantization type's canonical name (case-insensitive), or one line naming the choices."""
    text = str(name).strip().upper()
    if text in QUANT_TYPES:
        return text
    if text in READ_ONLY_TYPES:
        raise MkaInputError(
            f"{text}: the gguf package reads this k-quant but cannot write it; choose one of "
            f"{', '.join(QUANT_TYPES)}"
        )
    raise MkaInputError(
        f"unknown quantization type {name!r}; choose one of {', '.join(QUANT_TYPES)}"
    )


def ggml_type(quant: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[check_quant(quant)]


def storage_type(shape, quant: str) -> GGMLQuantizationType:
    """The type a tensor of `shape` is stored in under `quant` (the module doc's rule)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return GGMLQuantizationType.F32
    qtype = ggml_type(quant)
    block, _ = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return FALLBACK
    return qtype


def stored_bytes(shape, qtype: GGMLQuantizationType) -> int:
    """Bytes a tensor of `shape` takes when stored as `qtype`."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    return n // block * type_size


def encode(t: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """`t` in GGUF's storage form for `qtype`: float arrays for F32/F16, bytes otherwise."""
    a = t.detach().to(torch.float32).cpu().numpy()
    if qtype == GGMLQuantizationType.F32:
        return a
    if qtype == GGMLQuantizationType.F16:
        return a.astype(np.float16)
    return quantize(a, qtype)


def decode(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return np.asarray(data, dtype=np.float32)
    return dequantize(data, qtype)


def round_trip(t: torch.Tensor, quant: str) -> torch.Tensor:
    """`t` quantized as the GGUF export stores it and read back, in `t`'s dtype and device."""
    return _stored_as(t, storage_type(t.shape, quant))


def _stored_as(t: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    """`t` encoded as `qtype` and decoded back, in `t`'s dtype and device."""
    if qtype == GGMLQuantizationType.F32:  # exact for every float dtype a model holds
        return t
    back = decode(encode(t, qtype), qtype).reshape(tuple(t.shape))
    return torch.from_numpy(np.ascontiguousarray(back)).to(device=t.device, dtype=t.dtype)


def quantized_bytes(infos: list[TensorInfo], quant: str) -> int:
    """Tensor bytes of a model (its stored tensors `infos`) in a GGUF file of type `quant`."""
    return sum(stored_bytes(i.shape, storage_type(i.shape, quant)) for i in infos)


class QuantizedStore(TensorStore):
    """Another store's tensors, each read through `round_trip` (rows are quantized independently,
    so a range of rows reads the same as those rows of the whole matrix)."""

    def __init__(self, store: TensorStore, quant: str):
        self.store = store
        self.quant = check_quant(quant)

    def names(self) -> list[str]:
        return self.store.names()

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def info(self, name: str) -> TensorInfo:
        return self.store.info(name)

    def get(self, name: str) -> torch.Tensor:
        return round_trip(self.store.get(name), self.quant)

    def _rows(self, name: str, t: torch.Tensor) -> torch.Tensor:
        # the storage type follows the whole tensor's shape, not the rows read
        return _stored_as(t, storage_type(self.store.info(name).shape, self.quant))

    def get_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        return self._rows(name, self.store.get_rows(name, rows))

    def get_row_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._rows(name, self.store.get_row_range(name, start, stop))


def gguf_bytes(model, quant: str) -> int:
    """Tensor bytes of `model` (in memory or a stack) in a GGUF file of type `quant`."""
    return quantized_bytes(as_stack(model).recipe.infos(), quant)


def quantized(model, quant: str):
    """`model` as a GGUF file of type `quant` would hold it: a copy of a model in memory with every
    weight passed through `round_trip`, or a folder streamed through a `QuantizedStore`.

    A compressed model that is streamed (its blocks computed from the original's on the fly) is
    refused: its weights exist only once exported; evaluate the exported folder instead."""
    quant = check_quant(quant)
    if isinstance(model, nn.Module):
        out = copy.deepcopy(model)
        with torch.no_grad():
            for p in out.parameters():  # a tied head is the embedding's parameter: done once
                p.copy_(round_trip(p.data, quant))
        return out
    stack = as_stack(model)
    identity = all(stack.recipe.is_identity_block(j) for j in range(stack.n_layers))
    if (
        stack.folder is None
        or not identity
        or stack.n_layers != stack.recipe.base_config.num_hidden_layers
    ):
        raise MkaInputError(
            "a compressed model streamed from disk exists only when exported: export it "
            "(apply --out DIR) and evaluate the folder with --quant"
        )
    return Stack.from_folder(
        stack.folder,
        stack.device,
        stack.dtype,
        config=stack.recipe.base_config,
        store=QuantizedStore(SafetensorsStore(stack.folder), quant),
    )
