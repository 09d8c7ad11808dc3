"""How a Hugging Face checkpoint is laid out in a GGUF file that llama.cpp runs: which families can
be written, each tensor's GGUF name and the conventions llama.cpp's converter
(``convert_hf_to_gguf.py``) applies and transformers' GGUF reader
(``modeling_gguf_pytorch_utils.py``) undoes, and the model's hyperparameters under llama.cpp's keys.

Names come from gguf-py's own maps (``gguf.get_tensor_name_map``). The conventions:
- Llama-architecture attention (Llama, Mistral) stores the query and key rows of each head
  interleaved for llama.cpp's rotary layout (the converter's ``permute``); other families rotate
  the halves of a head (NeoX style) and are stored as they are.
- Gemma-3 stores every RMSNorm weight as ``1 + w`` (llama.cpp multiplies by the stored value).
- A mixture of experts stores each projection of a layer as one 3-D tensor (experts, rows, cols).
- Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` are llama.cpp's fused ``attn_qkv`` / ``ffn_up``.

A family is offered only where the written file reads back exactly in an independent reader
(transformers); everything the file cannot say (sliding windows llama.cpp would not apply, a
rotary scaling it does not know, Gemma-3 layers no longer in its fixed pattern) is refused in one
line before anything is written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, RopeScalingType, get_tensor_name_map

from mka_core.engine.weights import TensorStore
from mka_core.errors import MkaInputError


@dataclass(frozen=True)
class Family:
    """What one transformers ``model_type`` becomes in GGUF."""

    arch: MODEL_ARCH
    permute_qk: bool = False  # llama.cpp's interleaved rotary rows (Llama architecture)
    norm_shift: float = 0.0  # Gemma: RMSNorm weights stored as shift + w
    output_always: bool = False  # write output.weight even when tied to the embeddings


FAMILIES = {
    "llama": Family(MODEL_ARCH.LLAMA, permute_qk=True),
    # llama.cpp's converter writes Mistral as the Llama architecture
    "mistral": Family(MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Family(MODEL_ARCH.QWEN2),
    "qwen3": Family(MODEL_ARCH.QWEN3),
    "qwen3_moe": Family(MODEL_ARCH.QWEN3MOE),
    # the tied case is written out: llama.cpp's Phi-3 graph reads output.weight
    "phi3": Family(MODEL_ARCH.PHI3, output_always=True),
    "gemma3_text": Family(MODEL_ARCH.GEMMA3, norm_shift=1.0),
}
# families gguf-py names, refused because the file could not be checked against a reader
UNVERIFIED = {
    "mixtral": "llama.cpp writes it as the llama architecture with experts, which transformers' "
    "GGUF reader does not read back (it has no Mixtral mapping), so the file could not be checked",
    "olmo2": "transformers' GGUF reader has no OLMo-2 mapping, so the file could not be checked",
}
FILE_TYPES = {  # general.file_type (llama.cpp's LlamaFileType) of each --quant
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "BF16": 32,
}
_EXPERT_RE = re.compile(r"(.+)\.experts\.(\d+)\.(\w+)\.weight")
_FUSED_EXPERTS_RE = re.compile(r"(.+\.experts)\.(gate_up_proj|down_proj)")


def families_line() -> str:
    return ", ".join(FAMILIES)


def family_of(config: dict) -> Family:
    """The family of a config.json (as a dict), or one line saying why it cannot be written."""
    mt = config.get("model_type")
    if mt in FAMILIES:
        return FAMILIES[mt]
    if mt in UNVERIFIED:
        raise MkaInputError(
            f"GGUF export of {mt} models is not offered: {UNVERIFIED[mt]}; it writes "
            f"{families_line()}"
        )
    raise MkaInputError(
        f"cannot write a GGUF of model type {mt!r}: gguf names no llama.cpp architecture for it "
        f"here; GGUF export writes {families_line()}"
    )


def arch_name(family: Family) -> str:
    return MODEL_ARCH_NAMES[family.arch]


# ---------------------------------------------------------------------------------------------
# hyperparameters


def _head_dim(config) -> int:
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


def _rope(config, family: Family) -> dict:
    """The rotary parameters llama.cpp applies to full attention (Gemma-3: its global layers)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if family.arch == MODEL_ARCH.GEMMA3:
        local = rope.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default" or local.get("rope_theta") != 10000.0:
            raise MkaInputError(
                f"Gemma-3 sliding layers with rotary parameters {local}: llama.cpp fixes them "
                f"to the default rotation with base 10000"
            )
        rope = dict(rope.get("full_attention") or {})
    if "rope_theta" not in rope:
        rope["rope_theta"] = float(getattr(config, "rope_theta", 10000.0))
    kind = rope.get("rope_type") or "default"
    known = ("default", "linear") + (("llama3",) if family.arch == MODEL_ARCH.LLAMA else ())
    if kind not in known:
        raise MkaInputError(
            f"rotary scaling {kind!r} of this {arch_name(family)} model is not written to GGUF "
            f"(supported: {', '.join(known)})"
        )
    return rope


def check_config(config, family: Family) -> None:
    """Refuse, in one line, what llama.cpp would not compute as transformers does."""
    arch = arch_name(family)
    _rope(config, family)
    layer_types = list(getattr(config, "layer_types", None) or [])
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    max_pos = int(config.max_position_embeddings)
    if family.arch == MODEL_ARCH.GEMMA3:
        # llama.cpp: layers i % 6 < 5 slide, the rest are global; no other pattern is read
        expected = ["sliding_attention" if i % 6 < 5 else "full_attention" for i in range(n)]
        if layer_types != expected:
            raise MkaInputError(
                "this Gemma-3's sliding and full layers are not in llama.cpp's fixed pattern of "
                "five sliding layers then one full (layers were removed or reordered), so "
                "llama.cpp would attend differently; GGUF export refuses it"
            )
        head_dim = _head_dim(config)
        scalar = getattr(config, "query_pre_attn_scalar", head_dim)
        if scalar != head_dim and not (
            scalar == config.hidden_size // config.num_attention_heads and n == 62
        ):
            raise MkaInputError(
                f"Gemma-3 query_pre_attn_scalar {scalar} differs from head_dim {head_dim}: "
                f"llama.cpp scales queries by head_dim (by width/heads only for the 62-layer 27B)"
            )
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(config, key, None) is not None:
                raise MkaInputError(f"Gemma-3 {key} is not applied by llama.cpp's Gemma-3 graph")
        if not window:
            raise MkaInputError("Gemma-3 config has no sliding_window; llama.cpp needs one")
    else:
        active = "sliding_attention" in layer_types or (
            config.model_type in ("mistral", "phi3") and window and int(window) < max_pos
        )
        if active:
            raise MkaInputError(
                f"this {config.model_type} model uses sliding-window attention, which llama.cpp's "
                f"{arch} graph does not apply; GGUF export refuses it"
            )
    if family.arch == MODEL_ARCH.QWEN3MOE:
        if not getattr(config, "norm_topk_prob", False):
            raise MkaInputError(
                "Qwen3-MoE with norm_topk_prob false: llama.cpp always renormalises the routed "
                "experts' weights, so the GGUF would compute another model"
            )
        if (
            getattr(config, "mlp_only_layers", None)
            or int(getattr(config, "decoder_sparse_step", 1)) != 1
        ):
            raise MkaInputError(
                "Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step): llama.cpp "
                "expects experts in every layer"
            )


def _rope_dims(config, family: Family) -> int:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return int(_head_dim(config) * float(factor or 1.0))


def write_hparams(w: GGUFWriter, config, family: Family, n_vocab: int, quant: str) -> None:
    """The model's shape under llama.cpp's keys (what its converter writes for the family)."""
    heads = int(config.num_attention_heads)
    head_dim = _head_dim(config)
    rope = _rope(config, family)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(heads)
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(_rope_dims(config, family))
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(n_vocab)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if family.arch == MODEL_ARCH.QWEN3MOE:
        w.add_expert_count(int(config.num_experts))
        w.add_expert_used_count(int(config.num_experts_per_tok))
        w.add_expert_feed_forward_length(int(config.moe_intermediate_size))
    if family.arch == MODEL_ARCH.GEMMA3:
        w.add_sliding_window(int(config.sliding_window))
    w.add_file_type(FILE_TYPES[quant])


def llama3_rope_factors(config) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` for Llama-3 rotary scaling: per frequency, the divisor
    transformers' "llama3" rope applies (1 for short wavelengths, `factor` for long ones, a smooth
    blend between)."""
    rope = _rope(config, FAMILIES["llama"])
    dim = _rope_dims(config, FAMILIES["llama"])
    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# tensors


@dataclass(frozen=True)
class Job:
    """One GGUF tensor: its name, its shape (torch order, rows last) and how to compute it;
    `source` names the checkpoint tensor when it is stored unchanged (then a writer may read and
    encode it a range of rows at a time)."""

    name: str
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]  # float32, on the CPU
    source: str | None = None


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order for one projection of `n_head` heads: within each head, the
    two halves' rows interleaved (the inverse of transformers' ``_reverse_permute_weights``)."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def tensor_jobs(store: TensorStore, config, family: Family) -> list[Job]:
    """Every tensor of the GGUF file, in the checkpoint's order, from `store`'s tensors; one line
    naming a tensor gguf cannot name, before anything is computed."""
    n_layers = int(config.num_hidden_layers)
    names_map = get_tensor_name_map(family.arch, n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)

    def gguf_name(hf: str) -> str:
        base, dot, suffix = hf.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, dot, suffix = hf, "", ""
        layer = re.match(r"model\.layers\.(\d+)\.", hf)
        if layer and int(layer.group(1)) >= n_layers:
            raise MkaInputError(f"tensor {hf} is beyond the config's {n_layers} layers")
        name = names_map.get_name(base)
        if name is None:
            raise MkaInputError(
                f"tensor {hf} has no GGUF name in llama.cpp's {arch_name(family)} layout; "
                f"GGUF export writes the tensors of {families_line()} checkpoints"
            )
        return name + dot + suffix

    def job(hf: str, gname: str) -> Job:
        q = family.permute_qk and gname.startswith("blk.") and ".attn_q." in gname
        k = family.permute_qk and gname.startswith("blk.") and ".attn_k." in gname
        shift = family.norm_shift if gname.endswith("norm.weight") else 0.0

        def produce() -> torch.Tensor:
            t = store.get(hf).to(torch.float32)
            if q or k:
                t = _permute(t, heads if q else kv_heads)
            return t + shift if shift else t

        plain = not (q or k or shift)
        return Job(gname, tuple(store.info(hf).shape), produce, hf if plain else None)

    # one entry per GGUF tensor, in the checkpoint's order: a checkpoint name, or the key of a
    # layer's projection whose experts are stacked
    entries: list[tuple[str, str]] = []
    experts: dict[str, dict[int, str]] = {}  # stacked key -> expert index -> checkpoint name
    names = store.names()
    for hf in names:
        if hf.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older checkpoints saved; llama.cpp computes it
        if hf == "lm_head.weight" and tied and not family.output_always:
            continue  # tied: llama.cpp reads the embeddings
        m = _EXPERT_RE.fullmatch(hf)
        if m:
            key = f"{m.group(1)}.experts.{m.group(3)}"
            if key not in experts:
                experts[key] = {}
                entries.append(("experts", key))
            experts[key][int(m.group(2))] = hf
        else:
            entries.append(("tensor", hf))

    jobs: list[Job] = []
    for kind, hf in entries:
        if kind == "experts":
            jobs.append(_stacked(store, hf, experts[hf], gguf_name(hf) + ".weight"))
        elif fused := _FUSED_EXPERTS_RE.fullmatch(hf):
            jobs.extend(_fused_expert_jobs(store, hf, fused, gguf_name))
        else:
            jobs.append(job(hf, gguf_name(hf)))
    if family.output_always and tied and "lm_head.weight" not in names:
        jobs.append(job("model.embed_tokens.weight", "output.weight"))
    if _rope(config, family).get("rope_type") == "llama3":
        factors = llama3_rope_factors(config)
        jobs.append(Job("rope_freqs.weight", tuple(factors.shape), lambda: factors))
    return jobs


def _stacked(store: TensorStore, key: str, members: dict[int, str], name: str) -> Job:
    """The per-expert checkpoint tensors of one layer's projection as one (E, rows, cols)."""
    n = len(members)
    if sorted(members) != list(range(n)):
        raise MkaInputError(
            f"{key}: the checkpoint holds experts {sorted(members)}, not 0..{n - 1}"
        )
    order = [members[e] for e in range(n)]
    rows = tuple(store.info(order[0]).shape)

    def produce() -> torch.Tensor:
        return torch.stack([store.get(hf).to(torch.float32) for hf in order])

    return Job(name, (n, *rows), produce)


def _fused_expert_jobs(store: TensorStore, hf: str, m, gguf_name) -> list[Job]:
    """transformers 5's fused experts: gate_up_proj (E, 2·width, d_model) is llama.cpp's
    ffn_gate_exps (first half of the rows) and ffn_up_exps; down_proj is ffn_down_exps."""
    n_exp, rows, cols = store.info(hf).shape
    if m.group(2) == "down_proj":
        name = gguf_name(f"{m.group(1)}.down_proj")
        return [Job(name + ".weight", (n_exp, rows, cols), lambda: store.get(hf).float())]
    half = rows // 2
    out = []
    for part, start in (("gate_proj", 0), ("up_proj", half)):
        name = gguf_name(f"{m.group(1)}.{part}") + ".weight"
        out.append(
            Job(name, (n_exp, half, cols), lambda s=start: store.get(hf)[:, s : s + half].float())
        )
    return out
