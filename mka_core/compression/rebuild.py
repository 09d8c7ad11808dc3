"""Applying a plan with calibration data: flattened merges and compensated cuts, in one sequential
pass (llm-compressor's sequential pipeline: each block is rebuilt from the inputs the rebuilt
blocks above it give).

The original model (the teacher) and the plan's model (the student) run side by side over the
calibration batch, block by block, streamed when the model is. At output block ``p``:

1. if it merges several layers and the merge mode is ``flatten``, its layers are flattened on the
   student's input (`flatten`) and it becomes a block of tensors held in memory;
2. the student runs it; if it stands for more than its single source (a merge, or removed blocks
   after it) and a compensation is asked for, the teacher runs to the last layer it stands for,
   and the correction is solved and fused (`compensate`); the student goes on from the corrected
   output.

Each block is read once by the teacher and once by the student, as in two forward passes of the
calibration set.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from mka_core.compression import flatten as fl
from mka_core.compression.compensate import CutStats, is_cut, spans
from mka_core.compression.refinement import Refine
from mka_core.data.corpus import CalibrationBatch
from mka_core.engine.adapters import residual_writers_problem
from mka_core.engine.layerpass import LayerPass, Stack
from mka_core.engine.recipe import LAYER_PREFIX, Term
from mka_core.errors import MkaInputError, ProgressFn, report

log = logging.getLogger(__name__)


def check_refinement(stack: Stack, composition, merge: str, compensation: str) -> None:
    """Refuse, in one line and before any work, what this model's layout cannot take."""
    Refine(merge, compensation)  # both known
    recipe = stack.recipe
    n_base = int(recipe.base_config.num_hidden_layers)
    first, ends = spans(composition, n_base) if compensation != "none" else (0, [])
    for group in composition:
        if len(group) > 1 and merge == "flatten":
            for src, _ in group:
                why = fl.flatten_problem(recipe.block_names(src))
                if why:
                    raise MkaInputError(f"cannot flatten layer {src}: {why}")
    if compensation == "none":
        return
    for p, group in enumerate(composition):
        if is_cut(group, ends[p]) or (first > 0 and compensation == "scale"):
            why = residual_writers_problem(recipe.block_names(group[0][0]))
            if why:
                raise MkaInputError(f"cannot compensate at layer {group[0][0]}: {why}")
    if first > 0 and compensation == "linear":
        raise MkaInputError(
            f"linear compensation of removing layer 0{'' if first == 1 else f'-{first - 1}'} "
            f"would have to change the embeddings; keep the first layer (protect it) or use scale"
        )


@dataclasses.dataclass
class RefineReport:
    flattened: list[dict]  # per flattened block: sources, seconds
    cuts: list[dict]  # per compensated block: output block, last layer, scale or map norm
    seconds: float


def refine(
    base: Stack,
    student: Stack,
    composition,
    batch: CalibrationBatch,
    merge: str = "average",
    compensation: str = "none",
    batch_size: int = 16,
    progress: ProgressFn | None = None,
) -> tuple[Stack, RefineReport]:
    """The student stack (`base` composed by `composition`) with its merges flattened and its
    cuts compensated as asked (see the module doc); unchanged when there is nothing to do."""
    check_refinement(base, composition, merge, compensation)
    flat = merge == "flatten" and any(len(g) > 1 for g in composition)
    if not flat and compensation == "none":
        return student, RefineReport([], [], 0.0)
    if not isinstance(batch, CalibrationBatch) or batch.n_samples < 1:
        raise MkaInputError("flattening or compensating needs calibration data")
    t0 = time.perf_counter()
    n_base = base.n_layers
    first, ends = spans(composition, n_base)
    teacher = LayerPass.start(base, batch.input_ids, batch.attention_mask, batch_size)
    lp = teacher.fork(student)
    blocks = list(student.recipe.blocks)
    report_ = RefineReport([], [], 0.0)
    scales = [1.0] * len(composition)  # scale: the stream's cumulative factor before block p
    cum = 1.0
    if compensation == "scale" and first > 0:
        teacher.run(stop=first)
        cum *= _scale_at(teacher, lp)
    for p, group in enumerate(composition):
        if flat and len(group) > 1:
            t_block = time.perf_counter()
            blocks[p] = (flatten_block(lp, p, group),)
            lp.stack = student = with_blocks(student, blocks)
            took = time.perf_counter() - t_block
            report_.flattened.append(
                {"block": p, "sources": [s for s, _ in group], "seconds": took}
            )
        scales[p] = cum
        cut = compensation != "none" and is_cut(group, ends[p])
        if not cut:
            lp.run(stop=p + 1)
            report(progress, (p + 1) / len(composition), f"block {p + 1}/{len(composition)}")
            continue
        teacher.run(stop=ends[p] + 1)
        if compensation == "linear":
            t = linear_at(teacher.hidden, lp, p)
            blocks[p] = tuple(term.corrected(mlp_map=t) for term in blocks[p])
            lp.stack = student = with_blocks(student, blocks)
            eye = torch.eye(len(t), device=t.device)
            change = float((t - eye).norm() / eye.norm())
            report_.cuts.append({"block": p, "through": ends[p], "map_change": change})
        else:
            lp.run(stop=p + 1)
            s = _scale_at(teacher, lp)
            cum *= s
            report_.cuts.append({"block": p, "through": ends[p], "scale": s})
        report(progress, (p + 1) / len(composition), f"block {p + 1}/{len(composition)}")
    if compensation == "scale":
        # the simulated stream was multiplied by s at each cut; the fused model divides what each
        # later block writes instead (the same model up to one factor the final norm removes)
        blocks = [
            tuple(t.corrected(scale=1.0 / s) for t in terms) if s != 1.0 else terms
            for terms, s in zip(blocks, scales, strict=True)
        ]
    report_.seconds = time.perf_counter() - t0
    return with_blocks(student, blocks), report_


def with_blocks(stack: Stack, blocks) -> Stack:
    """`stack` with its output blocks (tuples of terms) replaced."""
    return stack._derived(dataclasses.replace(stack.recipe, blocks=list(blocks)))


def _real(lp: LayerPass, b: int) -> torch.Tensor:
    """(B, T) 1 on the tokens every statistic here counts: real ones, past the first position
    (LMs put massive activations there, which would outweigh every other token)."""
    batch = lp.batches[b]
    mask = batch.mask
    m = torch.ones(batch.ids.shape, device=batch.ids.device) if mask is None else mask.float()
    m = m.clone()
    m[:, 0] = 0
    return m


@torch.inference_mode()
def _scale_at(teacher: LayerPass, lp: LayerPass) -> float:
    """Multiply the student's stream by the ratio of the teacher's mean hidden-state norm to
    its own (real tokens only), and return that ratio."""
    num = den = 0.0
    for b, (ht, hs) in enumerate(zip(teacher.hidden, lp.hidden, strict=True)):
        m = _real(lp, b)
        nt, ns = ht.float().norm(dim=-1) * m, hs.float().norm(dim=-1) * m
        num += float(nt.sum())
        den += float(ns.sum())
    s = num / den if den > 0 else 1.0
    lp.hidden = [(h.float() * s).to(h.dtype) for h in lp.hidden]
    return s


@torch.inference_mode()
def linear_at(target: list[torch.Tensor], lp: LayerPass, p: int) -> torch.Tensor:
    """Run student block p, capturing its MLP output; solve the map T of its MLP output that
    best reaches `target` (the teacher's hidden states, per batch); continue the student from
    the corrected output."""
    captured: list[torch.Tensor] = []

    def hooks(j, block):
        def keep(module, args, out):
            captured.append(out[0] if isinstance(out, tuple) else out)

        return [block.mlp.register_forward_hook(keep)]

    lp.run(stop=p + 1, hooks=hooks)
    d = lp.hidden[0].shape[-1]
    stats = CutStats(d, lp.stack.device)
    for b, (m, out, goal) in enumerate(zip(captured, lp.hidden, target, strict=True)):
        stats.add(m, out - m, goal, _real(lp, b))
    with torch.inference_mode(False):
        t = stats.linear_map().clone()
    lp.hidden = [
        (out.float() - m.float() + m.float() @ t).to(out.dtype)
        for m, out in zip(captured, lp.hidden, strict=True)
    ]
    return t


@torch.inference_mode()
def flatten_block(lp: LayerPass, p: int, group) -> Term:
    """Output block p (the layers of `group`, plain) flattened on the inputs `lp` holds (the
    pass stands at block p; it is not advanced)."""
    stack = lp.stack
    recipe = stack.recipe
    if not all(t.plain for t in recipe.blocks[p]):
        raise MkaInputError(f"flatten reads plain layers; output layer {p} is already changed")
    srcs = [s for s, _ in group]
    states = [
        {rel: recipe.store.get(f"{LAYER_PREFIX}{s}.{rel}") for rel in recipe.block_names(s)}
        for s in srcs
    ]
    kw = stack.kw_layer(p)
    layer = stack.skeleton.model.layers[kw]
    cfg = recipe.config
    d = int(cfg.hidden_size)
    offset = fl.norm_offset(
        type(layer.input_layernorm), d, float(getattr(cfg, "rms_norm_eps", 1e-6))
    )
    k = len(srcs)
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = recipe.head_dim
    width = int(cfg.intermediate_size)
    fused = any(name.startswith(tuple(fl.FUSED)) for name in states[0])
    sizes = fl.fused_sizes(n_heads * head_dim, n_kv * head_dim, width)
    wide = fl.wide_state([fl.unfuse(s, sizes) for s in states], offset)
    blk = fl.build_block(
        type(layer), fl.wide_config(cfg, k), kw, fl.fuse(wide, fused), stack.device, stack.dtype
    )
    stats = fl.WideStats(k * n_heads * head_dim, k * width, stack.device)
    handles = stats.hooks(blk, lambda: _real(lp, lp.current))
    try:
        for b, h in enumerate(lp.hidden):
            lp.current = b
            args, kwargs = lp.calls[b][kw]
            blk(h, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    del blk
    heads, groups, neurons = fl.choose(stats, k, n_heads, n_kv, head_dim, width)
    state = fl.fuse(fl.narrow_wide(wide, stats, heads, groups, neurons, head_dim), fused)
    with torch.inference_mode(False):  # plain tensors: a built model may train them
        state = {name: t.to(states[0][name].dtype).clone() for name, t in state.items()}
    return Term(srcs[0], 1.0, given=state)
