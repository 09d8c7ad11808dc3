"""Evaluation: perplexity, fidelity, speed, generations, MMLU accuracy, result files."""

import copy
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mka_core.errors import MkaInputError
from mka_core.evaluation import evaluate as ev
from mka_core.evaluation import generation as gen
from mka_core.models.loading import count_params


@pytest.fixture(scope="module")
def windows(tiny):
    from mka_core.data.corpus import builtin_corpus, make_eval_windows

    _, evaluation = builtin_corpus()
    return make_eval_windows(tiny.tokenizer, evaluation, budget_tokens=512, window=128)


@pytest.fixture(scope="module")
def perturbed(tiny):
    """A copy of the tiny model with noise on one block's weights (the original is untouched)."""
    model = copy.deepcopy(tiny.model)
    gen = torch.Generator().manual_seed(1)
    block = model.model.layers[2]
    with torch.no_grad():
        for lin in (block.mlp.down_proj, block.self_attn.o_proj):
            lin.weight.add_(torch.randn(lin.weight.shape, generator=gen) * 0.5)
    return model


def _write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture(scope="module")
def mmlu_folder(tmp_path_factory):
    """Two subjects in the original MMLU layout (no header); known answers: 4 of 9 are A."""
    root = tmp_path_factory.mktemp("mmlu")
    astro = [
        ["What orbits the Earth?", "The Moon", "Mars", "The Sun", "Venus", "A"],
        ["Which planet is red?", "Venus", "Mars", "Jupiter", "Saturn", "B"],
        ["Which planet is largest?", "Jupiter", "Mars", "Earth", "Mercury", "A"],
        ["What is a star made of?", "Rock", "Ice", "Plasma", "Wood", "C"],
        ["How many moons has Mars?", "None", "One", "Three", "Two", "D"],
    ]
    algebra = [
        ["What is 2 + 2?", "4", "3", "5", "22", "A"],
        ["Solve x + 1 = 3.", "1", "2", "3", "4", "B"],
        ["What is 3 * 3?", "6", "12", "9", "33", "C"],
        ["What is 10 - 4?", "6", "5", "4", "7", "A"],
    ]
    _write_csv(root / "test" / "astronomy_test.csv", astro)
    _write_csv(root / "test" / "abstract_algebra_test.csv", algebra)
    _write_csv(
        root / "dev" / "astronomy_dev.csv",
        [["Is the Sun a star?", "Yes", "No", "-", "-", "A"]],
    )
    _write_csv(
        root / "dev" / "abstract_algebra_dev.csv",
        [["What is 1 + 1?", "1", "2", "3", "4", "B"]],
    )
    return root


# ---------------------------------------------------------------------------------------------
# perplexity and fidelity


def test_perplexity_matches_cross_entropy_by_hand(tiny, windows):
    one = windows[:1]  # (1, 128)
    with torch.no_grad():
        logits = tiny.model(input_ids=one).logits[0]  # (128, V)
    expected = math.exp(F.cross_entropy(logits[:-1].float(), one[0, 1:]).item())
    assert ev.perplexity(tiny.model, one) == pytest.approx(expected, rel=1e-5)


def test_perplexity_is_mean_over_all_positions_independent_of_batching(tiny, windows):
    three = windows[:3]
    per_window = [math.log(ev.perplexity(tiny.model, three[i : i + 1])) for i in range(3)]
    expected = math.exp(sum(per_window) / 3)  # same number of positions in every window
    assert ev.perplexity(tiny.model, three, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_untrained_model_perplexity_is_of_the_vocabulary_order(tiny, windows):
    ppl = ev.perplexity(tiny.model, windows)
    vocab = tiny.model.config.vocab_size
    assert math.isfinite(ppl) and ppl > 1
    assert vocab / 4 < ppl < vocab * 4


def test_model_against_itself_has_zero_kl_and_full_agreement(tiny, windows):
    fid = ev.fidelity(tiny.model, copy.deepcopy(tiny.model), windows)
    assert abs(fid["kl"]) < 1e-6
    assert fid["top1"] == 1.0
    assert fid["n_positions"] == 4 * 127
    ppl = ev.perplexity(tiny.model, windows)
    assert fid["perplexity_original"] == pytest.approx(ppl, rel=1e-6)
    assert fid["perplexity_compressed"] == pytest.approx(ppl, rel=1e-6)


def test_perturbed_copy_diverges_and_original_is_untouched(tiny, perturbed, windows):
    before = ev.perplexity(tiny.model, windows)
    fid = ev.fidelity(tiny.model, perturbed, windows, batch_size=2)
    assert fid["kl"] > 1e-4
    assert 0.0 <= fid["top1"] < 1.0
    assert fid["perplexity_original"] == pytest.approx(before, rel=1e-6)
    assert fid["perplexity_compressed"] == pytest.approx(
        ev.perplexity(perturbed, windows), rel=1e-6
    )
    assert ev.perplexity(tiny.model, windows) == before


def test_evaluation_restores_training_mode(tiny_copy, windows):
    tiny_copy.model.train()
    ev.perplexity(tiny_copy.model, windows[:1])
    assert tiny_copy.model.training


def test_progress_reaches_one(tiny, windows):
    seen = []
    ev.perplexity(tiny.model, windows, batch_size=2, progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("block 6/6" in m for _, m in seen)  # progress counts the blocks run
    assert all(isinstance(m, str) and m for _, m in seen)


# ---------------------------------------------------------------------------------------------
# speed, text, size


def test_speed_returns_positive_rates(tiny):
    s = ev.speed(tiny.model, tiny.tokenizer, prompt_tokens=32, new_tokens=4, repeats=1)
    assert s["prefill_tps"] > 0 and s["decode_tps"] > 0
    assert s["generate_s"] > 0 and s["prefill_s"] > 0
    assert s["prompt_tokens"] == 32 and s["new_tokens"] == 4


def test_speed_prompt_is_fixed_and_exact_length(tiny):
    a = gen.speed_prompt(tiny.tokenizer, 50)
    assert a.shape == (1, 50)
    assert torch.equal(a, gen.speed_prompt(tiny.tokenizer, 50))


def test_generations_return_only_new_text(tiny):
    out = ev.generations(tiny.model, tiny.tokenizer, ["The capital of France is", "def f(n):"], 8)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert not out[0].startswith("The capital")
    # greedy: the same text every time
    assert out == ev.generations(
        tiny.model, tiny.tokenizer, ["The capital of France is", "def f(n):"], 8
    )
    assert len(gen.DEFAULT_PROMPTS) >= 4


def test_size_of_tiny_model(tiny):
    s = ev.size(tiny.model)
    assert s["params"] == count_params(tiny.model)
    assert s["bytes"] >= 4 * s["params"]  # float32
    assert (s["n_layers"], s["intermediate_size"], s["n_heads"], s["n_kv_heads"]) == (
        6,
        128,
        4,
        2,
    )


# ---------------------------------------------------------------------------------------------
# MMLU


def test_mmlu_accuracy_counts_and_subjects(tiny, mmlu_folder):
    res = ev.mmlu_accuracy(tiny.model, tiny.tokenizer, mmlu_folder)
    assert res["n"] == 9 and res["k_shot"] == 0
    assert 0.0 <= res["accuracy"] <= 1.0
    assert set(res["per_subject"]) == {"astronomy", "abstract_algebra"}
    assert res["per_subject"]["astronomy"]["n"] == 5
    assert res["per_subject"]["abstract_algebra"]["n"] == 4
    assert ev.mmlu_accuracy(tiny.model, tiny.tokenizer, mmlu_folder, k_shot=1, limit=3)["n"] == 3


def test_model_biased_to_answer_a_scores_the_share_of_a(tiny, mmlu_folder):
    a_id = ev.answer_token_ids(tiny.tokenizer)[0]
    biased = copy.deepcopy(tiny.model)
    old = biased.get_output_embeddings()  # tied to the embeddings: replace it, don't edit it
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[a_id] = 1e4
    biased.lm_head = head
    res = ev.mmlu_accuracy(biased, tiny.tokenizer, mmlu_folder, k_shot=1, batch_size=4)
    assert res["accuracy"] == pytest.approx(4 / 9)
    assert res["per_subject"]["astronomy"]["accuracy"] == pytest.approx(2 / 5)
    assert res["per_subject"]["abstract_algebra"]["accuracy"] == pytest.approx(2 / 4)


def test_answer_letters_follow_a_space(tiny):
    ids = ev.answer_token_ids(tiny.tokenizer)
    assert len(set(ids)) == 4
    a = tiny.tokenizer("Answer: A", add_special_tokens=False)["input_ids"]
    assert a[-1] == ids[0]


# ---------------------------------------------------------------------------------------------
# results


def test_compare_and_results_round_trip(tiny, perturbed, windows, mmlu_folder, tmp_path):
    orig, comp = ev.compare(
        tiny,
        perturbed,
        windows,
        label="noisy",
        with_speed=False,
        gen_tokens=4,
        mmlu_folder=mmlu_folder,
        meta={"data": "builtin", "budget": 512},
    )
    assert orig.label == "original" and comp.label == "noisy"
    assert orig.kl is None and orig.top1 is None
    assert comp.kl > 0 and comp.top1 < 1
    assert orig.perplexity == pytest.approx(ev.perplexity(tiny.model, windows), rel=1e-6)
    assert comp.eval_tokens == orig.eval_tokens == 4 * 127
    assert orig.n_layers == 6 and orig.params == count_params(tiny.model)
    assert len(comp.generations) == len(gen.DEFAULT_PROMPTS)
    assert comp.mmlu["n"] == 9
    assert comp.meta["window"] == 128 and comp.meta["data"] == "builtin"
    assert comp.meta["device"] == "cpu"
    assert comp.prefill_tps is None

    assert ev.EvalResult.from_dict(comp.to_dict()) == comp
    path = ev.save_results(tmp_path / "out" / "eval.json", [orig, comp])
    raw = json.loads(path.read_text())
    assert raw["format"] == "mka-eval" and raw["version"] == 1
    assert ev.load_results(path) == [orig, comp]
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temp file left


def test_evaluate_model_single(tiny, windows):
    res = ev.evaluate_model(
        tiny.model, tiny.tokenizer, windows, label="tiny", with_speed=False, gen_tokens=2
    )
    assert res.kl is None and res.top1 is None and res.mmlu is None
    assert res.perplexity == pytest.approx(ev.perplexity(tiny.model, windows), rel=1e-6)
    assert res.n_layers == 6 and len(res.generations) == 4


def test_result_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "mka-plan", "version": 1}))
    with pytest.raises(MkaInputError, match="not an MKA Studio evaluation file"):
        ev.load_results(bad)
    bad.write_text(json.dumps({"format": "mka-eval", "version": 2, "results": []}))
    with pytest.raises(MkaInputError, match="version 2"):
        ev.load_results(bad)
    bad.write_text("{not json")
    with pytest.raises(MkaInputError, match="not valid JSON"):
        ev.load_results(bad)
    with pytest.raises(MkaInputError, match="perplexity"):
        ev.EvalResult.from_dict({"label": "x", "params": 1, "bytes": 1, "n_layers": 1})
    with pytest.raises(MkaInputError, match="not found"):
        ev.load_results(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_windows_raise(tiny, windows):
    m = tiny.model
    with pytest.raises(MkaInputError, match="empty"):
        ev.perplexity(m, torch.empty((0, 128), dtype=torch.long))
    with pytest.raises(MkaInputError, match="2-D"):
        ev.perplexity(m, windows[0])
    with pytest.raises(MkaInputError, match="integer token ids"):
        ev.perplexity(m, windows.float())
    with pytest.raises(MkaInputError, match="max_position_embeddings"):
        ev.perplexity(m, torch.zeros((1, 1025), dtype=torch.long))
    with pytest.raises(MkaInputError, match="vocabulary"):
        ev.perplexity(m, torch.full((1, 8), 10_000, dtype=torch.long))
    with pytest.raises(MkaInputError, match="batch size"):
        ev.perplexity(m, windows, batch_size=0)
    with pytest.raises(MkaInputError, match="tensor"):
        ev.perplexity(m, [[1, 2, 3]])


def test_vocab_mismatch_raises(tiny, windows):
    other = copy.deepcopy(tiny.model)
    other.lm_head = nn.Linear(64, 600, bias=False)
    with pytest.raises(MkaInputError, match="vocabulary mismatch"):
        ev.fidelity(tiny.model, other, windows)


def test_other_bad_inputs_raise(tiny, windows, tmp_path):
    with pytest.raises(MkaInputError, match="new_tokens"):
        ev.speed(tiny.model, tiny.tokenizer, new_tokens=1)
    with pytest.raises(MkaInputError, match="max_position_embeddings"):
        ev.speed(tiny.model, tiny.tokenizer, prompt_tokens=1020, new_tokens=8)
    with pytest.raises(MkaInputError, match="MMLU folder not found"):
        ev.mmlu_accuracy(tiny.model, tiny.tokenizer, tmp_path / "nope")
    with pytest.raises(MkaInputError, match="tokenizer"):
        ev.compare(tiny.model, copy.deepcopy(tiny.model), windows)
    with pytest.raises(MkaInputError, match="prompts"):
        ev.generations(tiny.model, tiny.tokenizer, [])
