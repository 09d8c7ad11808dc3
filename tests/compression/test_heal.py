"""Healing (a short fine-tune) of compressed tiny models."""

import json

import pytest
import torch

from mka_core.compression.heal import HealReport, heal
from mka_core.compression.transact import prune
from mka_core.errors import MkaInputError


def test_heal_lowers_the_training_loss_of_a_pruned_model(tiny, tiny_batch):
    pruned, _ = prune(tiny.model, tiny_batch, mlp_keep=0.5, heads_keep=0.5, shots=2)
    frozen = {k: v.clone() for k, v in pruned.state_dict().items()}
    seen = []
    healed, rep = heal(
        pruned,
        tiny.tokenizer,
        tiny_batch,
        steps=30,
        lr=1e-3,
        progress=lambda f, m: seen.append(f),
    )
    assert len(rep.losses) == rep.steps == 30
    assert rep.last_loss < rep.first_loss
    assert seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    # a copy comes back, frozen and in eval mode; the input model is unchanged
    assert healed is not pruned
    assert not healed.training and not any(p.requires_grad for p in healed.parameters())
    assert all(torch.equal(frozen[k], v) for k, v in pruned.state_dict().items())
    assert any(not torch.equal(frozen[k], v) for k, v in healed.state_dict().items())
    assert healed.config.intermediate_size == 64


def test_heal_is_deterministic_and_inplace_works(tiny_copy, tiny_batch):
    _, r1 = heal(tiny_copy.model, None, tiny_batch, steps=3, lr=1e-3, seed=1)
    _, r2 = heal(tiny_copy.model, None, tiny_batch, steps=3, lr=1e-3, seed=1)
    assert r1.losses == r2.losses
    out, _ = heal(tiny_copy.model, None, tiny_batch, steps=2, inplace=True)
    assert out is tiny_copy.model and not out.training


def test_heal_report_round_trips():
    rep = HealReport(losses=[3.0, 2.5], steps=2, lr=1e-4, batch_size=8, seed=0, seconds=0.1)
    assert HealReport.from_dict(json.loads(json.dumps(rep.to_dict()))) == rep


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2001}, "2001"),
        ({"steps": 2.5}, "2.5"),
        ({"lr": 0}, "learning rate"),
        ({"lr": -1e-4}, "-0.0001"),
        ({"batch_size": 0}, "batch size"),
    ],
)
def test_heal_rejects_bad_settings(tiny, tiny_batch, kw, words):
    with pytest.raises(MkaInputError, match=words):
        heal(tiny.model, None, tiny_batch, **kw)
