"""TransAct: structured pruning inside the modules of every block (Shen et al. 2024, TransAct).

The hidden size and the number of layers stay; what shrinks is the MLP's intermediate width and the
number of attention heads (Shen et al. 2024, "Search for Efficient LLMs", arXiv 2407.05690).

Scores come from one forward pass over the calibration batch, with pre-hooks on the two projections
that read the units out of the residual stream:

- MLP neuron ``j`` of layer ``l``: the L2 norm, over every real calibration token, of input ``j`` of
  ``mlp.down_proj`` (that is ``act(gate(x)) * up(x)``). In a mixture of experts, neuron ``j`` of
  expert ``e``: the same inside the expert, over the tokens routed to it, each scaled by the
  router's weight for the expert.
- Query head ``h``: the L2 norm of its ``head_dim`` slice of the input of ``self_attn.o_proj``.

Which tensors hold which units comes from the block's adapter (`engine.adapters`: separate or
fused projections, experts). TransAct prunes every expert's neurons alike and keeps the router:
every expert keeps the same number of neurons (one ``moe_intermediate_size`` in the config), each
expert its own best ones by its own scores. Neuron ``j`` of one expert shares nothing with neuron
``j`` of another, so one shared index set would keep some experts' weakest neurons for the sake of
others' strongest.

A unit whose activation is small everywhere contributes little to the residual, so it goes first.
Every layer keeps the same sizes, so the result is a standard config that plain transformers loads.

Grouped-query attention: query heads come in ``n_kv_heads`` groups of ``n_heads // n_kv_heads``
consecutive heads that share one KV head. The kept head counts follow one chain of valid shapes:

1. while at least one query head per group is asked for, every KV group stays and keeps its top
   ``p`` query heads (the same ``p`` everywhere): ``n_heads = n_kv_heads * p``;
2. below one head per group, whole KV groups go: a group's score is the sum of its heads' scores,
   the top ``g`` groups stay with their best head each: ``n_heads = n_kv_heads = g``.

A requested count between two shapes of the chain is rounded *up* to the next one (keep at least
what was asked), skipping head counts that do not divide ``hidden_size`` (transformers' configs
refuse those when saving). Pruning is iterative: ``shots`` rounds on a linear ramp from the current
sizes to the target, re-scoring the partly pruned model before each round.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from mka_core.data.corpus import CalibrationBatch
from mka_core.engine.adapters import BlockAdapter, model_adapter, module_shapes
from mka_core.engine.layerpass import LayerPass, Stack, as_stack
from mka_core.engine.materialize import materialize
from mka_core.engine.recipe import LAYER_PREFIX
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.models.loading import count_params, get_layers

log = logging.getLogger(__name__)

FORMAT = "mka-transact-report"
VERSION = 1


@dataclass(frozen=True)
class TransActScores:
    """Unit scores of one scoring pass (higher = more important)."""

    mlp: np.ndarray  # (n_layers, width), or (n_layers, n_experts, width) for experts; float32
    heads: np.ndarray  # (n_layers, n_heads) float32


@dataclass(frozen=True)
class TransActReport:
    """What a prune did: sizes before/after, the schedule, and the scores for plotting."""

    original_intermediate_size: int
    new_intermediate_size: int
    original_n_heads: int
    new_n_heads: int
    original_n_kv_heads: int
    new_n_kv_heads: int
    head_dim: int
    params_before: int
    params_after: int
    # one dict per shot: intermediate_size, n_heads, n_kv_heads (after the shot), seconds
    shots: list[dict] = field(default_factory=list)
    # the scores of the last scoring pass, (n_layers, units at that time), and the original index
    # of every unit scored there, so a plot can place them on the unpruned axis; with experts, an
    # MLP unit is (expert e, neuron j), numbered e * original_intermediate_size + j
    mlp_scores: list[list[float]] = field(default_factory=list)
    mlp_scores_index: list[list[int]] = field(default_factory=list)
    head_scores: list[list[float]] = field(default_factory=list)
    head_scores_index: list[list[int]] = field(default_factory=list)
    # original indices of the units that survived, per layer: (n_layers, new size)
    mlp_kept: list[list[int]] = field(default_factory=list)
    heads_kept: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    n_experts: int = 0  # experts per MoE block (each keeps new_intermediate_size); 0: dense

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> TransActReport:
        if d.get("format") != FORMAT:
            raise MkaInputError(
                f"not a TransAct report: format is {d.get('format')!r}, expected {FORMAT}"
            )
        if d.get("version") != VERSION:
            raise MkaInputError(f"unsupported TransAct report version {d.get('version')!r}")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def param_reduction(self) -> float:
        """Fraction of the parameters removed."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0


# ---------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class _Shape:
    intermediate: int  # an expert's width, for experts
    n_heads: int
    n_kv: int
    head_dim: int
    n_experts: int = 0

    @property
    def per_group(self) -> int:
        return self.n_heads // self.n_kv


def _block_shapes(model) -> list[dict[str, tuple[int, ...]]]:
    """Tensor names (within the block) and shapes of every block, as the model holds them now."""
    if isinstance(model, nn.Module):
        return [module_shapes(layer) for layer in get_layers(model)]
    out: list[dict] = [{} for _ in range(model.n_layers)]
    for info in model.recipe.infos():
        if info.name.startswith(LAYER_PREFIX):
            j, rel = info.name[len(LAYER_PREFIX) :].split(".", 1)
            out[int(j)][rel] = info.shape
    return out


def _adapter(model) -> tuple[BlockAdapter, dict[str, tuple[int, ...]]]:
    """The blocks' one adapter, and block 0's tensor shapes."""
    shapes = _block_shapes(model)
    return model_adapter(shapes), shapes[0]


def _shape(model) -> _Shape:
    cfg = model.config
    adapter, shapes = _adapter(model)
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    o_in = shapes["self_attn.o_proj.weight"][1]
    if o_in != n_heads * head_dim or n_heads % n_kv:
        raise MkaInputError(
            f"config does not match the weights: {n_heads} heads x {head_dim} head_dim over {n_kv} "
            f"KV heads, but o_proj takes {o_in} inputs"
        )
    key = adapter.mlp_size_key(cfg)
    width = adapter.mlp_width(shapes)
    if getattr(cfg, key, None) != width:
        raise MkaInputError(
            f"config does not match the weights: {key} is {getattr(cfg, key, None)}, but the "
            f"blocks' MLP ({adapter.mlp}) is {width} wide"
        )
    return _Shape(width, n_heads, n_kv, head_dim, adapter.n_experts)


def _head_chain(shape: _Shape, d_model: int) -> list[tuple[int, int]]:
    """Valid (kept KV groups, query heads per group) from small to large (see module docstring)."""
    chain = [(g, 1) for g in range(1, shape.n_kv)]
    chain += [(shape.n_kv, p) for p in range(1, shape.per_group + 1)]
    if d_model % shape.n_heads == 0:  # the config class may insist; stay loadable
        chain = [(g, p) for g, p in chain if d_model % (g * p) == 0]
    return chain


def _snap_heads(chain: list[tuple[int, int]], target: int) -> tuple[int, int]:
    """The smallest valid shape with at least `target` query heads."""
    for g, p in chain:
        if g * p >= target:
            return g, p
    return chain[-1]


def _resolve_keep(value, total: int, what: str) -> int:
    """A ratio in (0, 1] or an absolute count (int > 1) as a count in [1, total]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MkaInputError(f"{what} must be a ratio in (0, 1] or a count (int > 1), got {value!r}")
    if isinstance(value, numbers.Integral) and int(value) != 1:
        n = int(value)
        if n < 1:
            raise MkaInputError(f"{what} must be positive, got {n}")
        if n > total:
            raise MkaInputError(f"{what} = {n} is larger than the model's {total}")
        return n
    x = float(value)
    if not math.isfinite(x) or x <= 0 or x > 1:
        raise MkaInputError(
            f"{what} ratio must be in (0, 1], got {value!r} (use an int for an absolute count)"
        )
    return max(1, round(x * total))


def target_shape(model: nn.Module, mlp_keep=1.0, heads_keep=1.0) -> dict:
    """The sizes `prune` would reach, without pruning: original and kept intermediate size,
    query heads and KV heads, and query heads per kept KV group (see the module docstring)."""
    shape = _shape(model)
    inter = _resolve_keep(mlp_keep, shape.intermediate, "mlp_keep")
    g, p = _snap_heads(
        _head_chain(shape, int(model.config.hidden_size)),
        _resolve_keep(heads_keep, shape.n_heads, "heads_keep"),
    )
    return {
        "intermediate": (shape.intermediate, inter),
        "n_heads": (shape.n_heads, g * p),
        "n_kv_heads": (shape.n_kv, g),
        "per_group": p,
        "head_dim": shape.head_dim,
    }


# ---------------------------------------------------------------------------------------------
# scoring


def score_units(model, batch: CalibrationBatch, batch_size: int = 16) -> TransActScores:
    """Score every MLP neuron and query head of `model` (in memory or streamed) in one pass over
    the calibration batch, block by block."""

    if not isinstance(batch, CalibrationBatch) or batch.n_samples < 1:
        raise MkaInputError("calibration batch is empty or not a CalibrationBatch")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MkaInputError(f"batch size must be an integer >= 1, got {batch_size!r}")
    adapter, _ = _adapter(model)
    shape = _shape(model)
    stack = as_stack(model)
    n_layers = stack.n_layers
    # sums of squares, accumulated on the device in fp32; one row of neurons per expert
    groups = max(shape.n_experts, 1)
    mlp_sq = torch.zeros(n_layers, groups, shape.intermediate, device=stack.device)  # (L, E, I)
    head_sq = torch.zeros(n_layers, shape.n_heads, device=stack.device)  # (n_layers, n_heads)
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    lp = LayerPass.start(stack, batch.input_ids, batch.attention_mask, batch_size=batch_size)

    def mask() -> torch.Tensor:  # (B, T, 1) of the batch being run: padding tokens add nothing
        b = lp.batches[lp.current]
        m = b.mask if b.mask is not None else torch.ones_like(b.ids)
        return m.unsqueeze(-1).float()

    def tokens() -> torch.Tensor:  # (B·T,), the batch's tokens flattened as MoE blocks do
        return mask().reshape(-1)

    def hooks(j: int, block: nn.Module) -> list:
        def head_hook(module, args):
            x = args[0].float()  # (B, T, n_heads * head_dim)
            x = x.view(*x.shape[:-1], shape.n_heads, shape.head_dim)  # (B, T, nh, hd)
            head_sq[j] += (x.square() * mask().unsqueeze(-1)).sum(dim=(0, 1, 3))

        return [
            *adapter.register_mlp_scores(block, mlp_sq[j], tokens),
            block.self_attn.o_proj.register_forward_pre_hook(head_hook),
        ]

    try:
        lp.run(hooks=hooks)
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    mlp = mlp_sq.sqrt().cpu().numpy().astype(np.float32)
    return TransActScores(
        mlp=mlp if shape.n_experts else mlp[:, 0],
        heads=head_sq.sqrt().cpu().numpy().astype(np.float32),
    )


# ---------------------------------------------------------------------------------------------
# slicing


def _choose_heads(scores: np.ndarray, shape: _Shape, g_new: int, p_new: int) -> tuple[list, list]:
    """Which KV groups and which query heads (current indices, sorted) survive in one layer."""
    per = scores.reshape(shape.n_kv, shape.per_group)  # (n_kv, per_group)
    groups = np.arange(shape.n_kv)
    if g_new < shape.n_kv:
        # whole groups go: a group is worth the sum of its heads (stable sort: ties keep order)
        order = np.argsort(-per.sum(axis=1), kind="stable")
        groups = np.sort(order[:g_new])
    heads = []
    for g in groups:
        top = np.sort(np.argsort(-per[g], kind="stable")[:p_new])
        heads.extend(int(g) * shape.per_group + int(h) for h in top)
    return [int(g) for g in groups], heads


def _config_sizes(shape: _Shape, mlp_key: str) -> dict:
    return {
        mlp_key: shape.intermediate,
        "num_attention_heads": shape.n_heads,
        "num_key_value_heads": shape.n_kv,
        "head_dim": shape.head_dim,  # explicit: it no longer equals hidden_size // n_heads
    }


def _top_neurons(scores: np.ndarray, keep: int) -> np.ndarray:
    """Indices (sorted) of the `keep` best neurons: (keep,) of (width,) scores, or for experts
    (n_experts, keep) of (n_experts, width), each expert by its own scores (stable: ties keep
    order, so an expert no calibration token reached keeps its first neurons)."""
    return np.sort(np.argsort(-scores, axis=-1, kind="stable")[..., :keep], axis=-1)


def _schedule(shape0: _Shape, d_model: int, mlp_keep, heads_keep, shots) -> list[tuple]:
    """(width, KV groups, heads per group) after each shot: a linear ramp from the current sizes
    to the target, snapped to valid shapes."""
    if isinstance(shots, bool) or not isinstance(shots, numbers.Integral) or not 1 <= shots <= 64:
        raise MkaInputError(f"shots must be an integer from 1 to 64, got {shots!r}")
    shots = int(shots)
    mlp_target = _resolve_keep(mlp_keep, shape0.intermediate, "mlp_keep")
    head_target = _resolve_keep(heads_keep, shape0.n_heads, "heads_keep")
    chain = _head_chain(shape0, d_model)
    g_target, p_target = _snap_heads(chain, head_target)
    if g_target * p_target != head_target:
        log.info(
            "heads_keep %s -> %d query heads: rounded up to %d (%d KV groups x %d)",
            *(heads_keep, head_target, g_target * p_target, g_target, p_target),
        )
    plan = []
    for s in range(1, shots + 1):
        inter = round(shape0.intermediate + (mlp_target - shape0.intermediate) * s / shots)
        n_h = round(shape0.n_heads + (g_target * p_target - shape0.n_heads) * s / shots)
        plan.append((inter, *_snap_heads(chain, n_h)))
    plan[-1] = (mlp_target, g_target, p_target)
    return plan


@dataclass
class _Run:
    """The state of one prune: the model so far, and the original index of every unit it keeps."""

    out: Stack  # the recipe so far (over the model in memory, or streamed)
    adapter: BlockAdapter
    shape: _Shape
    mlp_index: list  # per layer: (width,), or (n_experts, width) original neuron indices
    head_index: list  # per layer: (n_heads,) original head indices

    def shot(self, scores: TransActScores, inter: int, g_new: int, p_new: int) -> None:
        """Cut every layer to `inter` neurons and `g_new` KV groups of `p_new` heads."""
        shape = self.shape
        changes_mlp = inter < shape.intermediate
        changes_heads = (g_new, p_new) != (shape.n_kv, shape.per_group)
        selections = []
        for i in range(len(self.mlp_index)):
            sel, groups = {}, []
            if changes_mlp:
                top = _top_neurons(scores.mlp[i], inter)
                sel["mlp"] = torch.as_tensor(top, dtype=torch.long)
                self.mlp_index[i] = np.take_along_axis(self.mlp_index[i], top, axis=-1)
            if changes_heads:
                groups, heads = _choose_heads(scores.heads[i], shape, g_new, p_new)
                sel["heads"] = torch.as_tensor(heads, dtype=torch.long)
                if len(groups) < shape.n_kv:
                    sel["kv"] = torch.as_tensor(groups, dtype=torch.long)
                self.head_index[i] = self.head_index[i][heads]
            selections.append(sel)
        self.shape = _Shape(inter, g_new * p_new, g_new, shape.head_dim, shape.n_experts)
        key = self.adapter.mlp_size_key(self.out.config)
        self.out = self.out.prune(selections, _config_sizes(self.shape, key), self.adapter.rules)


def _flat_units(index: np.ndarray, width: int) -> list[int]:
    """Original MLP unit numbers of one layer: neuron j, or e * width + j in expert e."""
    if index.ndim == 1:
        return index.tolist()
    return (index + width * np.arange(index.shape[0])[:, None]).reshape(-1).tolist()


def _make_report(
    run: _Run, shape0: _Shape, params_before: int, shot_log, scores, last_index, t_start
) -> TransActReport:
    i0, shape, n_layers = shape0.intermediate, run.shape, len(run.mlp_index)
    return TransActReport(
        original_intermediate_size=i0,
        new_intermediate_size=shape.intermediate,
        original_n_heads=shape0.n_heads,
        new_n_heads=shape.n_heads,
        original_n_kv_heads=shape0.n_kv,
        new_n_kv_heads=shape.n_kv,
        head_dim=shape.head_dim,
        params_before=params_before,
        params_after=count_params(run.out),
        shots=shot_log,
        mlp_scores=scores.mlp.reshape(n_layers, -1).tolist(),
        mlp_scores_index=[_flat_units(a, i0) for a in last_index[0]],
        head_scores=scores.heads.tolist(),
        head_scores_index=[a.tolist() for a in last_index[1]],
        mlp_kept=[_flat_units(a, i0) for a in run.mlp_index],
        heads_kept=[a.tolist() for a in run.head_index],
        seconds=round(time.perf_counter() - t_start, 3),
        n_experts=shape0.n_experts,
    )


def _built(model: nn.Module, built: nn.Module, inplace: bool) -> nn.Module:
    """`built`, or with `inplace` the caller's model given its blocks and config."""
    if not inplace:
        return built
    model.model.layers = built.model.layers
    for key, value in vars(built.config).items():
        if not key.startswith("_"):
            setattr(model.config, key, value)
    return model


# ---------------------------------------------------------------------------------------------
# the entry point


def prune(
    model,
    batch: CalibrationBatch,
    mlp_keep: float = 1.0,
    heads_keep: float = 1.0,
    shots: int = 4,
    progress: ProgressFn | None = None,
    inplace: bool = False,
    batch_size: int = 16,
) -> tuple[nn.Module, TransActReport]:
    """Prune MLP neurons and query heads of every block to the kept sizes (see module docstring).

    mlp_keep / heads_keep: a ratio in (0, 1] of the model's current intermediate size (an expert's,
    for experts) / query heads, or an absolute count (an int > 1; ``1`` means the ratio 1.0, keep
    all). Returns the pruned model (a new one; the given model itself, changed, when `inplace`) and
    a TransActReport. Every cut is recorded in the model's recipe (`engine.recipe`) and made when a
    block is built: a streamed model gives a streamed result, a model in memory the recipe built
    whole (`engine.materialize`), so both are the same numbers.
    """
    t_start = time.perf_counter()
    adapter, _ = _adapter(model)
    shape0 = _shape(model)
    streamed = not isinstance(model, nn.Module)
    if not isinstance(batch, CalibrationBatch) or batch.n_samples < 1 or batch.n_tokens < 1:
        raise MkaInputError("calibration batch is empty or not a CalibrationBatch")
    plan = _schedule(shape0, int(model.config.hidden_size), mlp_keep, heads_keep, shots)
    shots = len(plan)

    params_before = count_params(model)
    out = as_stack(model)  # every cut is a recipe selection, in memory and streamed alike
    n_layers = out.n_layers
    width = np.arange(shape0.intermediate)
    run = _Run(
        out,
        adapter,
        shape0,
        [np.tile(width, (shape0.n_experts, 1)) if shape0.n_experts else width] * n_layers,
        [np.arange(shape0.n_heads)] * n_layers,
    )
    scores: TransActScores | None = None
    last_index = (run.mlp_index, run.head_index)
    shot_log = []
    for s, (inter, g_new, p_new) in enumerate(plan):
        t0 = time.perf_counter()
        now = run.shape
        changes = inter < now.intermediate or (g_new, p_new) != (now.n_kv, now.per_group)
        if changes or (scores is None and s == shots - 1):
            report(progress, s / shots, f"shot {s + 1}/{shots}: scoring")
            scores = score_units(run.out, batch, batch_size=batch_size)
            last_index = (list(run.mlp_index), list(run.head_index))
        if changes:
            run.shot(scores, inter, g_new, p_new)
        shape = run.shape
        shot_log.append(
            {
                "intermediate_size": shape.intermediate,
                "n_heads": shape.n_heads,
                "n_kv_heads": shape.n_kv,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        report(
            progress,
            (s + 1) / shots,
            f"shot {s + 1}/{shots}: intermediate {shape.intermediate}, "
            f"{shape.n_heads} heads over {shape.n_kv} KV heads",
        )
    out, shape = run.out, run.shape
    if not streamed:  # the recipe built in memory: the model an export of it would reload
        out = _built(model, materialize(out), inplace)
        assert get_layers(out)[0].self_attn.o_proj.in_features == shape.n_heads * shape.head_dim
    rep = _make_report(run, shape0, params_before, shot_log, scores, last_index, t_start)
    log.info(
        "TransAct: intermediate %d -> %d, heads %d/%d -> %d/%d, params %d -> %d",
        *(shape0.intermediate, shape.intermediate, shape0.n_heads, shape0.n_kv),
        *(shape.n_heads, shape.n_kv, rep.params_before, rep.params_after),
    )
    return out, rep
