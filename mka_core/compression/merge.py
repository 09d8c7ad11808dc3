"""Applying a plan: build the compressed model's decoder blocks from the composition.

Each output block is the weighted sum of its source blocks' tensors (attention, MLP, norms,
biases and floating buffers), computed in float32 and cast back; a block with a single source is the
original block itself, bit for bit. Then the KV-cache index of every block (``layer_idx``), the
config's layer count and its per-layer lists are made to agree with the new block list.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from mka_core.compression.plan import Plan, check_fingerprint
from mka_core.engine.layerpass import Stack
from mka_core.engine.recipe import update_layer_config, weighted_sum
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.models.loading import get_layers

log = logging.getLogger(__name__)


def _block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a merge must mix: parameters and floating-point buffers, by name."""
    out = {name: p for name, p in block.named_parameters()}
    out.update({name: b for name, b in block.named_buffers() if b.is_floating_point()})
    return out


@torch.no_grad()
def _merge_into(blocks: list[nn.Module], weights: list[float], sources: list[int]) -> nn.Module:
    """Overwrite blocks[0] with Σ w_k · blocks[k] (fp32 arithmetic, cast back) and return it."""
    target = blocks[0]
    tensors = [_block_tensors(b) for b in blocks]
    names = list(tensors[0])
    for k, t in enumerate(tensors[1:], start=1):
        if list(t) != names:
            raise MkaInputError(
                f"cannot merge layers {sources[0]} and {sources[k]}: their blocks hold different "
                f"tensors"
            )
    for name in names:
        parts = [t[name] for t in tensors]
        for k, part in enumerate(parts[1:], start=1):
            if part.shape != parts[0].shape:
                raise MkaInputError(
                    f"cannot merge layers {sources[0]} and {sources[k]}: {name} has shape "
                    f"{tuple(parts[0].shape)} vs {tuple(part.shape)}"
                )
        acc = weighted_sum(parts, weights)  # the same arithmetic as a streamed export's
        if acc is not parts[0]:
            parts[0].copy_(acc.to(parts[0].dtype))
        del acc
    return target


def _renumber(blocks: nn.ModuleList) -> None:
    """The KV cache is keyed by layer_idx, so every module that carries one gets its new index."""
    for pos, block in enumerate(blocks):
        for module in block.modules():
            idx = getattr(module, "layer_idx", None)
            if isinstance(idx, int) and not isinstance(idx, bool):
                module.layer_idx = pos


def apply_plan(
    model,
    plan: Plan,
    inplace: bool = False,
    progress: ProgressFn | None = None,
):
    """A new model (a deep copy, unless `inplace`) whose decoder blocks follow `plan`'s composition.

    The caller's model is never touched when ``inplace=False``. The result runs ``forward`` and
    ``generate`` (with KV cache) and saves with ``save_pretrained`` into a standard folder.

    A streamed model (`engine.Stack`) gives a streamed result: the composition, computed block by
    block when it is evaluated or tensor by tensor when it is exported (`export.save_model`).
    """

    model = getattr(model, "model", model) if not isinstance(model, nn.Module | Stack) else model
    if isinstance(model, Stack):
        return _apply_streamed(model, plan)
    if not isinstance(model, nn.Module):
        raise MkaInputError(f"apply_plan needs a torch model, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise MkaInputError(f"apply_plan needs a Plan, got {type(plan).__name__}")
    n_old = len(get_layers(model))
    if plan.model.num_layers != n_old:
        raise MkaInputError(
            f"the plan is for a {plan.model.num_layers}-layer model ({plan.model.source}), "
            f"but this model has {n_old} layers"
        )
    warning = check_fingerprint(plan, model)
    if warning:
        log.warning(warning)

    composition = plan.layers
    report(progress, 0.0, f"applying plan: {n_old} → {len(composition)} layers")
    if not inplace:
        model = copy.deepcopy(model)
    old = list(get_layers(model))
    new_blocks: list[nn.Module] = []
    for pos, group in enumerate(composition):
        sources = [i for i, _ in group]
        if len(group) == 1:
            assert group[0][1] == 1.0, group  # a composition's weights sum to 1
            new_blocks.append(old[sources[0]])
        else:
            blocks = [old[i] for i in sources]
            new_blocks.append(_merge_into(blocks, [w for _, w in group], sources))
            log.debug("output layer %d = %s", pos, group)
        report(progress, (pos + 1) / len(composition), f"built layer {pos + 1}/{len(composition)}")
    del old  # the blocks of dropped (and merged-away) layers go with the old list

    layers = nn.ModuleList(new_blocks)
    model.model.layers = layers
    _renumber(layers)
    configs = {id(c): c for c in (model.config, getattr(model.model, "config", None)) if c}
    for config in configs.values():
        update_layer_config(config, [group[0][0] for group in composition], n_old)
    log.info("applied plan: %d → %d layers", n_old, len(composition))
    return model


def _apply_streamed(stack, plan: Plan):
    if not isinstance(plan, Plan):
        raise MkaInputError(f"apply_plan needs a Plan, got {type(plan).__name__}")
    if plan.model.num_layers != stack.n_layers:
        raise MkaInputError(
            f"the plan is for a {plan.model.num_layers}-layer model ({plan.model.source}), "
            f"but this model has {stack.n_layers} layers"
        )
    warning = check_fingerprint(plan, stack)
    if warning:
        log.warning(warning)
    return stack.compose(plan.layers)
