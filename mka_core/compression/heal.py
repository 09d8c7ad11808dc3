"""Healing: a short fine-tune of a compressed model on the calibration text.

After merging layers (MKA) or pruning inside them (TransAct) the remaining weights no longer quite
fit together; a few dozen to a few hundred AdamW steps of training on the calibration samples
recover much of the loss. The loss is plain next-token cross-entropy (``loss="ce"``) or
distillation from the original model (``loss="kd"``: the KL divergence of the student's
next-token distribution from the original's, on the original's top-k ids; see `distill`). All
parameters train, in fp32 (master weights), on the model's device; the model comes back in its
original dtype, in eval mode, frozen.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mka_core.compression.distill import (
    DEFAULT_TOP_K,
    TeacherTopK,
    batch_key,
    check_loss,
    check_teacher,
    check_top_k,
    head_rows,
    kd_loss,
    teacher_topk,
)
from mka_core.data.corpus import CalibrationBatch
from mka_core.errors import MkaInputError, ProgressFn, report

log = logging.getLogger(__name__)

FORMAT = "mka-heal-report"
VERSION = 1
MAX_STEPS = 2000
MIN_LR_FRACTION = 0.1  # the cosine schedule ends at 10% of the peak learning rate
WEIGHT_DECAY = 0.0  # a few hundred steps at most: nothing to regularise, don't shrink weights
CLIP_NORM = 1.0


@dataclass(frozen=True)
class HealReport:
    """The training loss of every step of a heal, and how it was run."""

    # (steps,) per step, the mean over real positions of the loss: next-token cross-entropy
    # ("ce") or the KL from the teacher on its top-k ids ("kd"), in nats
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    lr: float = 0.0
    batch_size: int = 0
    seed: int = 0
    seconds: float = 0.0
    n_params: int = 0  # trained parameters
    loss: str = "ce"  # "ce" or "kd"; reports written before distillation existed are "ce"
    top_k: int | None = None  # kd: teacher logits kept per position
    teacher_seconds: float = 0.0  # kd: the teacher pass (in `seconds` when it ran in this heal)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> HealReport:
        if d.get("format") != FORMAT:
            raise MkaInputError(
                f"not a heal report: format is {d.get('format')!r}, expected {FORMAT}"
            )
        if d.get("version") != VERSION:
            raise MkaInputError(f"unsupported heal report version {d.get('version')!r}")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def first_loss(self) -> float:
        """Mean of the first five steps' losses (one step is noisy)."""
        head = self.losses[:5]
        return sum(head) / len(head) if head else float("nan")

    @property
    def last_loss(self) -> float:
        """Mean of the last five steps' losses."""
        tail = self.losses[-5:]
        return sum(tail) / len(tail) if tail else float("nan")


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Cosine decay from `lr` at step 0 to MIN_LR_FRACTION * lr at the last step."""
    if steps <= 1:
        return lr
    cos = 0.5 * (1 + math.cos(math.pi * step / (steps - 1)))
    return lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * cos)


def _check(steps, lr, batch_size, batch) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise MkaInputError(f"heal steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    if not 1 <= int(steps) <= MAX_STEPS:
        raise MkaInputError(f"heal steps must be from 1 to {MAX_STEPS}, got {steps}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise MkaInputError(f"learning rate must be a positive number, got {lr!r}")
    if not (math.isfinite(float(lr)) and float(lr) > 0):
        raise MkaInputError(f"learning rate must be a positive number, got {lr!r}")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1
    ):
        raise MkaInputError(f"heal batch size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(batch, CalibrationBatch) or batch.n_samples < 1:
        raise MkaInputError("heal needs a non-empty CalibrationBatch of training text")
    if int((batch.attention_mask.sum(dim=1) >= 2).sum()) == 0:
        raise MkaInputError("heal needs samples of at least 2 tokens (nothing to predict)")


@dataclass
class _Drawn:
    """One training batch: samples `pick` of the calibration batch, cut to `width` tokens."""

    pick: torch.Tensor  # (B,) sample indices
    width: int
    ids: torch.Tensor  # (B, T) on the model's device
    mask: torch.Tensor  # (B, T)


def _draw_batch(
    batch: CalibrationBatch,
    usable: torch.Tensor,
    lengths: torch.Tensor,
    batch_size: int,
    gen,
    device,
) -> _Drawn:
    """`batch_size` usable samples drawn at random (with replacement), cut to the longest one's
    length."""
    pick = usable[torch.randint(len(usable), (min(batch_size, len(usable)),), generator=gen)]
    width = int(lengths[pick].max())
    ids = batch.input_ids[pick, :width].to(device)  # (B, T)
    mask = batch.attention_mask[pick, :width].to(device)  # (B, T)
    return _Drawn(pick, width, ids, mask)


def _ce(model, d: _Drawn) -> torch.Tensor:
    """Next-token cross-entropy on real tokens (padding labelled -100)."""
    labels = d.ids.masked_fill(d.mask == 0, -100)
    return model(input_ids=d.ids, attention_mask=d.mask, labels=labels, use_cache=False).loss


def _kd(targets: TeacherTopK):
    """The distillation loss against `targets` on every real position of a drawn batch."""

    def loss(model, d: _Drawn) -> torch.Tensor:
        out = model(input_ids=d.ids, attention_mask=d.mask, use_cache=False)
        t_logits, t_ids, t_lse = targets.rows(d.pick, d.width, d.ids.device)
        return kd_loss(out.logits, t_logits, t_ids, t_lse, d.mask)

    return loss


def _train_step(model, opt, params, loss_fn, d: _Drawn, step: int, steps: int, lr: float) -> float:
    """One AdamW step at the schedule's learning rate; returns the step's loss."""
    for group in opt.param_groups:
        group["lr"] = _lr_at(step, steps, lr)
    loss = loss_fn(model, d)
    if not torch.isfinite(loss):
        raise MkaInputError(
            f"healing diverged at step {step + 1} (loss {loss.item()}); lower the "
            f"learning rate (now {lr:g})"
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
    opt.step()
    return float(loss.detach())


def _train(
    model: nn.Module,
    batch: CalibrationBatch,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    progress: ProgressFn | None,
    loss_fn=_ce,
) -> tuple[list[float], int]:
    """Train `model` in place, in fp32, on `loss_fn(model, drawn batch)`; it comes back in its own
    dtype, in eval mode, frozen, even when training fails. Returns the loss of every step and the
    number of trained params."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype

    # only samples with something to predict
    lengths = batch.attention_mask.sum(dim=1)  # (n_samples,)
    usable = torch.nonzero(lengths >= 2).flatten()
    gen = torch.Generator().manual_seed(seed)

    model.to(torch.float32)
    model.train()
    model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    losses: list[float] = []
    report(progress, 0.0, f"healing: {steps} steps at lr {lr:g}")
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)  # dropout, where a model has any
            for step in range(steps):
                drawn = _draw_batch(batch, usable, lengths, batch_size, gen, device)
                losses.append(_train_step(model, opt, params, loss_fn, drawn, step, steps, lr))
                report(
                    progress,
                    (step + 1) / steps,
                    f"step {step + 1}/{steps}: loss {losses[-1]:.3f}",
                )
    finally:
        opt.zero_grad(set_to_none=True)
        model.eval()
        model.requires_grad_(False)
        model.to(dtype)
    return losses, n_params


def _targets(teacher, model, tokenizer, batch, top_k, progress) -> TeacherTopK:
    """The teacher's top-k for `batch`: computed now, or given (checked against the batch)."""
    if teacher is None:
        raise MkaInputError(
            "healing by distillation (loss 'kd') needs the original model as teacher; none given"
        )
    if isinstance(teacher, TeacherTopK):
        if teacher.batch_key != batch_key(batch):
            raise MkaInputError(
                "the distillation targets were computed on another calibration batch"
            )
        if top_k is not None and top_k != teacher.k:
            raise MkaInputError(
                f"top-k {top_k!r} asked but the distillation targets keep {teacher.k} per position"
            )
        if teacher.vocab_size != head_rows(model):
            raise MkaInputError(
                f"vocabulary mismatch: the teacher predicts {teacher.vocab_size} tokens, the "
                f"student {head_rows(model)}; distillation needs the same vocabulary"
            )
        return teacher
    check_teacher(teacher, model, tokenizer)
    k = check_top_k(DEFAULT_TOP_K if top_k is None else top_k, head_rows(model))
    return teacher_topk(teacher, batch, k, progress=progress)


def heal(
    model: nn.Module,
    tokenizer,
    batch: CalibrationBatch,
    steps: int = 100,
    lr: float = 1e-4,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    inplace: bool = False,
    seed: int = 0,
    *,
    loss: str = "ce",
    teacher=None,
    top_k: int | None = None,
) -> tuple[nn.Module, HealReport]:
    """Fine-tune `model` on `batch` for `steps` AdamW steps; return it (a copy unless `inplace`).

    Each step trains on `batch_size` samples drawn at random (seeded) from the batch. Gradients
    are clipped to norm 1.0 and the learning rate follows a cosine from `lr` down to a tenth of
    it. `tokenizer` is not needed (the batch is already tokenised) and may be None; given, a
    teacher's tokenizer is checked against it.

    loss: ``"ce"``, causal-LM cross-entropy on real tokens only (padding labelled -100); or
    ``"kd"``, distillation: the KL divergence of the model's next-token distribution from the
    teacher's at every real position, on the teacher's `top_k` ids (64 by default) plus one
    bucket for the rest (see `distill` for the approximation; exact at k = vocabulary size). The same draws, schedule
    and seed as "ce": only the loss differs.
    teacher (kd only; ignored for ce): the original model (in memory, streamed from disk, or a
    LoadedModel), run once before training on the layer-by-layer engine; or its `TeacherTopK`
    for this batch, already computed (e.g. to heal several students against one teacher).
    """
    _check(steps, lr, batch_size, batch)
    loss = check_loss(loss)
    steps, lr, batch_size = int(steps), float(lr), int(batch_size)
    t_start = time.perf_counter()
    loss_fn, targets, k = _ce, None, None
    train_progress = progress
    if loss == "kd":
        part = 0.2 if not isinstance(teacher, TeacherTopK) else 0.0
        targets = _targets(
            teacher,
            model,
            tokenizer,
            batch,
            top_k,
            None if progress is None else lambda f, m: report(progress, part * f, m),
        )
        loss_fn, k = _kd(targets), targets.k
        if progress is not None:
            train_progress = lambda f, m: report(progress, part + (1 - part) * f, m)  # noqa: E731
    out = model if inplace else copy.deepcopy(model)
    losses, n_params = _train(out, batch, steps, lr, batch_size, int(seed), train_progress, loss_fn)
    rep = HealReport(
        losses=losses,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=int(seed),
        seconds=round(time.perf_counter() - t_start, 3),
        n_params=n_params,
        loss=loss,
        top_k=k,
        teacher_seconds=targets.seconds if targets is not None else 0.0,
    )
    log.info("healed %d steps (%s): loss %.3f -> %.3f", steps, loss, rep.first_loss, rep.last_loss)
    return out, rep
