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


# ---------------------------------------------------------------------------------------------
# healing by distillation from the original


def _drop_two(loaded):
    """tiny:llama without layers 2 and 3: a student that no longer matches its original."""
    from mka_core.compression.merge import apply_plan
    from mka_core.compression.plan import ModelRef, Step, make_plan

    plan = make_plan(ModelRef.from_loaded(loaded), [Step.drop((2, 3))], {"planner": "manual"})
    return apply_plan(loaded.model, plan)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def test_teacher_topk_is_the_top_of_the_full_logits(tiny, tiny_batch):
    from mka_core.compression.distill import teacher_topk

    full = _logits(tiny.model, tiny_batch)  # (n_samples, T, V)
    real = tiny_batch.attention_mask.bool()
    top = teacher_topk(tiny, tiny_batch, k=8)
    assert top.logits.shape == (*tiny_batch.input_ids.shape, 8) and top.k == 8
    want = full.topk(8, dim=-1)
    torch.testing.assert_close(top.logits[real], want.values[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(top.ids[real].long(), want.indices[real])
    torch.testing.assert_close(top.lse[real], full.logsumexp(-1)[real], atol=1e-5, rtol=1e-5)
    assert not top.logits[~real].any() and not top.lse[~real].any()  # padding: never read
    # the running top-k and log-sum-exp across vocabulary slices give the same (7 ids a slice)
    sliced = teacher_topk(tiny, tiny_batch, k=8, slice_rows=7)
    assert torch.equal(sliced.ids, top.ids)
    torch.testing.assert_close(sliced.logits, top.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(sliced.lse, top.lse, atol=1e-5, rtol=0)


def test_kd_loss_with_k_equal_to_the_vocabulary_is_the_exact_kl(tiny, tiny_batch):
    from mka_core.compression.distill import kd_loss, teacher_topk

    student = _drop_two(tiny)
    vocab = tiny.model.get_output_embeddings().weight.shape[0]
    real = tiny_batch.attention_mask.bool()
    s_logits, t_logits = _logits(student, tiny_batch), _logits(tiny.model, tiny_batch)
    log_t, log_s = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
    exact = (log_t.exp() * (log_t - log_s)).sum(-1)[real].mean()  # KL(P_T || P_S) per position
    assert exact > 1e-4  # dropping two layers does change the distribution

    def loss(k):
        top = teacher_topk(tiny, tiny_batch, k=k)
        return kd_loss(s_logits, top.logits, top.ids.long(), top.lse, tiny_batch.attention_mask)

    torch.testing.assert_close(loss(vocab), exact, atol=1e-6, rtol=1e-4)
    # fewer ids: the KL of coarser distributions (top-k + the rest), between 0 and the exact KL
    for k in (1, 8, 64):
        assert 0 <= float(loss(k)) <= float(exact) + 1e-7, k


def test_kd_heal_brings_a_pruned_model_closer_to_the_original(tiny, tiny_batch):
    from mka_core.data.corpus import builtin_corpus, make_eval_windows
    from mka_core.evaluation.evaluate import fidelity

    student = _drop_two(tiny)
    _, held_out = builtin_corpus()  # text the heal never sees
    windows = make_eval_windows(tiny.tokenizer, held_out, budget_tokens=2048, window=128)
    before = fidelity(tiny.model, student, windows)
    seen = []
    healed, rep = heal(
        student,
        tiny.tokenizer,
        tiny_batch,
        steps=30,
        lr=1e-3,
        loss="kd",
        teacher=tiny,
        progress=lambda f, m: seen.append(f),
    )
    assert rep.loss == "kd" and rep.top_k == 64 and len(rep.losses) == 30
    assert rep.last_loss < rep.first_loss
    assert seen == sorted(seen) and seen[-1] == 1.0
    after = fidelity(tiny.model, healed, windows)
    assert after["kl"] < 0.9 * before["kl"], (before["kl"], after["kl"])
    # the plain heal, same draws and schedule, learns the text instead: it moves away
    plain, rep_ce = heal(student, tiny.tokenizer, tiny_batch, steps=30, lr=1e-3)
    assert rep_ce.loss == "ce" and rep_ce.top_k is None
    assert fidelity(tiny.model, plain, windows)["kl"] > after["kl"]


def test_teacher_topk_of_a_streamed_original_equals_the_in_memory_one(tiny, tiny_batch, tmp_path):
    from mka_core.compression.distill import teacher_topk
    from mka_core.engine.layerpass import Stack
    from mka_core.models.loading import load_model
    from mka_core.workflows.export import save_model

    folder = save_model(tiny.model, tiny.tokenizer, tmp_path / "original")
    streamed = load_model(str(folder), offload=True, dtype="fp32")
    assert isinstance(streamed.model, Stack) and streamed.streamed
    mem = teacher_topk(tiny, tiny_batch, k=16)
    disk = teacher_topk(streamed, tiny_batch, k=16, slice_rows=100)
    assert torch.equal(disk.ids, mem.ids)
    torch.testing.assert_close(disk.logits, mem.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(disk.lse, mem.lse, atol=1e-5, rtol=0)
    # and heals with it: its tokenizer, read from the folder, is the student's
    _, rep = heal(_drop_two(tiny), tiny.tokenizer, tiny_batch, steps=2, loss="kd", teacher=streamed)
    assert rep.loss == "kd" and len(rep.losses) == 2


def test_precomputed_targets_give_the_same_heal(tiny, tiny_batch):
    from mka_core.compression.distill import teacher_topk

    student = _drop_two(tiny)
    targets = teacher_topk(tiny, tiny_batch, k=16)
    _, direct = heal(student, None, tiny_batch, steps=3, lr=1e-3, loss="kd", teacher=tiny, top_k=16)
    _, given = heal(student, None, tiny_batch, steps=3, lr=1e-3, loss="kd", teacher=targets)
    assert given.losses == direct.losses and given.top_k == 16
    with pytest.raises(MkaInputError, match="another calibration batch"):
        heal(student, None, tiny_batch.subset(8), steps=1, loss="kd", teacher=targets)
    with pytest.raises(MkaInputError, match="keep 16"):
        heal(student, None, tiny_batch, steps=1, loss="kd", teacher=targets, top_k=8)


def _other_vocab_model():
    from transformers import AutoModelForCausalLM

    from mka_core.models.tiny import tiny_config

    return AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=600)).eval()


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"loss": "mse"}, "unknown heal loss 'mse'"),
        ({"loss": None}, "unknown heal loss None"),
        ({"loss": "kd"}, "needs the original model as teacher"),
        ({"loss": "kd", "top_k": 0}, "from 1 to the vocabulary size 512, got 0"),
        ({"loss": "kd", "top_k": 513}, "got 513"),
        ({"loss": "kd", "top_k": 2.5}, "integer"),
        ({"loss": "kd", "teacher": "tiny:llama"}, "got str"),
        ({"loss": "kd", "teacher": "other vocab"}, "the teacher predicts 600 tokens"),
        ({"loss": "kd", "teacher": "other tokenizer"}, "tokenizer differs"),
    ],
)
def test_kd_rejects_bad_input(tiny, tiny_batch, kw, words):
    import copy

    if kw.get("teacher") == "other vocab":
        kw = {**kw, "teacher": _other_vocab_model()}
    elif kw.get("teacher") == "other tokenizer":
        other = copy.copy(tiny)
        other.tokenizer = copy.deepcopy(tiny.tokenizer)
        other.tokenizer.add_tokens(["<not-in-the-student>"])
        kw = {**kw, "teacher": other}
    elif kw.get("loss") == "kd" and "teacher" not in kw and "top_k" in kw:
        kw = {**kw, "teacher": tiny}
    with pytest.raises(MkaInputError, match=words) as err:
        heal(tiny.model, tiny.tokenizer, tiny_batch, steps=1, **kw)
    assert "\n" not in str(err.value)


def test_kd_heal_report_round_trips_and_old_reports_still_read():
    rep = HealReport(losses=[0.5, 0.4], steps=2, lr=1e-4, batch_size=4, loss="kd", top_k=64)
    back = HealReport.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert back == rep and back.loss == "kd" and back.top_k == 64
    old = rep.to_dict()
    for key in ("loss", "top_k", "teacher_seconds"):
        del old[key]
    assert HealReport.from_dict(old).loss == "ce" and HealReport.from_dict(old).top_k is None


def test_cli_heal_by_distillation(tmp_path, capsys):
    from mka_core.cli.main import main

    fast = ["--quiet", "--samples", "16", "--tokens", "32", "--budget", "512", "--window", "128"]
    small = tmp_path / "small"
    plan = ["plan", "--model", "tiny:llama", *fast[:5], "--planner", "shortgpt"]
    plan += ["--layers-to-remove", "2", "--out", str(tmp_path / "p.json"), "--apply", str(small)]
    assert main(plan) == 0
    capsys.readouterr()
    healed = tmp_path / "healed"
    args = ["heal", "--model", str(small), *fast, "--steps", "3", "--loss", "kd"]
    assert main([*args, "--kd-top-k", "16", "--out", str(healed)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["loss"] == "kd" and info["top_k"] == 16 and info["steps"] == 3
    record = json.loads((healed / "mka-run.json").read_text())
    assert record["stages"][-1]["report"]["loss"] == "kd" and record["source"] == "tiny:llama"
    # bad input: one line, exit 2, nothing written
    assert main([*args, "--kd-top-k", "9999", "--out", str(tmp_path / "x")]) == 2
    assert "vocabulary size 512, got 9999" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert (
        main(["heal", "--model", "tiny:llama", *fast, "--loss", "kd", "--out", str(tmp_path / "y")])
        == 2
    )
    assert "name it with --teacher" in capsys.readouterr().err
