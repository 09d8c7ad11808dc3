"""Applying a plan: the compressed model's decoder blocks from the composition.

Each output block is the weighted sum of its source blocks' tensors (attention, MLP, norms,
biases and floating buffers), computed in float32 and cast back; a block with a single source is a
copy of the original block, bit for bit. The config's layer count and its per-layer lists, and each
block's KV-cache index (``layer_idx``), follow the new block list. In memory and streamed alike this
is the model's recipe composed with the plan (`engine.recipe`); in memory it is then built whole
(`engine.materialize`).
"""

from __future__ import annotations

import logging

from torch import nn

from mka_core.compression.plan import Plan, check_fingerprint
from mka_core.compression.rebuild import check_refinement, refine
from mka_core.data.corpus import CalibrationBatch
from mka_core.engine.layerpass import Stack, as_stack
from mka_core.engine.materialize import materialize
from mka_core.engine.recipe import update_layer_config
from mka_core.errors import MkaInputError, ProgressFn, report

log = logging.getLogger(__name__)


def apply_plan(
    model,
    plan: Plan,
    inplace: bool = False,
    progress: ProgressFn | None = None,
    batch: CalibrationBatch | None = None,
    batch_size: int = 16,
):
    """A new model whose decoder blocks follow `plan`'s composition (the given model itself,
    changed, when `inplace`).

    The caller's model is never touched when ``inplace=False``. The result runs ``forward`` and
    ``generate`` (with KV cache) and saves with ``save_pretrained`` into a standard folder.

    A streamed model (`engine.Stack`) gives a streamed result: the composition, computed block by
    block when it is evaluated or tensor by tensor when it is exported (`export.save_model`).

    A plan that flattens its merges or compensates its cuts (`plan.refine`) is built on `batch`,
    its calibration data, in one sequential pass (`rebuild.refine`).
    """
    model = getattr(model, "model", model) if not isinstance(model, nn.Module | Stack) else model
    if not isinstance(model, nn.Module | Stack):
        raise MkaInputError(f"apply_plan needs a torch model, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise MkaInputError(f"apply_plan needs a Plan, got {type(plan).__name__}")
    stack = as_stack(model)
    if plan.model.num_layers != stack.n_layers:
        raise MkaInputError(
            f"the plan is for a {plan.model.num_layers}-layer model ({plan.model.source}), "
            f"but this model has {stack.n_layers} layers"
        )
    warning = check_fingerprint(plan, model)
    if warning:
        log.warning(warning)
    composed = stack.compose(plan.layers)
    if plan.needs_data:
        if batch is None:
            raise MkaInputError(
                f"this plan builds its layers with {plan.refine.label.lstrip(':+')} and needs "
                f"calibration data"
            )
        composed, rep = refine(
            stack,
            composed,
            plan.layers,
            batch,
            plan.refine.merge,
            plan.refine.compensation,
            batch_size=batch_size,
            progress=progress,
        )
        log.info("refined in %.1f s: %s", rep.seconds, rep)
    else:
        check_refinement(stack, plan.layers, plan.refine.merge, plan.refine.compensation)
    if stack.streamed:
        return composed
    report(progress, 0.0, f"applying plan: {stack.n_layers} → {composed.n_layers} layers")
    built = materialize(composed, progress)  # the recipe a streamed model evaluates, in memory
    if inplace:  # the caller's model takes the new blocks and config
        model.model.layers = built.model.layers
        configs = {id(c): c for c in (model.config, getattr(model.model, "config", None)) if c}
        for config in configs.values():
            update_layer_config(config, [group[0][0] for group in plan.layers], stack.n_layers)
        built = model
    log.info("applied plan: %d → %d layers", stack.n_layers, composed.n_layers)
    return built
