"""What every tensor of a compressed model is made of, as data (the plan → executor split of
mergekit, one level down: a plan says which layers; a recipe says which tensors).

Output block ``j`` of a recipe is a weighted sum of *terms*, each a block of the base model with
optional TransAct selections (kept MLP neurons, kept query heads, kept KV groups):

    θ_j = Σ_k w_k · select_k(θ_{layer_k})

Merging is a weighted sum and pruning is an index selection, and both are linear, so this form is
closed under both: a merge of pruned layers concatenates their terms, a prune of a merged layer
narrows every term. Nothing is computed until a tensor is asked for; then it is computed alone, in
float32 when it mixes several sources, and cast to the requested dtype. The same recipe feeds the
layer-by-layer engine (one block at a time) and the shard writer (one tensor at a time), so a model
evaluated in memory and the folder exported from disk are the same numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field

import torch

from mka_core.engine.adapters import (
    RESIDUAL_WRITERS,
    Narrow,
    is_mixture_of_experts,
    map_rows,
    narrow,
    narrowed_shape,
)
from mka_core.engine.weights import TensorInfo, TensorStore
from mka_core.errors import MkaInputError

LAYER_PREFIX = "model.layers."
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# list-valued config fields that are never per-layer, even when their length happens to match
_NOT_PER_LAYER = {
    "architectures",
    "bad_words_ids",
    "begin_suppress_tokens",
    "suppress_tokens",
    "forced_decoder_ids",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
}
# lists of layer indices that have some property (not one entry per layer)
_INDEX_LISTS = ("mlp_only_layers", "moe_layers")


def update_layer_config(config, first_sources: list[int], n_old: int) -> None:
    """Set the layer count and keep, of each per-layer list, each output layer's first source.

    Fields that place layers by index say the same of the new layers: a list of layer indices
    (Qwen-MoE's ``mlp_only_layers``, Llama 4's ``moe_layers``) keeps the outputs whose source is
    listed; Qwen-MoE's ``decoder_sparse_step`` (every k-th layer sparse) becomes an explicit
    ``mlp_only_layers`` with step 1; DeepSeek's ``first_k_dense_replace`` counts the outputs whose
    source is among the first k. (Compositions keep layer order, so the dense ones stay first.)"""
    config.num_hidden_layers = len(first_sources)
    step = getattr(config, "decoder_sparse_step", None)
    if isinstance(step, int) and not isinstance(step, bool) and step > 1:
        dense = set(getattr(config, "mlp_only_layers", None) or [])
        config.mlp_only_layers = sorted(dense | {i for i in range(n_old) if (i + 1) % step})
        config.decoder_sparse_step = 1
    for key in _INDEX_LISTS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            listed = set(value)
            setattr(config, key, type(value)(j for j, s in enumerate(first_sources) if s in listed))
    k = getattr(config, "first_k_dense_replace", None)
    if isinstance(k, int) and not isinstance(k, bool):
        config.first_k_dense_replace = sum(1 for s in first_sources if s < k)
    for key, value in list(vars(config).items()):
        if key.startswith("_") or key in _NOT_PER_LAYER or key in _INDEX_LISTS:
            continue
        if isinstance(value, (list, tuple)) and len(value) == n_old:
            setattr(config, key, type(value)([value[i] for i in first_sources]))


@torch.no_grad()
def weighted_sum(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_k · parts[k] in float32 (a composition's weights sum to 1: identical parts give the
    first part back exactly, without rounding)."""
    if all(torch.equal(parts[0], p) for p in parts[1:]):
        return parts[0]
    if not parts[0].is_floating_point():
        return parts[0]  # integer buffers cannot be averaged; all blocks carry the same ones
    acc = parts[0].float() * weights[0]
    for part, w in zip(parts[1:], weights[1:], strict=True):
        acc.add_(part.float(), alpha=w)
    return acc


@dataclass(frozen=True, eq=False)
class Term:
    """One base block in an output block: its weight, its TransAct selections (None: all), and
    the corrections a compensation fused into what it writes to the residual stream."""

    layer: int
    weight: float
    # kept intermediate neurons, base indices: (kept,), or (n_experts, kept) for experts
    mlp: torch.Tensor | None = None
    heads: torch.Tensor | None = None  # kept query heads, base indices
    kv: torch.Tensor | None = None  # kept KV groups, base indices
    scale: float = 1.0  # factor on the attention and MLP outputs (`compensate`, scale)
    mlp_map: torch.Tensor | None = None  # (d, d) T: the MLP output x becomes x·T (linear)
    # the block's tensors held in memory instead of read from the base layer (a flattened merge)
    given: dict[str, torch.Tensor] | None = None

    @property
    def plain(self) -> bool:
        return (
            self.mlp is None
            and self.heads is None
            and self.kv is None
            and self.scale == 1.0
            and self.mlp_map is None
            and self.given is None
        )

    @property
    def selected(self) -> bool:
        return self.mlp is not None or self.heads is not None or self.kv is not None

    def corrected(self, scale: float = 1.0, mlp_map: torch.Tensor | None = None) -> Term:
        """This term with its outputs scaled by `scale` and its MLP output mapped by `mlp_map`
        after whatever it had (maps compose: x·T₁ then ·T₂ is x·(T₁T₂))."""
        new_map = self.mlp_map
        if mlp_map is not None:
            mlp_map = mlp_map.to(torch.float32)
            new_map = mlp_map if new_map is None else new_map @ mlp_map
        return dataclasses.replace(self, scale=self.scale * scale, mlp_map=new_map)

    @property
    def selection(self) -> dict:
        return {"mlp": self.mlp, "heads": self.heads, "kv": self.kv}

    def narrowed(self, mlp=None, heads=None, kv=None) -> Term:
        """This term with selections applied on top of its own (indices into what it keeps)."""

        def on(old, new):
            if new is None:
                return old
            new = torch.as_tensor(new, dtype=torch.long)
            if old is None:
                return new
            return old.gather(-1, new) if new.dim() == 2 else old[..., new]

        return dataclasses.replace(
            self, mlp=on(self.mlp, mlp), heads=on(self.heads, heads), kv=on(self.kv, kv)
        )


@dataclass(eq=False)
class ModelRecipe:
    """A model as its base tensors plus, per output block, the terms it sums (see module doc)."""

    store: TensorStore
    base_config: object  # the config of the model `store` holds
    config: object  # the config of the model this recipe builds
    blocks: list[tuple[Term, ...]]
    _names: list[str] = field(default_factory=list, repr=False)
    # how selections narrow each block tensor (by name within the block; `adapters.BlockAdapter`)
    rules: dict[str, Narrow] = field(default_factory=dict)

    @classmethod
    def identity(cls, store: TensorStore, config) -> ModelRecipe:
        n = int(config.num_hidden_layers)
        return cls(store, config, copy.deepcopy(config), [(Term(i, 1.0),) for i in range(n)])

    # -- structure --------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def head_dim(self) -> int:
        c = self.base_config
        return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    def is_identity_block(self, j: int) -> bool:
        (t, *rest) = self.blocks[j]
        return not rest and t.plain and t.weight == 1.0

    @property
    def is_identity(self) -> bool:
        """True when this recipe builds its base model unchanged."""
        n_base = int(self.base_config.num_hidden_layers)
        return self.n_layers == n_base and all(
            self.is_identity_block(j) and self.blocks[j][0].layer == j for j in range(n_base)
        )

    def block_names(self, layer: int) -> list[str]:
        """Names of one base block's tensors, relative to the block (``self_attn.q_proj.weight``)."""
        if not self._names:
            self._names = self.store.names()
        prefix = f"{LAYER_PREFIX}{layer}."
        return [n[len(prefix) :] for n in self._names if n.startswith(prefix)]

    def other_names(self) -> list[str]:
        """Tensors outside the blocks (embeddings, final norm, LM head), in stored order."""
        if not self._names:
            self._names = self.store.names()
        return [n for n in self._names if not n.startswith(LAYER_PREFIX)]

    def compose(self, composition) -> ModelRecipe:
        """The recipe of `composition` (output layers as [(position, weight), ...] over *this*
        recipe's output layers): a merge concatenates the terms, scaled by the weights.

        Mixture-of-experts blocks are never merged: expert k of one layer has nothing to do with
        expert k of another (the router of each layer learned its own assignment), so a weighted
        average of their weights has no meaning; dropping them is fine."""
        self.check_composition(composition)
        blocks = []
        for group in composition:
            terms = []
            for pos, w in group:
                terms += [
                    dataclasses.replace(t, weight=t.weight * w) if w != 1.0 else t
                    for t in self.blocks[pos]
                ]
            blocks.append(tuple(terms))
        cfg = copy.deepcopy(self.config)
        update_layer_config(cfg, [g[0][0] for g in composition], self.n_layers)
        return ModelRecipe(self.store, self.base_config, cfg, blocks, self._names, self.rules)

    def check_composition(self, composition) -> None:
        """Refuse, in one line, a composition this model cannot build: a merge of
        mixture-of-experts blocks (see `compose`)."""
        for group in composition:
            if len(group) < 2:
                continue
            layers = [t.layer for pos, _ in group for t in self.blocks[pos]]
            if any(is_mixture_of_experts(self.block_names(layer)) for layer in layers):
                *first, last = [str(pos) for pos, _ in group]
                raise MkaInputError(
                    f"cannot merge layers {', '.join(first)} and {last}: they are "
                    f"mixture-of-experts blocks, and expert k of one layer is unrelated to expert "
                    f"k of another, so their weights have no meaningful average; drop layers instead"
                )

    def prune(self, selections: list[dict], sizes: dict, rules: dict[str, Narrow]) -> ModelRecipe:
        """Every output block narrowed by its selection ({"mlp", "heads", "kv"}: indices into what
        the block keeps now; for experts, "mlp" has one row per expert); `sizes` sets the config
        (the MLP width, num_attention_heads, num_key_value_heads), the same in every layer;
        `rules` says which tensors each unit kind narrows (the blocks' `adapters.BlockAdapter`)."""
        if len(selections) != self.n_layers:
            raise MkaInputError(f"{len(selections)} selections for {self.n_layers} layers")
        blocks = [
            tuple(t.narrowed(**sel) for t in terms)
            for terms, sel in zip(self.blocks, selections, strict=True)
        ]
        cfg = copy.deepcopy(self.config)
        for key, value in sizes.items():
            setattr(cfg, key, value)
        cfg.head_dim = self.head_dim  # explicit: it may no longer equal hidden_size // n_heads
        return ModelRecipe(self.store, self.base_config, cfg, blocks, self._names, dict(rules))

    # -- tensors ----------------------------------------------------------------------------

    def _base_counts(self) -> dict:
        c = self.base_config
        n_heads = int(c.num_attention_heads)
        return {"heads": n_heads, "kv": int(getattr(c, "num_key_value_heads", None) or n_heads)}

    def _select(self, term: Term, rel: str, t: torch.Tensor) -> torch.Tensor:
        rule = self.rules.get(rel)
        if rule is None or not term.selected:
            return t
        return narrow(t, rule, term.selection, self._base_counts(), self.head_dim)

    def _shape(self, term: Term, rel: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        rule = self.rules.get(rel)
        if rule is None or not term.selected:
            return shape
        return narrowed_shape(shape, rule, term.selection, self._base_counts(), self.head_dim)

    def _term_tensor(self, term: Term, rel: str, fetch) -> torch.Tensor:
        """Tensor `rel` of one term: read (or given), selected, then corrected (in float32 when
        a correction applies)."""
        raw = (
            term.given[rel]
            if term.given is not None
            else fetch(f"{LAYER_PREFIX}{term.layer}.{rel}")
        )
        t = self._select(term, rel, raw)
        writer = RESIDUAL_WRITERS.get(rel)
        if writer is None or (term.scale == 1.0 and term.mlp_map is None):
            return t
        kind, dim = writer
        t = t.float()
        if kind == "mlp" and term.mlp_map is not None:
            t = map_rows(t, term.mlp_map.to(t.device), dim)
        return t * term.scale if term.scale != 1.0 else t

    def source_names(self, j: int) -> list[str]:
        """The stored tensors output block `j` is computed from."""
        return [
            f"{LAYER_PREFIX}{t.layer}.{rel}"
            for t in self.blocks[j]
            if t.given is None
            for rel in self.block_names(t.layer)
        ]

    def block_tensor(
        self, j: int, rel: str, dtype: torch.dtype | None = None, fetch=None
    ) -> torch.Tensor:
        """Tensor `rel` of output block `j`, computed now (fp32 when it mixes sources); `fetch`
        reads a stored tensor by name (default: the store; the engine passes prefetched ones)."""
        fetch = fetch or self.store.get
        terms = self.blocks[j]
        stored = self._stored_dtype(terms[0], rel)
        parts = [self._term_tensor(t, rel, fetch) for t in terms]
        for t, p in zip(terms[1:], parts[1:]):
            if p.shape != parts[0].shape:
                raise MkaInputError(
                    f"cannot merge layers {terms[0].layer} and {t.layer}: {rel} has shape "
                    f"{tuple(parts[0].shape)} vs {tuple(p.shape)}"
                )
        if len(parts) == 1:
            assert terms[0].weight == 1.0, terms  # a composition's weights sum to 1
            out = parts[0]
        else:
            out = weighted_sum(parts, [t.weight for t in terms])
        target = dtype or stored  # merged or corrected sums go back to the sources' dtype
        if out.is_floating_point() and out.dtype != target:
            out = out.to(target)
        return out

    def _stored_dtype(self, term: Term, rel: str) -> torch.dtype:
        if term.given is not None:
            return term.given[rel].dtype
        return self.store.info(f"{LAYER_PREFIX}{term.layer}.{rel}").dtype

    def block_state(
        self, j: int, dtype: torch.dtype | None = None, fetch=None
    ) -> dict[str, torch.Tensor]:
        """Every tensor of output block `j` (names relative to the block)."""
        names = self.block_names(self.blocks[j][0].layer)
        for t in self.blocks[j][1:]:
            if self.block_names(t.layer) != names:
                raise MkaInputError(
                    f"cannot merge layers {self.blocks[j][0].layer} and {t.layer}: their blocks "
                    f"hold different tensors"
                )
        return {rel: self.block_tensor(j, rel, dtype, fetch) for rel in names}

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Any tensor of the output model by its full name."""
        m = _LAYER_RE.match(name)
        if m:
            return self.block_tensor(int(m.group(1)), m.group(2), dtype)
        t = self.store.get(name)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def infos(self, dtype: torch.dtype | None = None) -> list[TensorInfo]:
        """Name, shape and dtype of every output tensor, in the order a checkpoint stores them:
        embeddings, blocks in order, then the rest."""
        others = self.other_names()
        embed = [n for n in others if "embed" in n]
        rest = [n for n in others if n not in embed]
        out = []

        def cast(d: torch.dtype) -> torch.dtype:
            return dtype if dtype is not None and d.is_floating_point else d

        for n in embed:
            i = self.store.info(n)
            out.append(TensorInfo(n, i.shape, cast(i.dtype)))
        for j, terms in enumerate(self.blocks):
            t0 = terms[0]
            for rel in self.block_names(t0.layer):
                if t0.given is not None:
                    g = t0.given[rel]
                    i = TensorInfo(rel, tuple(g.shape), g.dtype)
                else:
                    i = self.store.info(f"{LAYER_PREFIX}{t0.layer}.{rel}")
                out.append(
                    TensorInfo(
                        f"{LAYER_PREFIX}{j}.{rel}", self._shape(t0, rel, i.shape), cast(i.dtype)
                    )
                )
        for n in rest:
            i = self.store.info(n)
            out.append(TensorInfo(n, i.shape, cast(i.dtype)))
        return out

    def n_params(self) -> int:
        """Parameters of the output model (a tied LM head counted once, as stored)."""
        return sum(i.numel for i in self.infos() if i.dtype.is_floating_point)
