"""Distillation targets for healing: the original model's next-token distribution, kept as its
top-k logits per position.

Knowledge distillation (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural
Network") trains a student on a teacher's whole output distribution instead of the one observed
token; for a pruned LLM, with the unpruned model as teacher, it recovers more than plain
next-token training on the same text (Minitron, Muralidharan et al. 2024, arXiv 2407.14679;
Sheared-LLaMA, Xia et al. 2023, arXiv 2310.06694).

The teacher runs once, before training, on the layer-by-layer engine, so it may be streamed from
disk (a model that does not fit in memory next to the student): block by block over the
calibration samples, then the LM head a slice of the vocabulary at a time with a running top-k
and a running log-sum-exp across the slices. What is kept is n_samples × T × k logits and ids and
n_samples × T log-sum-exps; the teacher itself need not stay in memory while the student trains.

The loss at a position is the KL divergence of the student's distribution from the teacher's,
both coarsened to the teacher's top-k ids plus one bucket for all the other ids:

    Σ_{i ∈ top-k} p_T(i) · (log p_T(i) − log p_S(i)) + p_T(rest) · (log p_T(rest) − log p_S(rest))

with p_T(i) = exp(z_i − logsumexp(z)) normalised over the FULL vocabulary (the stored
log-sum-exp), p(rest) = 1 − Σ_{top-k} p. It is an approximation of KL(P_T || P_S): coarsening
only loses information, so it is >= 0 and <= the exact KL, and with k = the vocabulary size it is
the exact KL (the bucket is empty). The first sum alone (−Σ_{top-k} p_T log p_S + Σ_{top-k} p_T
log p_T, the KL restricted to the top-k) is minimised by a student that puts all its mass on the
top-k ids, i.e. a sharper distribution than the teacher's; on a flat teacher (a tiny random
model: 512 ids, k = 64 holding an eighth of the mass) that went below zero while the true KL
tripled. The bucket term is what makes the teacher's tail count: the student must leave it its
mass, spread over the other ids as the student likes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import time
from dataclasses import dataclass

import torch
from torch import nn

from mka_core.data.corpus import CalibrationBatch
from mka_core.engine.layerpass import LayerPass, Stack, as_stack, head_slice_rows
from mka_core.errors import MkaInputError, ProgressFn, report

log = logging.getLogger(__name__)

LOSSES = ("ce", "kd")
DEFAULT_TOP_K = 64
PASS_ELEMENTS = 64 * 1024**2  # hidden-state values one teacher pass holds (256 MB in fp32)
SCAN_ELEMENTS = 4 * 1024**2  # logits per (positions × vocabulary slice) step: 16 MB in fp32
TEACHER_BATCH = 8  # samples per block call of the teacher pass
TAIL_FLOOR = 1e-6  # least probability mass the loss gives the student outside the top-k


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's next-token distribution at every real position of a calibration batch.

    Padding positions hold zeros (and are never read). Kept on the CPU; a training step moves the
    rows it draws to the student's device."""

    logits: torch.Tensor  # (n_samples, T, k) float32, largest first
    ids: torch.Tensor  # (n_samples, T, k) int32 vocabulary ids of those logits
    lse: torch.Tensor  # (n_samples, T) float32, log Σ exp(logits) over the whole vocabulary
    vocab_size: int  # rows of the teacher's LM head
    batch_key: str  # which calibration batch (a hash of its ids and mask)
    seconds: float = 0.0  # the teacher pass

    @property
    def k(self) -> int:
        return int(self.logits.shape[-1])

    def rows(self, pick: torch.Tensor, width: int, device) -> tuple[torch.Tensor, ...]:
        """Logits (B, T, k), ids (B, T, k) long and lse (B, T) of samples `pick`, cut to `width`
        positions, on `device`."""
        return (
            self.logits[pick, :width].to(device),
            self.ids[pick, :width].to(device, torch.long),
            self.lse[pick, :width].to(device),
        )


def batch_key(batch: CalibrationBatch) -> str:
    """A short hash of a batch's token ids and mask: targets are only used with their batch."""
    h = hashlib.sha1()
    for t in (batch.input_ids, batch.attention_mask):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# checks


def check_loss(loss) -> str:
    if not isinstance(loss, str) or loss not in LOSSES:
        raise MkaInputError(
            f"unknown heal loss {loss!r}; expected 'ce' (next-token) or 'kd' (distillation)"
        )
    return loss


def check_top_k(k, vocab_size: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise MkaInputError(f"distillation top-k must be an integer >= 1, got {k!r}")
    if not 1 <= int(k) <= vocab_size:
        raise MkaInputError(
            f"distillation top-k must be from 1 to the vocabulary size {vocab_size}, got {k}"
        )
    return int(k)


def head_rows(model) -> int:
    """Rows of a model's LM head (its vocabulary as predicted, padding included)."""
    if isinstance(model, Stack):
        if model.resident is not None:
            return head_rows(model.resident)
        return int(model.config.vocab_size)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def _unpack(teacher) -> tuple[object, object]:
    """(model or Stack, tokenizer or None) of a LoadedModel, a model, or a Stack."""
    if isinstance(teacher, nn.Module | Stack):
        return teacher, None
    inner = getattr(teacher, "model", None)
    if isinstance(inner, nn.Module | Stack):
        return inner, getattr(teacher, "tokenizer", None)
    raise MkaInputError(
        f"distillation teacher must be a causal LM (a model, a streamed model or a loaded one), "
        f"got {type(teacher).__name__}"
    )


def _same_tokenizer(a, b) -> bool:
    if a is None or b is None or a is b:
        return True
    if len(a) != len(b):
        return False
    va, vb = getattr(a, "get_vocab", None), getattr(b, "get_vocab", None)
    return va is None or vb is None or va() == vb()


def check_teacher(teacher, student: nn.Module, tokenizer=None) -> None:
    """The teacher must predict the student's vocabulary with the student's tokenizer (where both
    are known): top-k ids index the student's logits."""
    model, t_tok = _unpack(teacher)
    v_t, v_s = head_rows(model), head_rows(student)
    if v_t != v_s:
        raise MkaInputError(
            f"vocabulary mismatch: the teacher predicts {v_t} tokens, the student {v_s}; "
            f"distillation needs the same vocabulary"
        )
    if not _same_tokenizer(t_tok, tokenizer):
        raise MkaInputError(
            "the teacher's tokenizer differs from the student's (another vocabulary); "
            "distill from the model the student was compressed from"
        )


# ---------------------------------------------------------------------------------------------
# the teacher pass


def _scan_topk(stack: Stack, positions: torch.Tensor, k: int, rows: int):
    """Top-k logits and ids and the log-sum-exp of every position (P, d_model) over the whole
    vocabulary, the LM head applied a slice of `rows` ids at a time."""
    n, device = int(positions.shape[0]), positions.device
    best = torch.full((n, k), -math.inf, device=device)  # (P, k) float32, largest first
    best_ids = torch.zeros((n, k), dtype=torch.long, device=device)
    run_max = torch.full((n,), -math.inf, device=device)
    run_sum = torch.zeros(n, dtype=torch.float64, device=device)  # Σ exp(z - run_max)
    step = max(1, SCAN_ELEMENTS // (rows + k))  # positions per step
    seen = 0
    for v0, logits_fn in stack.logit_slices(rows):
        for p0 in range(0, max(n, 1), step):  # one empty step when there are no positions
            p = slice(p0, min(p0 + step, n))
            z = logits_fn(positions[p]).float()  # (P, R)
            width = int(z.shape[1])
            old = run_max[p]
            new = torch.maximum(old, z.max(dim=-1).values)
            rescale = torch.where(old == -math.inf, 0.0, torch.exp(old - new)).double()
            run_sum[p] = run_sum[p] * rescale + torch.exp(z - new[:, None]).sum(-1).double()
            run_max[p] = new
            # the best k of (the best so far, this slice): ties keep the earlier ids first
            cand = torch.cat([best[p], z], dim=1)  # (P, k + R)
            ids = torch.arange(v0, v0 + width, device=device).expand(z.shape[0], width)
            cand_ids = torch.cat([best_ids[p], ids], dim=1)
            top, at = cand.topk(k, dim=1)
            best[p], best_ids[p] = top, cand_ids.gather(1, at)
        seen = v0 + width
    lse = (run_max.double() + run_sum.log()).float()
    return best, best_ids, lse, seen


@torch.inference_mode()
def _group(stack: Stack, batch: CalibrationBatch, g: range, k: int, rows: int, vocab: int, sub):
    """One pass of the teacher over samples `g`: the (sample, position) of every real position
    (P, 2), and its top-k logits (P, k), ids (P, k) and log-sum-exp (P,)."""
    lp = LayerPass.start(
        stack,
        batch.input_ids[g.start : g.stop],
        batch.attention_mask[g.start : g.stop],
        batch_size=TEACHER_BATCH,
    )
    lp.run(progress=sub)
    hidden = lp.normed()  # per batch (B, Tb, d_model)
    states, where = [], []  # real positions, in order, and their (sample, position)
    row0 = g.start
    for b, h in zip(lp.batches, hidden):
        mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        if b.mask is not None:
            mask = b.mask.bool()
        states.append(h[mask])  # (P_b, d_model)
        where.append(torch.nonzero(mask.cpu()) + torch.tensor([row0, 0]))  # row-major, as h[mask]
        row0 += int(h.shape[0])
    del hidden, lp
    top, top_ids, lse, seen = _scan_topk(stack, torch.cat(states), k, rows)
    if seen != vocab:
        raise MkaInputError(
            f"the teacher's LM head has {seen} rows but its config says {vocab} tokens"
        )
    return torch.cat(where), top, top_ids, lse


def teacher_topk(
    teacher,
    batch: CalibrationBatch,
    k: int = DEFAULT_TOP_K,
    progress: ProgressFn | None = None,
    slice_rows: int | None = None,
) -> TeacherTopK:
    """The teacher's top-k next-token logits and full-vocabulary log-sum-exp at every real
    position of `batch`, on the layer-by-layer engine (in memory or streamed from disk).

    teacher: a model, a streamed model (Stack) or a LoadedModel. slice_rows: vocabulary ids per
    LM-head slice (default: the engine's, from the widths); the result does not depend on it."""
    if not isinstance(batch, CalibrationBatch) or batch.n_samples < 1:
        raise MkaInputError("distillation needs a non-empty CalibrationBatch of training text")
    model, _ = _unpack(teacher)
    stack = as_stack(model)
    vocab = head_rows(model)
    k = check_top_k(k, vocab)
    lo, hi = int(batch.input_ids.min()), int(batch.input_ids.max())
    n_emb = int(stack.config.vocab_size)
    if lo < 0 or hi >= n_emb:
        raise MkaInputError(
            f"calibration ids span [{lo}, {hi}] but the teacher's vocabulary has {n_emb} tokens; "
            f"was the batch made with another tokenizer?"
        )
    d_model = int(stack.config.hidden_size)
    rows = slice_rows or head_slice_rows(vocab, d_model)
    t0 = time.perf_counter()
    n, width = batch.input_ids.shape
    logits = torch.zeros((n, width, k), dtype=torch.float32)
    ids = torch.zeros((n, width, k), dtype=torch.int32)
    lse = torch.zeros((n, width), dtype=torch.float32)
    # samples per pass, so one pass holds at most PASS_ELEMENTS hidden values
    per = max(1, PASS_ELEMENTS // max(width * d_model, 1))
    groups = [range(s, min(s + per, n)) for s in range(0, n, per)]
    for gi, g in enumerate(groups):
        lo_f, hi_f = gi / len(groups), (gi + 1) / len(groups)

        def sub(f, msg, lo_f=lo_f, hi_f=hi_f):
            report(progress, lo_f + (hi_f - lo_f) * 0.9 * f, f"teacher: {msg}")

        at, top, top_ids, top_lse = _group(stack, batch, g, k, rows, vocab, sub)
        # inference tensors go into plain ones: the student's loss reads them under autograd
        logits[at[:, 0], at[:, 1]] = top.to("cpu", torch.float32)
        ids[at[:, 0], at[:, 1]] = top_ids.to("cpu", torch.int32)
        lse[at[:, 0], at[:, 1]] = top_lse.to("cpu", torch.float32)
        report(progress, hi_f, f"teacher: top-{k} of {gi + 1}/{len(groups)} sample groups")
    seconds = round(time.perf_counter() - t0, 3)
    log.info("teacher top-%d of %d positions in %.1f s", k, batch.n_tokens, seconds)
    return TeacherTopK(logits, ids, lse, vocab, batch_key(batch), seconds)


# ---------------------------------------------------------------------------------------------
# the loss


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_lse: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Mean over the real positions (mask 1) of the KL divergence of the student's next-token
    distribution from the teacher's, both coarsened to the teacher's top-k ids plus one bucket
    for every other id (the exact KL when k is the vocabulary size; see the module docstring).

    student_logits (B, T, V); teacher_logits and teacher_ids (B, T, k); teacher_lse and mask
    (B, T)."""
    z = student_logits.float()
    log_s = z.gather(-1, teacher_ids) - torch.logsumexp(z, dim=-1, keepdim=True)  # (B, T, k)
    log_t = teacher_logits.float() - teacher_lse.float()[..., None]  # (B, T, k)
    per = (log_t.exp() * (log_t - log_s)).sum(dim=-1)  # (B, T) the top-k ids
    # the bucket of the other ids: mass 1 - Σ_top-k p (expm1 keeps it exact near 0); the
    # student's is kept >= TAIL_FLOOR so its log and gradient stay finite
    tail_t = (-torch.expm1(torch.logsumexp(log_t, dim=-1))).clamp(min=0.0)  # (B, T)
    in_s = torch.logsumexp(log_s, dim=-1).clamp(max=math.log1p(-TAIL_FLOOR))
    log_tail_s = torch.log(-torch.expm1(in_s))
    tail = tail_t * (torch.log(tail_t.clamp(min=TAIL_FLOOR)) - log_tail_s)
    per = per + torch.where(tail_t > 0, tail, 0.0)
    return per[mask.bool()].mean()
