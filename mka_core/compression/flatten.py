"""Flatten merge (FlattenGPT, arXiv 2602.08858): k similar adjacent layers become one.

The k blocks are put side by side in one block k times as wide that reads the same residual input:
every layer's attention heads (with their KV groups under grouped-query attention) and MLP neurons
next to each other's, the two projections that write back summing what each layer wrote. Each
layer's pre-norm weights are folded into the projections that read from that norm (an RMSNorm's
weight g scales the normalised input, so ``W·(g ⊙ x̂) = (W·diag g)·x̂``), and the wide block's norms
become plain. The only approximation is that the later layers now read the same input as the first.

The wide block is then pruned back to the model's standard sizes with TransAct's activation scores
on calibration data: whole KV groups with their query heads (a group's score: the summed squared
activations of its heads), and the MLP neurons of all k layers competing on one scale. The kept
units' output projections are then refitted by least squares on the same activations, so the kept
units also stand in for the removed ones: with ``A`` the activations entering ``down_proj`` (or
``o_proj``) and ``K`` the kept units, ``W_K ← argmin ‖A_K W_Kᵀ − A Wᵀ‖² + λ‖W_K‖²``, whose normal
equations need only the Gram matrix ``AᵀA`` accumulated in the same pass that gives the scores
(its diagonal): each batch's in float32 (at most a few thousand tokens, at the speed of a float32
matrix product), the batches' sum in float64. Padding and the first position (its massive
activations) are left out. The result is a block of the standard config: a plain checkpoint with
one layer fewer per merged pair.

Layouts: separate q/k/v/o and gate/up/down projections with pre-norms (Llama, Mistral, Qwen2, Gemma
1: an RMSNorm of the form ``(1 + w)`` is detected and folded the same way), and fused ``qkv_proj`` /
``gate_up_proj`` (Phi-3: split into their parts, flattened part by part, fused again). Refused,
with the reason: norms on the outputs (OLMo-2, Gemma-2/3: what each layer writes is normalised on
its own, which no single wide projection reproduces), per-head query/key norms (Qwen3: one norm
weight per block, different in each layer) and mixtures of experts.
"""

from __future__ import annotations

import copy

import torch
from accelerate import init_empty_weights

from mka_core.errors import MkaInputError

RIDGE = 0.1  # λ relative to the kept units' mean Gram diagonal (1e-5 … 1 tried; 0.1 best)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
FUSED = {  # a fused projection and its parts, in order
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
}
_ALLOWED = {
    *_NORMS,
    *(f"self_attn.{p}.{k}" for p in _ATTN for k in ("weight", "bias")),
    *(f"mlp.{p}.{k}" for p in _MLP for k in ("weight", "bias")),
    *(f"{p}.{k}" for p in FUSED for k in ("weight", "bias")),
}


def flatten_problem(names: list[str]) -> str | None:
    """Why a block (tensor names relative to it) cannot be flattened exactly, or None."""
    roots = {n.rsplit(".", 1)[0] for n in names}
    if any(r in roots for r in ("post_feedforward_layernorm", "pre_feedforward_layernorm")):
        return (
            "its attention and MLP outputs are normalised before they join the residual stream "
            "(OLMo-2, Gemma-2/3), and no one wide projection reproduces two such norms"
        )
    if {"self_attn.q_norm", "self_attn.k_norm"} & roots:
        return (
            "it normalises queries and keys with its own q_norm/k_norm (Qwen3, OLMo-2), and a "
            "flattened block has only one"
        )
    if any(".experts." in f".{n}" for n in names):
        return "it is a mixture of experts, whose experts of different layers do not correspond"
    extra = sorted(set(names) - _ALLOWED)
    missing = [
        n for n in (*_NORMS, "self_attn.o_proj.weight", "mlp.down_proj.weight") if n not in names
    ]
    if not {"self_attn.q_proj.weight", "self_attn.qkv_proj.weight"} & set(names):
        missing.append("self_attn.q_proj.weight")
    if not {"mlp.gate_proj.weight", "mlp.gate_up_proj.weight"} & set(names):
        missing.append("mlp.gate_proj.weight")
    if extra or missing:
        what = f"holds {', '.join(extra[:3])}" if extra else f"lacks {', '.join(missing[:3])}"
        return f"it {what}, outside the q/k/v/o and gate/up/down layout flatten knows"
    return None


def norm_offset(norm_cls, d: int, eps: float) -> float:
    """0 for an RMSNorm that multiplies by its weight, 1 for one that multiplies by 1 + weight
    (Gemma): read from the norm itself, run on ones with a zero weight."""
    try:
        norm = norm_cls(d, eps=eps)
    except TypeError:
        norm = norm_cls(d)
    with torch.no_grad():
        norm.weight.zero_()
        return float(norm(torch.ones(1, d)).mean())


def unfuse(state: dict, sizes: dict[str, list[int]]) -> dict:
    """A block's tensors with its fused projections (Phi-3's ``qkv_proj``, ``gate_up_proj``) split
    into their parts' names; `sizes`: each fused projection's part sizes (rows), in order."""
    out = {}
    for name, t in state.items():
        root, _, kind = name.rpartition(".")
        if root in FUSED:
            group = root.rpartition(".")[0]
            for part, chunk in zip(FUSED[root], t.split(sizes[root]), strict=True):
                out[f"{group}.{part}.{kind}"] = chunk
        else:
            out[name] = t
    return out


def fuse(state: dict, fused: bool) -> dict:
    """The inverse of `unfuse` (when the block's layout is `fused`): the parts concatenated."""
    if not fused:
        return state
    out = dict(state)
    for root, parts in FUSED.items():
        group = root.rpartition(".")[0]
        for kind in ("weight", "bias"):
            names = [f"{group}.{part}.{kind}" for part in parts]
            if names[0] in out:
                out[f"{root}.{kind}"] = torch.cat([out.pop(n) for n in names])
    return out


def fused_sizes(q: int, kv: int, width: int) -> dict[str, list[int]]:
    """The part sizes of the fused projections of a block with q query rows, kv key (and value)
    rows and `width` MLP neurons."""
    return {"self_attn.qkv_proj": [q, kv, kv], "mlp.gate_up_proj": [width, width]}


def wide_state(states: list[dict[str, torch.Tensor]], offset: float) -> dict[str, torch.Tensor]:
    """The k blocks side by side, their pre-norm weights folded in, in float32."""
    out = {}
    g1 = [s["input_layernorm.weight"].float() + offset for s in states]
    g2 = [s["post_attention_layernorm.weight"].float() + offset for s in states]
    readers = [(f"self_attn.{p}", g1) for p in ("q_proj", "k_proj", "v_proj")]
    readers += [(f"mlp.{p}", g2) for p in ("gate_proj", "up_proj")]
    for key, gains in readers:  # each reads its layer's norm: the norm's weight folded in
        out[f"{key}.weight"] = torch.cat(
            [s[f"{key}.weight"].float() * g[None, :] for s, g in zip(states, gains)]
        )
        if f"{key}.bias" in states[0]:
            out[f"{key}.bias"] = torch.cat([s[f"{key}.bias"].float() for s in states])
    for key in ("self_attn.o_proj", "mlp.down_proj"):
        out[f"{key}.weight"] = torch.cat([s[f"{key}.weight"].float() for s in states], dim=1)
        if f"{key}.bias" in states[0]:
            out[f"{key}.bias"] = sum(s[f"{key}.bias"].float() for s in states)
    for name in _NORMS:
        out[name] = torch.full_like(states[0][name], 1.0 - offset, dtype=torch.float32)
    return out


def refit(gram: torch.Tensor, keep: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The output projection (d, len(keep)) of the kept units that best reproduces, on the
    activations whose Gram matrix is `gram` (n, n), what `w` (d, n) gave from all n units."""
    g_kk = gram[keep][:, keep]
    lam = RIDGE * float(g_kk.diagonal().mean()) + 1e-12
    rhs = gram[keep] @ w.double().T  # (k, d): A_Kᵀ A Wᵀ
    g_kk = g_kk + lam * torch.eye(len(keep), dtype=g_kk.dtype, device=g_kk.device)
    return torch.linalg.solve(g_kk, rhs).T.float()


class WideStats:
    """Gram matrices of the activations entering o_proj and down_proj of the wide block."""

    def __init__(self, n_attn: int, n_mlp: int, device):
        self.attn = torch.zeros(n_attn, n_attn, dtype=torch.float64, device=device)
        self.mlp = torch.zeros(n_mlp, n_mlp, dtype=torch.float64, device=device)

    def hooks(self, block, mask_fn) -> list:
        def add(gram):
            def hook(module, args):
                x = args[0].reshape(-1, args[0].shape[-1])
                x = x[mask_fn().reshape(-1).bool()].float()  # the tokens that count
                gram.add_((x.T @ x).double())  # one batch summed in float32, batches in float64

            return hook

        return [
            block.self_attn.o_proj.register_forward_pre_hook(add(self.attn)),
            block.mlp.down_proj.register_forward_pre_hook(add(self.mlp)),
        ]


def choose(stats: WideStats, k: int, n_heads: int, n_kv: int, head_dim: int, width: int):
    """Kept units of the wide block: (query heads, KV groups, MLP neurons), sorted, so that the
    result has the standard n_heads, n_kv and width. Groups go whole with their query heads."""
    per_group = n_heads // n_kv
    da, dm = stats.attn.diagonal(), stats.mlp.diagonal()
    head_sq = da.reshape(k * n_heads, head_dim).sum(dim=1)
    group_sq = head_sq.reshape(k * n_kv, per_group).sum(dim=1)
    groups = torch.topk(group_sq, n_kv).indices.sort().values
    heads = (groups[:, None] * per_group + torch.arange(per_group, device=groups.device)).reshape(
        -1
    )
    neurons = torch.topk(dm, width).indices.sort().values
    return heads.cpu(), groups.cpu(), neurons.cpu()


def _rows(idx: torch.Tensor, unit: int) -> torch.Tensor:
    return (idx[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)


def narrow_wide(wide: dict, stats: WideStats, heads, groups, neurons, head_dim: int) -> dict:
    """The standard-size block: the kept units' rows, and the refitted output projections."""
    q_rows, kv_rows = _rows(heads, head_dim), _rows(groups, head_dim)
    out = {}
    for name, t in wide.items():
        if name.startswith("self_attn.q_proj"):
            out[name] = t[q_rows]
        elif name.startswith(("self_attn.k_proj", "self_attn.v_proj")):
            out[name] = t[kv_rows]
        elif name.startswith(("mlp.gate_proj", "mlp.up_proj")):
            out[name] = t[neurons]
        else:
            out[name] = t
    dev = stats.attn.device
    out["self_attn.o_proj.weight"] = refit(
        stats.attn, q_rows.to(dev), wide["self_attn.o_proj.weight"].to(dev)
    ).cpu()
    out["mlp.down_proj.weight"] = refit(
        stats.mlp, neurons.to(dev), wide["mlp.down_proj.weight"].to(dev)
    ).cpu()
    return out


def wide_config(config, k: int):
    """The config of a block k times as wide (k times the heads, KV groups and MLP neurons)."""
    cfg = copy.deepcopy(config)
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    cfg.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    cfg.num_attention_heads = k * n_heads
    cfg.num_key_value_heads = k * n_kv
    cfg.intermediate_size = k * int(cfg.intermediate_size)
    return cfg


def build_block(cls, config, layer_idx: int, state: dict, device, dtype):
    """A decoder layer of class `cls` holding `state`, on `device` in `dtype`."""
    with init_empty_weights(include_buffers=False):
        try:
            blk = cls(config, layer_idx)
        except TypeError as e:
            raise MkaInputError(f"cannot build a {cls.__name__} for flattening ({e})") from None
    blk.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return blk.to(device).eval().requires_grad_(False)
