"""Architecture adapters: what TransAct may narrow in a decoder block, and how a block's tensors are
laid out on disk.

Everything generic (dropping, merging, streaming, capture, evaluation, export) treats a block as
every tensor under its ``model.layers.<i>.`` prefix and needs no adapter. TransAct does: it removes
MLP neurons, query heads and KV groups, so it must know which rows or columns of which tensor hold
each unit. A `BlockAdapter` says that for one block layout, recognised by the block's tensor names
(never by ``model_type``):

- attention: separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (Llama, Mistral, Qwen2/3,
  Gemma 1/2/3, OLMo-2, Mixtral, Qwen3-MoE), or fused ``qkv_proj`` + ``o_proj`` (Phi-3), with
  optional ``q_norm``/``k_norm`` (per head in Qwen3, over every head in OLMo-2);
- MLP: ``gate_proj``/``up_proj``/``down_proj``, fused ``gate_up_proj`` + ``down_proj`` (Phi-3), or a
  mixture of experts: a router ``gate`` and ``experts`` held, as transformers 5 holds them, as two
  3-D parameters ``gate_up_proj`` (n_experts, 2·width, d_model) and ``down_proj``
  (n_experts, d_model, width) (Mixtral, Qwen3-MoE).

Units and their rows: an MLP neuron is one row of each gate/up projection and one column of the down
projection; a query head (``heads``) or a KV group (``kv``) is ``head_dim`` consecutive rows. A
`Narrow` rule says, for one tensor, which dimension is a concatenation of which unit kinds; the
same `narrow` function cuts a module's weights in memory and a recipe's tensors streamed, so the two
give the same numbers.

Checkpoints store a mixture of experts one 2-D tensor per expert and projection (what transformers'
``save_pretrained`` writes, and what hub checkpoints hold); `module_view` shows such a checkpoint
under the model's own (fused) names, and `checkpoint_items` writes an export back in the stored
layout, so a folder we write reads like one ``save_pretrained`` wrote.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.core_model_loading import revert_weight_conversion

from mka_core.engine.weights import TensorInfo, TensorStore
from mka_core.errors import MkaInputError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# narrowing one tensor


@dataclass(frozen=True)
class Narrow:
    """How a selection narrows one tensor: along `dim` the tensor is the concatenation of `parts`
    (unit kinds, in order: Phi-3's ``qkv_proj`` rows are heads, kv, kv); with `experts`, dim 0
    counts experts and each expert has its own selection of MLP neurons."""

    dim: int
    parts: tuple[str, ...]
    experts: bool = False


def _part_sizes(size: int, rule: Narrow, counts: dict, head_dim: int) -> list[int]:
    """Rows of each part along the rule's dimension: heads and kv from `counts` (units as the
    tensor holds them now), the MLP parts share what is left equally."""
    fixed = {k: counts[k] * head_dim for k in ("heads", "kv") if k in rule.parts}
    n_mlp = rule.parts.count("mlp")
    rest = size - sum(fixed[k] for k in rule.parts if k != "mlp")
    if n_mlp:
        assert rest > 0 and rest % n_mlp == 0, (size, rule, counts)
    return [fixed[k] if k != "mlp" else rest // n_mlp for k in rule.parts]


def _rows(sizes: list[int], rule: Narrow, sel: dict, head_dim: int, expert: int | None):
    """Indices kept along the rule's dimension (None: every one)."""
    if all(sel.get(k) is None for k in rule.parts):
        return None
    out, offset = [], 0
    for kind, n in zip(rule.parts, sizes, strict=True):
        idx = sel.get(kind)
        if idx is None:
            out.append(torch.arange(offset, offset + n))
        else:
            if kind == "mlp" and idx.dim() == 2:  # one row of kept neurons per expert
                idx = idx[expert]
            unit = 1 if kind == "mlp" else head_dim
            out.append(offset + (idx[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1))
        offset += n
    return torch.cat(out)


def narrow(t: torch.Tensor, rule: Narrow, sel: dict, counts: dict, head_dim: int) -> torch.Tensor:
    """`t` with only the selected units: `sel` maps a unit kind to the indices kept (into the units
    `t` holds now; for experts' MLP neurons, one row per expert, shape (n_experts, kept)) or None;
    `counts` gives the query heads and KV groups `t` holds now."""
    sizes = _part_sizes(t.shape[rule.dim], rule, counts, head_dim)
    if not rule.experts:
        rows = _rows(sizes, rule, sel, head_dim, None)
        return t if rows is None else t.index_select(rule.dim, rows.to(t.device))
    parts = []
    for e in range(t.shape[0]):
        rows = _rows(sizes, rule, sel, head_dim, e)
        part = t[e]
        parts.append(part if rows is None else part.index_select(rule.dim - 1, rows.to(t.device)))
    return torch.stack(parts)


def narrowed_shape(
    shape: tuple[int, ...], rule: Narrow, sel: dict, counts: dict, head_dim: int
) -> tuple[int, ...]:
    """The shape `narrow` gives, without reading the tensor."""
    sizes = _part_sizes(shape[rule.dim], rule, counts, head_dim)
    n = 0
    for kind, size in zip(rule.parts, sizes, strict=True):
        idx = sel.get(kind)
        if idx is None:
            n += size
        else:
            n += idx.shape[-1] * (1 if kind == "mlp" else head_dim)
    return tuple(n if d == rule.dim else s for d, s in enumerate(shape))


# ---------------------------------------------------------------------------------------------
# block layouts


# rules per part of a block, by tensor name relative to the block
_QKV = {
    "self_attn.q_proj.weight": Narrow(0, ("heads",)),
    "self_attn.q_proj.bias": Narrow(0, ("heads",)),
    "self_attn.k_proj.weight": Narrow(0, ("kv",)),
    "self_attn.k_proj.bias": Narrow(0, ("kv",)),
    "self_attn.v_proj.weight": Narrow(0, ("kv",)),
    "self_attn.v_proj.bias": Narrow(0, ("kv",)),
    "self_attn.o_proj.weight": Narrow(1, ("heads",)),
}
_FUSED_QKV = {
    "self_attn.qkv_proj.weight": Narrow(0, ("heads", "kv", "kv")),
    "self_attn.qkv_proj.bias": Narrow(0, ("heads", "kv", "kv")),
    "self_attn.o_proj.weight": Narrow(1, ("heads",)),
}
_GATE_UP_DOWN = {
    "mlp.gate_proj.weight": Narrow(0, ("mlp",)),
    "mlp.gate_proj.bias": Narrow(0, ("mlp",)),
    "mlp.up_proj.weight": Narrow(0, ("mlp",)),
    "mlp.up_proj.bias": Narrow(0, ("mlp",)),
    "mlp.down_proj.weight": Narrow(1, ("mlp",)),
}
_FUSED_GATE_UP = {
    "mlp.gate_up_proj.weight": Narrow(0, ("mlp", "mlp")),
    "mlp.gate_up_proj.bias": Narrow(0, ("mlp", "mlp")),
    "mlp.down_proj.weight": Narrow(1, ("mlp",)),
}
# the router (mlp.gate) is kept whole: every expert stays, only its width shrinks
_EXPERTS = {
    "mlp.experts.gate_up_proj": Narrow(1, ("mlp", "mlp"), experts=True),
    "mlp.experts.down_proj": Narrow(2, ("mlp",), experts=True),
}
# (layout name, the modules holding tensors, rules); a block part matches when its modules are
# exactly these (norms inside the attention aside, see `block_adapter`)
_ATTENTION = (
    ("q/k/v", {"q_proj", "k_proj", "v_proj", "o_proj"}, _QKV),
    ("fused qkv", {"qkv_proj", "o_proj"}, _FUSED_QKV),
)
_MLPS = (
    ("gate/up/down", {"gate_proj", "up_proj", "down_proj"}, _GATE_UP_DOWN),
    ("fused gate_up", {"gate_up_proj", "down_proj"}, _FUSED_GATE_UP),
    ("experts", {"gate", "experts"}, _EXPERTS),
)
_NORMS = {"q_norm": ("q_proj", "heads"), "k_norm": ("k_proj", "kv")}
KNOWN_LAYOUTS = (
    "self_attn q_proj/k_proj/v_proj/o_proj or qkv_proj/o_proj; mlp gate_proj/up_proj/down_proj, "
    "gate_up_proj/down_proj, or gate + experts (gate_up_proj, down_proj)"
)


@dataclass(frozen=True)
class BlockAdapter:
    """What TransAct needs to know about one block layout (see the module docstring)."""

    attention: str  # "q/k/v" or "fused qkv"
    mlp: str  # "gate/up/down", "fused gate_up" or "experts"
    rules: dict[str, Narrow] = field(default_factory=dict)  # by tensor name within the block
    n_experts: int = 0  # 0: a dense MLP

    @property
    def name(self) -> str:
        return f"{self.attention} attention, {self.mlp} MLP"

    def mlp_size_key(self, config) -> str:
        """The config field holding the MLP width TransAct narrows (an expert's, for experts)."""
        if self.n_experts and getattr(config, "moe_intermediate_size", None):
            return "moe_intermediate_size"  # Qwen-MoE: intermediate_size is the dense layers'
        return "intermediate_size"

    def mlp_width(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """The MLP width (an expert's, for experts) in a block with these tensor shapes."""
        if self.mlp == "experts":
            return shapes["mlp.experts.down_proj"][2]
        return shapes["mlp.down_proj.weight"][1]

    def register_mlp_scores(
        self, block: nn.Module, sink: torch.Tensor, token_weights: Callable[[], torch.Tensor]
    ) -> list:
        """Hooks on `block` that add to `sink` (n_experts or 1, width) every MLP neuron's squared
        activation summed over the tokens, each token's weighted by `token_weights()` ((B·T,) for
        the batch being run: 0 for padding). A dense neuron's activation is its input to
        ``down_proj``, ``act(gate(x)) * up(x)``; an expert neuron's is the same inside its expert,
        times the router's weight for that expert (what the expert adds to the residual is that
        weight times its output), over the tokens routed to the expert."""
        if self.mlp != "experts":

            def dense(module, args):
                x = args[0].float()  # (B, T, width)
                w = token_weights()
                sink[0] += (x.reshape(-1, x.shape[-1]).square() * w[:, None]).sum(dim=0)

            return [block.mlp.down_proj.register_forward_pre_hook(dense)]

        experts = block.mlp.experts
        if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", 1):
            raise MkaInputError(
                f"TransAct reads experts as [gate; up] rows per expert; {type(experts).__name__} "
                f"stores them transposed or interleaved"
            )

        def hook(module, args, kwargs):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            x, index, weights = (*args, *(kwargs[n] for n in names[len(args) :]))
            _add_expert_scores(module, x, index, weights, token_weights(), sink)

        return [experts.register_forward_pre_hook(hook, with_kwargs=True)]


@torch.no_grad()
def _add_expert_scores(experts, x, index, weights, token_w, sink) -> None:
    """Add every expert neuron's weighted squared activations to `sink` (n_experts, width)."""
    # x: (tokens, d_model); index, weights: (tokens, top_k); token_w: (tokens,)
    for e in range(sink.shape[0]):
        tok, pos = torch.where(index == e)
        if not len(tok):
            continue  # an expert no calibration token reached scores 0 everywhere
        gate, up = nn.functional.linear(x[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
        h = (experts.act_fn(gate) * up).float() * weights[tok, pos, None].float()  # (n_e, width)
        sink[e] += (h.square() * token_w[tok, None]).sum(dim=0)


def _modules_with_tensors(shapes: dict, part: str) -> set[str]:
    """The children of `part` that hold tensors (a tensor right on `part` counts as one)."""
    return {n.split(".")[1] for n in shapes if n.startswith(part + ".")}


def _experts_ok(shapes: dict) -> bool:
    """A router and 3-D experts (n_experts, 2·width, d_model) and (n_experts, d_model, width),
    nothing else (no biases, no per-expert modules, no transposed storage)."""
    if {n for n in shapes if n.startswith("mlp.")} != {"mlp.gate.weight", *_EXPERTS}:
        return False
    gate_up, down = shapes["mlp.experts.gate_up_proj"], shapes["mlp.experts.down_proj"]
    return (
        len(gate_up) == len(down) == 3
        and gate_up[0] == down[0] == shapes["mlp.gate.weight"][0]
        and gate_up[1] == 2 * down[2]
        and gate_up[2] == down[1]
    )


def _layout_of(found: set[str], table) -> tuple[str, dict] | None:
    for name, modules, rules in table:
        if found == modules:
            return name, dict(rules)
    return None


def block_adapter(shapes: dict[str, tuple[int, ...]]) -> BlockAdapter:
    """The adapter of a block whose tensors (names relative to the block) have these shapes, or
    MkaInputError naming what was found."""
    attn_found = _modules_with_tensors(shapes, "self_attn")
    mlp_found = _modules_with_tensors(shapes, "mlp")
    attn = _layout_of(attn_found - set(_NORMS), _ATTENTION)
    mlp = _layout_of(mlp_found, _MLPS)
    if mlp and mlp[0] == "experts" and not _experts_ok(shapes):
        mlp = None  # experts held some other way (one module per expert, biases, ...)
    if attn is None or mlp is None:

        def listed(found):
            return "/".join(sorted(found)) or "nothing"

        raise MkaInputError(
            f"no adapter for block layout: self_attn has {listed(attn_found)}, mlp has "
            f"{listed(mlp_found)}; known layouts: {KNOWN_LAYOUTS}"
        )
    rules = {**attn[1], **mlp[1]}
    for norm, (proj, kind) in _NORMS.items():
        name, proj_name = f"self_attn.{norm}.weight", f"self_attn.{proj}.weight"
        # OLMo-2 normalises the whole projection (narrowed with it); Qwen3 one head at a time
        if norm in attn_found and shapes[name][0] == shapes.get(proj_name, (None,))[0]:
            rules[name] = Narrow(0, (kind,))
    rules = {k: v for k, v in rules.items() if k in shapes}
    n_exp = shapes["mlp.experts.down_proj"][0] if mlp[0] == "experts" else 0
    return BlockAdapter(attn[0], mlp[0], rules, n_exp)


# ---------------------------------------------------------------------------------------------
# what a block writes to the residual stream

# the tensors whose output is added to the residual stream: (attention or MLP, the dimension of
# d_model); a compensation scales them, or maps the MLP's rows (`recipe.Term`)
RESIDUAL_WRITERS = {
    "self_attn.o_proj.weight": ("attn", 0),
    "self_attn.o_proj.bias": ("attn", 0),
    "mlp.down_proj.weight": ("mlp", 0),
    "mlp.down_proj.bias": ("mlp", 0),
    "mlp.experts.down_proj": ("mlp", 1),
}
_OUTPUT_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")


def map_rows(t: torch.Tensor, m: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` whose outputs along `dim` (size d) are mapped by the (d, d) matrix `m`: a weight
    ``W`` (output = x·Wᵀ) becomes ``mᵀW``, so its output becomes output·m."""
    moved = t.movedim(dim, 0)
    out = (m.T @ moved.reshape(moved.shape[0], -1)).reshape(moved.shape)
    return out.movedim(0, dim)


def residual_writers_problem(names: list[str]) -> str | None:
    """Why a block (tensor names relative to it) cannot take a compensation fused into what it
    writes to the residual stream, or None when it can."""
    norms = [n.split(".")[0] for n in names if n.split(".")[0] in _OUTPUT_NORMS]
    if norms:
        return (
            f"its outputs pass through {norms[0]} before they join the residual stream (as in "
            f"OLMo-2 and Gemma-2/3), which would undo a correction fused into the projections"
        )
    kinds = {RESIDUAL_WRITERS[n][0] for n in names if n in RESIDUAL_WRITERS}
    mlp = {n for n in names if n.startswith("mlp.")}
    known = {n for n in RESIDUAL_WRITERS} | {
        n for n in mlp if not any(w in n for w in ("down_proj", "shared_expert"))
    }
    if kinds != {"attn", "mlp"} or mlp - known:
        return "its attention and MLP outputs are not self_attn.o_proj and mlp.down_proj"
    return None


def module_shapes(block: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names (relative to the block) and shapes of a block module's parameters."""
    return {name: tuple(p.shape) for name, p in block.named_parameters()}


def model_adapter(blocks: list[dict[str, tuple[int, ...]]]) -> BlockAdapter:
    """The one adapter of every block of a model (TransAct keeps every layer the same shape, so
    every block must share one layout)."""
    adapters = [block_adapter(shapes) for shapes in blocks]
    first = adapters[0]
    for i, a in enumerate(adapters):
        if (a.name, set(a.rules)) != (first.name, set(first.rules)):
            raise MkaInputError(
                f"TransAct needs one block layout in every layer: layer 0 has {first.name}, "
                f"layer {i} has {a.name}"
            )
    return first


def is_mixture_of_experts(names: list[str]) -> bool:
    """Whether a block (tensor names relative to it) holds experts."""
    return any(re.search(r"(^|\.)experts\.", n) for n in names)


# ---------------------------------------------------------------------------------------------
# experts as checkpoints store them


@dataclass(frozen=True)
class ExpertLayout:
    """How a checkpoint stores the experts of block ``model.layers.<i>``: under
    ``<moe>.experts.<e>.<gate|up|down>.weight`` one 2-D tensor per expert, and the router as
    ``<moe>.gate.weight`` (transformers' conversion_mapping.py, "mixtral" and "qwen2_moe")."""

    moe: str  # the MoE module as stored: block_sparse_moe (Mixtral) or mlp (Qwen-MoE)
    gate: str
    up: str
    down: str


EXPERT_LAYOUTS = (
    ExpertLayout("block_sparse_moe", "w1", "w3", "w2"),
    ExpertLayout("mlp", "gate_proj", "up_proj", "down_proj"),
)
_FUSED_RE = re.compile(r"^(model\.layers\.\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj)$")
_MOE_RE = re.compile(r"^(model\.layers\.\d+)\.mlp\.(.+)$")


def _stored(block: str, layout: ExpertLayout, leaf: str, e: int) -> str:
    return f"{block}.{layout.moe}.experts.{e}.{leaf}.weight"


def _expert_sources(name: str, layout: ExpertLayout, have) -> list[list[str]] | None:
    """For a fused experts tensor: per expert, the stored tensors it is made of (gate and up, or
    down), when the store holds them all under `layout`."""
    m = _FUSED_RE.match(name)
    if not m:
        return None
    leaves = (layout.gate, layout.up) if m.group(2).endswith("gate_up_proj") else (layout.down,)
    out, e = [], 0
    while _stored(m.group(1), layout, leaves[0], e) in have:
        out.append([_stored(m.group(1), layout, leaf, e) for leaf in leaves])
        e += 1
    if not out or not all(n in have for group in out for n in group):
        return None
    return out


class ExpertsView(TensorStore):
    """A store whose experts are stored one tensor per expert, seen under the model's fused names
    (``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``, 3-D); every other tensor as
    stored (a Mixtral router renamed from ``block_sparse_moe.gate``)."""

    def __init__(
        self,
        store: TensorStore,
        layout: ExpertLayout,
        sources: dict[str, list[list[str]]],
        renamed: dict[str, str],
    ):
        self.store = store
        self.layout = layout
        self.sources = sources  # fused name -> per expert, its stored tensors
        self.renamed = renamed  # model name -> stored name
        used = {n for groups in sources.values() for g in groups for n in g} | set(renamed.values())
        first = {groups[0][0]: name for name, groups in sources.items()}
        back = {v: k for k, v in renamed.items()}
        self._names = []
        for n in store.names():  # stored order, each fused tensor where its first part was
            if n in first:
                self._names.append(first[n])
            elif n in back:
                self._names.append(back[n])
            elif n not in used:
                self._names.append(n)
        self._set = set(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._set

    def info(self, name: str) -> TensorInfo:
        if name in self.sources:
            groups = self.sources[name]
            parts = [self.store.info(n) for n in groups[0]]
            rows = sum(p.shape[0] for p in parts)
            return TensorInfo(name, (len(groups), rows, *parts[0].shape[1:]), parts[0].dtype)
        return self.store.info(self.renamed.get(name, name))

    def get(self, name: str) -> torch.Tensor:
        if name not in self.sources:
            return self.store.get(self.renamed.get(name, name))
        info = self.info(name)
        out = torch.empty(info.shape, dtype=info.dtype)  # (n_experts, rows, cols)
        for e, group in enumerate(self.sources[name]):
            row = 0
            for n in group:  # gate rows, then up rows: transformers' Concatenate(dim=1)
                t = self.store.get(n)
                out[e, row : row + t.shape[0]] = t
                row += t.shape[0]
        return out

    def get_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        if name in self.sources:
            return super().get_rows(name, rows)
        return self.store.get_rows(self.renamed.get(name, name), rows)

    def get_slice(self, name: str, rows: int, cols: int) -> torch.Tensor:
        if name in self.sources:
            return super().get_slice(name, rows, cols)
        return self.store.get_slice(self.renamed.get(name, name), rows, cols)

    def get_row_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name in self.sources:
            return self.get(name)[start:stop]
        return self.store.get_row_range(self.renamed.get(name, name), start, stop)


def module_view(store: TensorStore, wanted: list[str]) -> TensorStore:
    """`store` seen under the model's own tensor names `wanted`: itself when it holds them all, an
    `ExpertsView` when the missing MoE tensors are experts stored one tensor per expert (anything
    else missing is left for the caller to name)."""
    have = set(store.names())
    missing = [n for n in wanted if n not in have and _MOE_RE.match(n)]
    if not missing:
        return store
    for layout in EXPERT_LAYOUTS:
        sources, renamed = {}, {}
        for name in missing:
            groups = _expert_sources(name, layout, have)
            m = _MOE_RE.match(name)
            if groups:
                sources[name] = groups
            elif f"{m.group(1)}.{layout.moe}.{m.group(2)}" in have:
                renamed[name] = f"{m.group(1)}.{layout.moe}.{m.group(2)}"
        if sources and len(sources) + len(renamed) == len(missing):
            log.debug("experts stored per expert (%s): %d fused tensors", layout, len(sources))
            return ExpertsView(store, layout, sources, renamed)
    return store


def stored_expert_layout(skeleton: nn.Module, store: TensorStore) -> ExpertLayout | None:
    """The layout an export writes experts in: the one its source checkpoint used, else the one
    transformers' ``save_pretrained`` writes for this model, else None (keep the fused tensors,
    which transformers loads as well)."""
    if isinstance(store, ExpertsView):
        return store.layout
    fused = [n for n in store.names() if _FUSED_RE.match(n)]
    if not fused:
        return None
    block = _FUSED_RE.match(fused[0]).group(1)
    # what save_pretrained would write: transformers' own reverse conversion, on shapes only
    state = {
        n: torch.empty(store.info(n).shape, device="meta")
        for n in store.names()
        if n.startswith(block + ".mlp.")
    }
    try:
        saved = set(revert_weight_conversion(skeleton, state))
    except Exception as e:  # noqa: BLE001 - a conversion we cannot run on shapes: keep them fused
        log.debug("no stored layout for experts (%s): keeping the fused tensors", e)
        return None
    for layout in EXPERT_LAYOUTS:
        if _stored(block, layout, layout.gate, 0) in saved:
            return layout
    return None


def checkpoint_items(
    infos: list[TensorInfo], tensor: Callable[[str], torch.Tensor], layout: ExpertLayout | None
) -> tuple[list[TensorInfo], Callable[[TensorInfo], torch.Tensor]]:
    """The tensors of an export in the stored layout: `infos` (model names) with every fused experts
    tensor split into one tensor per expert under `layout`, and a function computing each one
    (`tensor(model name)` computes a model tensor; a fused one is computed once per block)."""
    if layout is None:
        return infos, lambda i: tensor(i.name)
    out: list[TensorInfo] = []
    part_of: dict[str, tuple[str, int, int, int]] = {}  # stored name -> (fused, expert, row0, rows)
    for info in infos:
        m = _FUSED_RE.match(info.name)
        moe = _MOE_RE.match(info.name)
        if m:
            n_exp, rows, cols = info.shape
            if m.group(2).endswith("gate_up_proj"):
                leaves = ((layout.gate, 0, rows // 2), (layout.up, rows // 2, rows // 2))
            else:
                leaves = ((layout.down, 0, rows),)
            for e in range(n_exp):
                for leaf, row0, n in leaves:
                    name = _stored(m.group(1), layout, leaf, e)
                    part_of[name] = (info.name, e, row0, n)
                    out.append(TensorInfo(name, (n, cols), info.dtype))
        elif moe and layout.moe != "mlp":
            name = f"{moe.group(1)}.{layout.moe}.{moe.group(2)}"
            part_of[name] = (info.name, -1, 0, 0)
            out.append(TensorInfo(name, info.shape, info.dtype))
        else:
            out.append(info)
    cache: dict[str, torch.Tensor] = {}

    def produce(info: TensorInfo) -> torch.Tensor:
        if info.name not in part_of:
            return tensor(info.name)
        fused, e, row0, n = part_of[info.name]
        if e < 0:
            return tensor(fused)
        if fused not in cache:
            cache.clear()  # one fused tensor at a time: its experts are written one after another
            cache[fused] = tensor(fused)
        return cache[fused][e, row0 : row0 + n]

    return out, produce
