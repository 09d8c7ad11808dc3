"""The layer-by-layer engine every forward pass runs on (README, "Models bigger than memory"), for models in memory and on disk.

A `Stack` is a causal LM seen as embeddings → blocks → final norm → LM head, where block ``j`` is
built from a `ModelRecipe` only when it is needed. With the weights in memory (``resident``), an
unchanged block is the model's own module and costs nothing; with the weights on disk, a block is
built on an empty (meta-device) skeleton from memory-mapped safetensors, used, and dropped, so at
most one block is resident on the compute device at a time.

A `LayerPass` is the sequential loop of llm-compressor and SparseGPT: embed every sample, then run
block 0 over all of them, then block 1, and so on; each block is read once per pass over the data,
not once per batch, and the hidden states (samples × tokens × d_model) go from block to block.

Each block is called with exactly what the model's own forward would give it: the engine runs the
model's decoder forward once per batch with every block replaced by a catcher that records its
arguments (attention masks by layer type, rotary position embeddings, positions) and passes the
hidden states on. Nothing is re-derived per model family. Output block ``j`` of a compressed stack
gets the arguments of its first source layer, which is what ``config.layer_types`` (trimmed the same
way, see ``recipe.update_layer_config``) gives it once the model is exported.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from mka_core.engine.adapters import module_view
from mka_core.engine.recipe import LAYER_PREFIX, ModelRecipe
from mka_core.engine.weights import ModuleStore, SafetensorsStore, TensorStore
from mka_core.errors import MkaInputError, ProgressFn, report

log = logging.getLogger(__name__)


# stored bytes of block j + 1 read ahead while block j computes: a whole Llama-3-8B block (0.44 GB
# of bf16), 1 GiB of a Llama-3-70B one (1.71 GB), so a streamed pass holds one block plus 1 GiB,
# not two blocks (3.4 GB on 70B, which left no room under 4 GB)
PREFETCH_BYTES = 1024**3


class _Stop(Exception):
    """Ends the catcher pass after the last block's arguments are recorded."""


def build_skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The model's modules with parameters on the meta device (no memory) and real buffers
    (rotary frequencies, embedding scales), from its config. Built in `dtype` as
    ``from_pretrained(dtype=...)`` builds it, so buffers get the dtypes they get there (rotary
    frequencies stay float32)."""

    kw = {"dtype": dtype} if dtype is not None else {}
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, **kw)


def _module_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class Stack:
    """A causal LM as the engine runs it: a recipe over a tensor store, a compute device and
    dtype, and either the model in memory (`resident`) or an empty skeleton of it."""

    def __init__(
        self,
        recipe: ModelRecipe,
        device: str | torch.device,
        dtype: torch.dtype,
        resident: nn.Module | None = None,
        skeleton: nn.Module | None = None,
        folder=None,
    ):
        self.recipe = recipe
        self.device = torch.device(device)
        self.dtype = dtype
        self.resident = resident
        self.folder = folder  # where the weights live on disk, if they do
        if skeleton is None:
            skeleton = (
                resident if resident is not None else build_skeleton(recipe.base_config, dtype)
            )
            if resident is None:
                _buffers_to(skeleton, self.device)
        self.skeleton = skeleton

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_module(cls, model: nn.Module) -> Stack:
        """A model held in memory, as is (its unchanged blocks are its own modules)."""
        if isinstance(model, Stack):
            return model
        p = next(model.parameters())
        recipe = ModelRecipe.identity(ModuleStore(model), model.config)
        return cls(recipe, p.device, p.dtype, resident=model)

    @classmethod
    def from_folder(cls, folder, device, dtype: torch.dtype, config=None, store=None) -> Stack:
        """A Hugging Face folder streamed from disk: nothing but the skeleton is loaded now."""

        store = store or SafetensorsStore(folder)
        if config is None:
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        skeleton = build_skeleton(config, dtype)
        config = skeleton.config  # the model sets the attention implementation on its config
        store = module_view(store, list(skeleton.state_dict()))  # experts stored one by one
        _check_names(skeleton, store, folder)
        recipe = ModelRecipe.identity(store, config)
        stack = cls(recipe, device, dtype, skeleton=skeleton, folder=folder)
        _buffers_to(skeleton, stack.device)
        return stack

    def _derived(self, recipe: ModelRecipe) -> Stack:
        return Stack(recipe, self.device, self.dtype, self.resident, self.skeleton, self.folder)

    def compose(self, composition) -> Stack:
        """A stack of `composition` of this stack's blocks (merges computed when used)."""
        return self._derived(self.recipe.compose(composition))

    def prune(self, selections: list[dict], sizes: dict, rules: dict) -> Stack:
        return self._derived(self.recipe.prune(selections, sizes, rules))

    # -- facts ------------------------------------------------------------------------------

    @property
    def config(self):
        return self.recipe.config

    @property
    def n_layers(self) -> int:
        return self.recipe.n_layers

    @property
    def streamed(self) -> bool:
        return self.resident is None

    @property
    def store(self) -> TensorStore:
        return self.recipe.store

    def n_params(self) -> int:
        return self.recipe.n_params()

    def n_bytes(self) -> int:
        """Bytes of the weights in the compute dtype (what holding them in memory would take)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(
            i.numel * item if i.dtype.is_floating_point else i.nbytes for i in self.recipe.infos()
        )

    def largest_block_bytes(self) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        sizes: dict[str, int] = {}
        for i in self.recipe.infos():
            if i.name.startswith(LAYER_PREFIX):
                key = i.name.split(".")[2]
                sizes[key] = sizes.get(key, 0) + i.numel * item
        return max(sizes.values(), default=0)

    def kw_layer(self, j: int) -> int:
        """The base layer whose forward arguments output block `j` receives."""
        return self.recipe.blocks[j][0].layer

    # -- modules, one at a time ---------------------------------------------------------------

    def fetch_sources(
        self, j: int, limit: int | None = None, have: dict | None = None
    ) -> dict[str, torch.Tensor]:
        """Read the stored tensors block `j` is computed from, in order, the first `limit` bytes
        of them (at least one tensor; all without a limit), besides those already in `have`
        (I/O only: run it in a thread while the previous block computes)."""
        out = dict(have or {})
        total = 0
        for name in self.recipe.source_names(j):
            if name in out:
                continue
            nbytes = self.store.info(name).nbytes
            if limit is not None and total and total + nbytes > limit:
                break
            out[name] = self.store.get(name)
            total += nbytes
        return out

    @contextlib.contextmanager
    def block(self, j: int, sources: dict | None = None) -> Iterator[nn.Module]:
        """Output block `j` on the compute device, for the duration of the context; `sources`:
        its stored tensors, already read by `fetch_sources`."""
        if self.resident is not None and self.recipe.is_identity_block(j):
            yield self.resident.model.layers[self.recipe.blocks[j][0].layer]
            return

        cls = type(self.skeleton.model.layers[self.recipe.blocks[j][0].layer])  # hybrids differ
        with init_empty_weights(include_buffers=False):
            try:
                blk = cls(self.config, j)
            except TypeError as e:
                raise MkaInputError(
                    f"cannot build block {j} of {type(self.skeleton).__name__}: its decoder layer "
                    f"class {cls.__name__} does not take (config, layer_idx) ({e})"
                ) from None
        fetch = sources.pop if sources is not None else None
        state = self.recipe.block_state(j, self.dtype, fetch)
        blk.load_state_dict(state, strict=True, assign=True)
        del state, sources
        blk.to(self.device)
        blk.eval()
        blk.requires_grad_(False)
        try:
            yield blk
        finally:
            del blk

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids → the embedding module's output (B, T, d_model), as the model would."""
        if self.resident is not None:
            return self.resident.get_input_embeddings()(ids.to(self.device))
        emb = self.skeleton.get_input_embeddings()
        name = _param_name(self.skeleton, emb, "weight")
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = self.store.get_rows(name, uniq).to(self.device, self.dtype)  # (n_unique, d)
        compact = copy.copy(emb)  # the model's own class: any scaling in its forward applies
        compact._parameters = {"weight": nn.Parameter(rows, requires_grad=False)}
        compact.num_embeddings = len(uniq)
        compact.padding_idx = None
        return compact(inverse.to(self.device))

    @contextlib.contextmanager
    def head(self) -> Iterator[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
        """(final norm, logits function) on the compute device for the duration of the context;
        logits are the LM head's, with the final soft-capping some models apply (Gemma 2/3)."""
        if self.resident is not None:
            norm, lm = self.resident.model.norm, self.resident.get_output_embeddings()
        else:
            norm = self._from_store(self.skeleton.model.norm)
            lm = self._from_store(self.skeleton.get_output_embeddings())
        cap = getattr(self.config, "final_logit_softcapping", None)

        def logits(h: torch.Tensor) -> torch.Tensor:
            out = lm(h)
            if cap:
                out = torch.tanh(out / cap) * cap
            return out

        yield norm, logits  # the modules go when the caller's context ends

    @contextlib.contextmanager
    def final_norm(self) -> Iterator[nn.Module]:
        """The final norm on the compute device for the context (streamed: without the LM head)."""
        if self.resident is not None:
            yield self.resident.model.norm
        else:
            yield self._from_store(self.skeleton.model.norm)

    def logit_slices(
        self, rows: int
    ) -> Iterator[tuple[int, Callable[[torch.Tensor], torch.Tensor]]]:
        """The LM head `rows` vocabulary ids at a time: (first id, logits function (n, d_model) →
        (n, ≤ rows), soft-capped as in `head`). In memory, views of the head's weight; streamed,
        each slice is read (the next one while this one computes) and dropped when the loop moves
        on, so the head (Llama-3-70B's: 2.1 GB of bf16) is never held whole."""
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise MkaInputError(f"LM-head slice must be an integer >= 1 rows, got {rows!r}")
        cap = getattr(self.config, "final_logit_softcapping", None)
        if self.resident is not None:
            lm = self.resident.get_output_embeddings()
            n_vocab = int(lm.weight.shape[0])

            def read(v0: int, v1: int):
                bias = getattr(lm, "bias", None)
                return lm.weight[v0:v1], None if bias is None else bias[v0:v1]

        else:
            lm = self.skeleton.get_output_embeddings()
            w_name = _param_name(self.skeleton, lm, "weight")
            if w_name not in self.store:  # tied: the embedding table, stored once
                w_name = _param_name(self.skeleton, self.skeleton.get_input_embeddings(), "weight")
            b_name = _param_name(self.skeleton, lm, "bias") if lm.bias is not None else None
            n_vocab = int(self.store.info(w_name).shape[0])

            def read(v0: int, v1: int):
                b = None if b_name is None else self.store.get_row_range(b_name, v0, v1)
                return self.store.get_row_range(w_name, v0, v1), b

        spans = [(v0, min(v0 + rows, n_vocab)) for v0 in range(0, n_vocab, rows)]
        pool = ThreadPoolExecutor(1) if self.streamed and len(spans) > 1 else None
        try:
            ahead = pool.submit(read, *spans[0]) if pool else None
            for k, (v0, v1) in enumerate(spans):
                w, b = ahead.result() if pool else read(v0, v1)
                if pool and k + 1 < len(spans):
                    ahead = pool.submit(read, *spans[k + 1])
                w = w.to(self.device, self.dtype)  # (≤ rows, d_model)
                b = None if b is None else b.to(self.device, self.dtype)

                def logits(h: torch.Tensor, w=w, b=b) -> torch.Tensor:
                    out = torch.nn.functional.linear(h, w, b)  # (n, ≤ rows)
                    if cap:
                        out = torch.tanh(out / cap) * cap
                    return out

                yield v0, logits
                del w, b, logits
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _from_store(self, module: nn.Module) -> nn.Module:
        """A small skeleton module (norm, LM head) with its tensors read from the store."""
        prefix = _module_name(self.skeleton, module)
        state = {}
        for rel, _ in module.named_parameters(recurse=True):
            name = f"{prefix}.{rel}"
            if name not in self.store and module is self.skeleton.get_output_embeddings():
                name = _param_name(self.skeleton, self.skeleton.get_input_embeddings(), "weight")
            state[rel] = self.store.get(name).to(self.dtype)
        out = copy.deepcopy(module)
        out.load_state_dict(state, strict=False, assign=True)
        return out.to(self.device).eval().requires_grad_(False)


def as_stack(model) -> Stack:
    """A Stack for a model in memory (an nn.Module), a LoadedModel, or a Stack (as is)."""
    if isinstance(model, Stack):
        return model
    inner = getattr(model, "model", None)
    if not isinstance(model, nn.Module) and inner is not None:
        return as_stack(inner)  # a LoadedModel
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise MkaInputError(f"expected a causal LM, got {type(model).__name__}")
    return Stack.from_module(model)


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.device.type != "meta" and buf.device != device:
                mod._buffers[name] = buf.to(device)


def _module_name(root: nn.Module, module: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is module:
            return name
    raise AssertionError("module not in model")


def _param_name(root: nn.Module, module: nn.Module, rel: str) -> str:
    return f"{_module_name(root, module)}.{rel}"


def _check_names(skeleton: nn.Module, store: TensorStore, folder) -> None:
    """The checkpoint must hold exactly the model's tensors under the model's own names."""
    want = set(skeleton.state_dict().keys())
    emb = _param_name(skeleton, skeleton.get_input_embeddings(), "weight")
    head = skeleton.get_output_embeddings()
    if head is not None and getattr(skeleton.config, "tie_word_embeddings", False):
        want.discard(_param_name(skeleton, head, "weight"))
    have = set(store.names())
    missing, extra = sorted(want - have), sorted(have - want)
    if emb not in have or missing:
        raise MkaInputError(
            f"{folder}: the weights lack {len(missing)} tensor(s) the model needs, e.g. "
            f"{(missing or [emb])[0]} (a missing shard, or a checkpoint saved under other names)"
        )
    if extra:
        log.warning("%s: %d stored tensors are not used, e.g. %s", folder, len(extra), extra[0])


# ---------------------------------------------------------------------------------------------
# the pass


@dataclass
class _Batch:
    ids: torch.Tensor  # (B, T) on the compute device
    mask: torch.Tensor | None  # (B, T), None when nothing is padded


def split_batches(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    device: torch.device,
) -> list[_Batch]:
    """Consecutive batches, each cut to its own longest sample (right padding)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MkaInputError(f"batch size must be an integer >= 1, got {batch_size!r}")
    out = []
    n = int(input_ids.shape[0])
    for b0 in range(0, n, batch_size):
        ids = input_ids[b0 : b0 + batch_size]
        mask = None if attention_mask is None else attention_mask[b0 : b0 + batch_size]
        if mask is not None:
            width = int(mask.sum(dim=1).max())
            ids, mask = ids[:, :width], mask[:, :width]
            mask = mask.to(device)
        out.append(_Batch(ids.to(device), mask))
    return out


def _catch(stack: Stack, h0: torch.Tensor, mask: torch.Tensor | None):
    """Run the model's own decoder forward with catchers for blocks: the input of block 0 and
    every block's call arguments, as the model computes them for this batch."""
    base = stack.skeleton.model
    n = int(stack.recipe.base_config.num_hidden_layers)
    calls: list = [None] * n
    first: dict = {}

    class Catcher(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            self.i = i

        def forward(self, hidden_states, *args, **kwargs):
            if self.i == 0:
                first["h"] = hidden_states
            calls[self.i] = (args, kwargs)
            if self.i == n - 1:
                raise _Stop
            return hidden_states

    inner = copy.copy(base)  # a view: the model itself is not touched
    inner._modules = dict(base._modules)
    inner._modules["layers"] = nn.ModuleList([Catcher(i) for i in range(n)])
    inner.config = stack.recipe.base_config
    try:
        inner(inputs_embeds=h0, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    if any(c is None for c in calls):
        raise AssertionError("the model's forward did not call every block")
    return first["h"], calls


class LayerPass:
    """Hidden states of a set of batches after the first `pos` output blocks of a stack."""

    def __init__(self, stack: Stack, batches: list[_Batch], hidden, calls, pos: int = 0):
        self.stack = stack
        self.batches = batches
        self.hidden = hidden  # per batch (B, T, d_model), compute dtype, on the compute device
        self.calls = calls  # per batch, per base layer: (args, kwargs) of the block call
        self.pos = pos
        self.current = 0  # the batch being run (hooks read its mask)

    @classmethod
    @torch.inference_mode()
    def start(
        cls,
        stack: Stack,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        batch_size: int = 16,
    ) -> LayerPass:
        """Embed every batch and record what each block will be called with."""
        batches = split_batches(input_ids, attention_mask, batch_size, stack.device)
        hidden, calls = [], []
        for b in batches:
            h, c = _catch(stack, stack.embed(b.ids), b.mask)
            hidden.append(h)
            calls.append(c)
        return cls(stack, batches, hidden, calls)

    def fork(self, stack: Stack | None = None) -> LayerPass:
        """The same point of the pass, to continue with another stack (blocks never change their
        inputs in place, so the states are shared, not copied)."""
        return LayerPass(stack or self.stack, self.batches, list(self.hidden), self.calls, self.pos)

    @torch.inference_mode()
    def run(
        self,
        stop: int | None = None,
        *,
        after_block: Callable[[int, list[torch.Tensor]], None] | None = None,
        hooks: Callable[[int, nn.Module], list] | None = None,
        progress: ProgressFn | None = None,
        label: str = "",
    ) -> LayerPass:
        """Run output blocks pos..stop-1 over every batch. `hooks(j, block)` may register hooks on
        the block (returned handles are removed after it); `after_block(j, hidden)` sees the
        outputs of block j."""
        stack = self.stack
        stop = stack.n_layers if stop is None else stop
        start = self.pos
        # streamed: read block j + 1 from disk while block j computes (reads are plain file I/O,
        # which releases the GIL and uses no torch threads, so the two do not compete for cores),
        # up to PREFETCH_BYTES of it; the rest is read once block j is gone
        pool = ThreadPoolExecutor(1) if stack.streamed and stop > start else None
        ahead = pool.submit(stack.fetch_sources, start, PREFETCH_BYTES) if pool else None
        try:
            for j in range(start, stop):
                sources = stack.fetch_sources(j, have=ahead.result()) if ahead else None
                ahead = (
                    pool.submit(stack.fetch_sources, j + 1, PREFETCH_BYTES)
                    if pool and j + 1 < stop
                    else None
                )
                self._run_block(j, sources, hooks)
                self.pos = j + 1
                if after_block is not None:
                    after_block(j, self.hidden)
                report(
                    progress,
                    (j + 1 - start) / max(stop - start, 1),
                    f"{label}block {j + 1}/{stop}",
                )
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return self

    def _run_block(self, j: int, sources, hooks) -> None:
        stack = self.stack
        kw = stack.kw_layer(j)
        with stack.block(j, sources) as blk:
            del sources
            handles = hooks(j, blk) if hooks else []
            try:
                for b, h in enumerate(self.hidden):
                    self.current = b
                    args, kwargs = self.calls[b][kw]
                    out = blk(h, *args, **kwargs)
                    self.hidden[b] = out[0] if isinstance(out, tuple) else out
            finally:
                for handle in handles:
                    handle.remove()
        del blk  # let block j go before block j + 1 is built: one block resident at a time

    @torch.inference_mode()
    def normed(self) -> list[torch.Tensor]:
        """The final hidden states (after the final norm) of every batch; runs the rest first."""
        if self.pos < self.stack.n_layers:
            self.run()
        with self.stack.final_norm() as norm:
            return [norm(h) for h in self.hidden]

    def masks(self) -> list[torch.Tensor | None]:
        return [b.mask for b in self.batches]


# ---------------------------------------------------------------------------------------------
# losses on top of a pass


LOGITS_ELEMENTS = 16 * 1024**2  # float32 logits per LM-head call: 64 MB (a few copies live)
HEAD_SLICE_ELEMENTS = 32 * 1024**2  # LM-head values per vocabulary slice: 64 MB of bf16


def head_slice_rows(vocab_size: int, d_model: int) -> int:
    """Vocabulary ids per LM-head slice (`Stack.logit_slices`), from the widths alone: in memory
    and streamed, a head is sliced the same way."""
    return max(1, min(int(vocab_size), HEAD_SLICE_ELEMENTS // max(int(d_model), 1)))


def logit_chunk(vocab_size: int) -> int:
    """Positions per LM-head call, so tokens × vocabulary is never held whole."""
    return max(16, min(512, LOGITS_ELEMENTS // max(int(vocab_size), 1)))


def next_token_nll(
    logits_fn, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, chunk: int = 256
) -> tuple[float, int]:
    """Sum of −log p(next token) over the real positions of one batch, and their number; the LM
    head is applied `chunk` positions at a time, so tokens × vocab is never held whole."""
    B, T, _ = h.shape
    hs = h[:, :-1].reshape(-1, h.shape[-1])  # ((B·(T-1)), d)
    targets = ids[:, 1:].reshape(-1)
    keep = None if mask is None else mask[:, 1:].reshape(-1).bool()
    total, count = 0.0, 0
    for s in range(0, hs.shape[0], chunk):
        lg = logits_fn(hs[s : s + chunk]).float()  # (chunk, V)
        logp = torch.log_softmax(lg, dim=-1)
        picked = logp.gather(-1, targets[s : s + chunk, None].to(lg.device)).squeeze(-1)
        if keep is not None:
            k = keep[s : s + chunk].to(lg.device)
            picked = picked[k]
        total += float(-picked.double().sum())
        count += int(picked.numel())
    return total, count


@torch.inference_mode()
def causal_lm_loss(lp: LayerPass) -> float:
    """Mean next-token cross-entropy of a pass's stack on its batches (padding ignored)."""
    hidden = lp.normed()
    total, count = 0.0, 0
    chunk = logit_chunk(lp.stack.config.vocab_size)
    with lp.stack.head() as (_, logits):
        for b, h in zip(lp.batches, hidden):
            s, c = next_token_nll(logits, h, b.ids, b.mask, chunk)
            total += s
            count += c
    return total / max(count, 1)
