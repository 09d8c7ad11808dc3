"""A recipe built as a model in memory: the one place where merges, drops and TransAct selections
become an `nn.Module`.

Every compression method is a recipe (`engine.recipe`): the engine evaluates it block by block and
the shard writer exports it tensor by tensor; for a model held in memory, `materialize` builds it
whole, from the same `block_state` arithmetic, so a method is written once and the in-memory,
streamed and exported results are the same numbers.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from mka_core.engine.layerpass import Stack, _buffers_to, build_skeleton
from mka_core.engine.recipe import LAYER_PREFIX
from mka_core.errors import MkaInputError, ProgressFn, report

log = logging.getLogger(__name__)


@torch.no_grad()
def materialize(stack: Stack, progress: ProgressFn | None = None) -> nn.Module:
    """A new model holding `stack`'s recipe, on the stack's device, sharing no tensor with the
    model the recipe reads (so training or pruning it never touches the original).

    The stored dtypes are kept (a merged tensor is summed in fp32 and cast back to its sources'
    dtype, exactly as an export writes it)."""
    if stack.streamed:
        raise MkaInputError(
            "this model is streamed from disk; build it in memory only when it fits (load it with "
            "--no-offload), or export it"
        )
    recipe, base = stack.recipe, stack.resident
    stored = {t.data_ptr() for t in (recipe.store.get(n) for n in recipe.store.names())}

    def own(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.data_ptr() in stored else t

    model = build_skeleton(recipe.config, stack.dtype)
    state = {name: own(recipe.store.get(name)) for name in recipe.other_names()}
    for j in range(recipe.n_layers):
        for rel, t in recipe.block_state(j).items():
            state[f"{LAYER_PREFIX}{j}.{rel}"] = own(t)
        report(progress, (j + 1) / recipe.n_layers, f"built layer {j + 1}/{recipe.n_layers}")
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = getattr(recipe.config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise MkaInputError(
            f"cannot build {type(model).__name__} from its recipe: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    if tied:
        model.tie_weights()
    _buffers_to(model, stack.device)
    model.generation_config = copy.deepcopy(base.generation_config)
    model.config._name_or_path = base.config._name_or_path
    trainable = any(p.requires_grad for p in base.parameters())
    return model.eval().requires_grad_(trainable)
