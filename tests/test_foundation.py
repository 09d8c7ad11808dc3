"""Unit tests of loading, data, capture, manifolds and similarity on tiny models and constructed data."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mka_core.analysis.activations import Activations, capture_activations
from mka_core.analysis.manifold import diffusion_map, project_2d
from mka_core.analysis.similarity import (
    SimilarityResult,
    angular_block_scores,
    block_influence,
    cka_matrix,
    cluster_codes,
    compute_similarity,
    cosine_matrix,
    npib_from_codes,
)
from mka_core.data.corpus import (
    builtin_corpus,
    load_documents,
    load_mmlu,
    make_calibration,
    make_eval_windows,
    mmlu_prompts,
    parse_text,
)
from mka_core.errors import MkaInputError
from mka_core.models.loading import get_layers, load_model, pick_device, summarize

ROOT = Path(__file__).resolve().parents[1]


# --- models ---------------------------------------------------------------------------------


def test_tiny_model_is_deterministic_and_summarised(tiny):
    again = load_model("tiny:llama", device="cpu", dtype="fp32", seed=0)
    other = load_model("tiny:llama", device="cpu", dtype="fp32", seed=1)
    a, b, c = (m.model.model.layers[0].mlp.up_proj.weight for m in (tiny, again, other))
    assert torch.equal(a, b) and not torch.equal(a, c)
    s = summarize(tiny)
    assert (s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.head_dim) == (6, 64, 4, 2, 16)
    assert s.device == "cpu" and s.dtype == "float32"
    assert s.n_params == sum(p.numel() for p in tiny.model.parameters())
    assert tiny.fingerprint == again.fingerprint != other.fingerprint


def test_device_choice_prefers_cuda_then_cpu():
    assert pick_device() == ("cuda" if torch.cuda.is_available() else pick_device("cpu"))
    with pytest.raises(MkaInputError, match="unknown device"):
        pick_device("tpu")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/no/such/path", "not found"),
        ("/no/such/model.gguf", "GGUF file not found"),
        ("tiny:gpt5", "unknown tiny model"),
        ("bundled:llama-70b", "unknown bundled model"),
        ("", "empty"),
    ],
)
def test_bad_sources_give_one_line_errors(source, message):
    with pytest.raises(MkaInputError, match=message) as e:
        load_model(source)
    assert "\n" not in str(e.value)


def test_folder_without_config_or_safetensors_is_refused(tmp_path):
    with pytest.raises(MkaInputError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MkaInputError, match="safetensors"):
        load_model(str(tmp_path))


def test_hub_id_offline_says_how_to_use_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MkaInputError, match="copy its folder"):
        load_model("no-such-org/no-such-model-xyz")


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(MkaInputError, match="GPT2LMHeadModel.*found module lists: transformer.h"):
        get_layers(gpt2)


def test_local_folder_loads_with_same_logits(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), device="cpu", dtype="fp32")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(tiny.model(ids).logits, again.model(ids).logits)
    assert again.fingerprint == tiny.fingerprint


def test_cpu_default_dtype_is_bf16_and_loading_keeps_rotary_in_fp32(tmp_path):
    """bf16 on this CPU: 2.6-2.9x faster, perplexity within 0.05 % (BENCHMARKS.md, dtype). Only
    the weights are cast: the rotary frequencies stay fp32, as transformers keeps them."""
    from mka_core.models.loading import pick_dtype

    assert pick_dtype("cpu") == torch.bfloat16
    loaded = load_model("tiny:llama", device="cpu")
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32
    same = load_model("tiny:llama", device="cpu", dtype="fp32")
    assert loaded.fingerprint == same.fingerprint  # weights rounded to bf16 hash the same


# --- data -----------------------------------------------------------------------------------


def test_builtin_split_is_disjoint_and_covers_the_corpus():
    from pydoc_data.topics import topics

    calib, evl = builtin_corpus()
    assert {d.label for d in calib}.isdisjoint({d.label for d in evl})
    assert len(calib) + len(evl) == sum(1 for v in topics.values() if v.strip())
    keys = sorted(topics)
    assert calib[0].label == keys[0] and evl[0].label == keys[1]
    assert load_documents("builtin", "evaluation") == evl


def test_calibration_batch_shapes_and_padding(tiny):
    calib, _ = builtin_corpus()
    b = make_calibration(tiny.tokenizer, calib, n_samples=20, max_tokens=16)
    assert b.input_ids.shape == (20, 16) and b.attention_mask.shape == (20, 16)
    assert (b.attention_mask.sum(1) >= 2).all()
    assert len(b.doc_index) == 20 and len(set(b.doc_index)) > 5  # spread over documents
    with pytest.raises(MkaInputError, match="yields only"):
        make_calibration(tiny.tokenizer, calib[:1], n_samples=10_000, max_tokens=128)


def test_user_text_parsing(tmp_path):
    docs = parse_text("first doc\n\n\nsecond\ndoc\n\n", "a.txt")
    assert [d.text for d in docs] == ["first doc", "second\ndoc"]
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert [d.text for d in load_documents(str(jl))] == ["one", "two"]
    jl.write_text('{"text": "one"}\n{"txt": 1}\n')
    with pytest.raises(MkaInputError, match="line 2"):
        load_documents(str(jl))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(MkaInputError, match="contains no text"):
        load_documents(str(empty))


def _write_mmlu(root: Path) -> None:
    for split, rows in {
        "dev": [["1+1?", "1", "2", "3", "4", "B"]],
        "test": [
            ["2+2?", "4", "3", "2", "1", "A"],
            ['Say "hi", please', "hi", "ho", "ha", "he", "A"],
        ],
    }.items():
        (root / split).mkdir(parents=True)
        with open(root / split / f"elementary_math_{split}.csv", "w", newline="") as f:
            import csv

            csv.writer(f).writerows(rows)


def test_mmlu_parsing_and_prompt_format(tmp_path):
    _write_mmlu(tmp_path)
    items = load_mmlu(tmp_path, "test")
    assert len(items) == 2 and items[1].question == 'Say "hi", please'
    assert items[0].subject == "elementary_math" and items[0].answer == "A"
    prompt, _ = mmlu_prompts(tmp_path, k_shot=1)[0]
    assert prompt.startswith(
        "The following are multiple choice questions (with answers) about elementary math."
    )
    assert "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n2+2?\nA. 4" in prompt
    assert prompt.endswith("D. 1\nAnswer:")
    docs = load_documents(str(tmp_path))
    assert len(docs) == 2 and docs[0].label == "elementary_math"
    bad = tmp_path / "test" / "bad_test.csv"
    bad.write_text("q,a,b,c,d,E\n")
    with pytest.raises(MkaInputError, match="bad_test.csv row 1.*not A, B, C or D"):
        load_mmlu(tmp_path, "test")


def test_eval_windows_are_fixed_and_non_overlapping(tiny):
    _, evl = builtin_corpus()
    w = make_eval_windows(tiny.tokenizer, evl, budget_tokens=1000, window=128)
    assert w.shape == (7, 128)
    w2 = make_eval_windows(tiny.tokenizer, evl, budget_tokens=1000, window=128)
    assert torch.equal(w, w2)
    with pytest.raises(MkaInputError, match="at least one window"):
        make_eval_windows(tiny.tokenizer, evl, budget_tokens=64, window=128)


# --- capture --------------------------------------------------------------------------------


def test_capture_shapes_and_matches_hidden_states(tiny, tiny_batch):
    acts = capture_activations(
        tiny.model, tiny_batch, pooling="last", batch_size=5, skip_first=False
    )
    assert acts.states.shape == (7, 24, 64) and acts.states.dtype == np.float32
    # the hooks must see exactly what output_hidden_states reports (before the final norm)
    i = 3
    n = int(tiny_batch.attention_mask[i].sum())
    with torch.no_grad():
        out = tiny.model(tiny_batch.input_ids[i : i + 1, :n], output_hidden_states=True)
    for layer in range(6):  # hidden_states[l] is the input of block l
        np.testing.assert_allclose(
            acts.states[layer, i], out.hidden_states[layer][0, -1], atol=1e-5
        )


def test_padding_is_masked(tiny, tiny_batch):
    """A sample's pooled rows do not depend on how much padding its batch had."""
    alone = capture_activations(tiny.model, tiny_batch, pooling="mean", batch_size=1)
    batched = capture_activations(tiny.model, tiny_batch, pooling="mean", batch_size=24)
    np.testing.assert_allclose(alone.states, batched.states, atol=1e-4)
    ids = tiny_batch.input_ids.clone()
    ids[tiny_batch.attention_mask == 0] = 7  # change what sits under the padding
    from dataclasses import replace

    other = capture_activations(tiny.model, replace(tiny_batch, input_ids=ids), pooling="mean")
    np.testing.assert_allclose(batched.states, other.states, atol=1e-5)


def test_token_pooling_keeps_rows_paired(tiny, tiny_batch):
    acts = capture_activations(
        tiny.model, tiny_batch, pooling="tokens", tokens_per_sample=4, seed=3
    )
    assert acts.states.shape == (7, 24 * 4, 64)
    assert list(acts.sample_ids[:8]) == [0, 0, 0, 0, 1, 1, 1, 1]
    again = capture_activations(
        tiny.model, tiny_batch, pooling="tokens", tokens_per_sample=4, seed=3
    )
    np.testing.assert_array_equal(acts.states, again.states)
    with pytest.raises(MkaInputError, match="unknown pooling"):
        capture_activations(tiny.model, tiny_batch, pooling="max")


def test_capture_runs_each_block_once_per_batch(tiny, tiny_batch):
    calls = {i: 0 for i in range(6)}
    layers = tiny.model.model.layers
    hooks = [
        layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(layers)
    ]
    try:
        capture_activations(tiny.model, tiny_batch, batch_size=8)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {i: 3 for i in range(6)}  # 24 samples / 8: one pass, never one per layer


# --- manifold -------------------------------------------------------------------------------


def test_diffusion_map_recovers_the_angle_on_a_circle():
    rng = np.random.default_rng(0)
    theta = np.sort(rng.uniform(0, 2 * np.pi, 300))
    x = np.c_[np.cos(theta), np.sin(theta), 0.01 * rng.normal(size=(300, 3))]
    dm = diffusion_map(x, d=2)
    y = dm.embedding
    # the first two coordinates are (scaled) cos/sin of the angle: the angle is recovered
    recovered = np.arctan2(y[:, 1], y[:, 0])
    diff = np.angle(np.exp(1j * (recovered - theta)))
    spread = np.abs(np.angle(np.exp(1j * (diff - np.median(diff)))))
    flipped = np.abs(np.angle(np.exp(1j * (-recovered - theta - np.median(-recovered - theta)))))
    assert min(np.percentile(spread, 95), np.percentile(flipped, 95)) < 0.15
    assert dm.eigenvalues[0] == 1.0 and 1 > dm.eigenvalues[1] > 0
    # evenly spaced points: the circle's first nontrivial eigenvalue is a degenerate pair
    grid = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    lam = diffusion_map(np.c_[np.cos(grid), np.sin(grid)], d=3).eigenvalues
    assert abs(lam[1] - lam[2]) < 1e-6 and lam[3] < lam[2] - 0.05
    r = np.linalg.norm(y, axis=1)
    assert r.std() / r.mean() < 0.1  # a circle maps to a circle


def test_diffusion_map_survives_outliers_and_duplicates():
    x = np.zeros((40, 5))
    x[:20] = np.random.default_rng(1).normal(size=(20, 5))
    x[-1] = 1e4  # one far outlier
    y = diffusion_map(x, d=3).embedding
    assert np.isfinite(y).all()
    with pytest.raises(MkaInputError, match="between 1 and"):
        diffusion_map(x, d=50)


@pytest.mark.parametrize("method", ["diffusion", "pca", "umap"])
def test_projections_are_two_dimensional(method):
    x = np.random.default_rng(0).normal(size=(40, 8))
    assert project_2d(x, method).shape == (40, 2)


# --- similarity -----------------------------------------------------------------------------


def _fake_acts(states):
    n = states.shape[1]
    return Activations(states.astype(np.float32), np.arange(n), ["x"] * n, "mean")


def test_npib_properties():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(512, 16))
    states = np.stack([base, base, base * 3 + 1, rng.normal(size=(512, 16))])
    emb = [diffusion_map(s).embedding for s in states]
    s = npib_from_codes(cluster_codes(emb, k=8))
    assert s.shape == (4, 4)
    np.testing.assert_allclose(s, s.T)
    np.testing.assert_allclose(np.diag(s), 1.0)
    assert ((s >= 0) & (s <= 1)).all()
    assert s[0, 1] == pytest.approx(1.0)  # identical layers
    assert s[0, 2] > 0.9  # an affine copy clusters the same way
    assert s[0, 3] < 0.1  # an independent random layer shares no information


def test_npib_matches_a_direct_computation():
    from sklearn.metrics import mutual_info_score

    codes = np.random.default_rng(0).integers(0, 5, size=(3, 200))
    s = npib_from_codes(codes)

    def h(c):
        p = np.bincount(c) / len(c)
        return -(p[p > 0] * np.log(p[p > 0])).sum()

    want = mutual_info_score(codes[0], codes[2]) / np.sqrt(h(codes[0]) * h(codes[2]))
    assert s[0, 2] == pytest.approx(want, rel=1e-9)


def test_cosine_angular_cka_block_influence_on_constructed_cases():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    states = np.stack([a, a, -a, a @ np.linalg.qr(rng.normal(size=(8, 8)))[0] * 2])
    cos = cosine_matrix(states)
    assert cos[0, 1] == pytest.approx(1.0) and cos[0, 2] == pytest.approx(-1.0)
    cka = cka_matrix(states)
    assert cka[0, 3] == pytest.approx(1.0, abs=1e-9)  # CKA is invariant to rotation and scale
    assert cka[0, 2] == pytest.approx(1.0)
    acts = _fake_acts(states)
    np.testing.assert_allclose(block_influence(acts), [0.0, 2.0, 1 - cos[2, 3]], atol=1e-9)
    ang = angular_block_scores(acts, 1)
    assert ang[0] == pytest.approx(0.0, abs=1e-6) and ang[1] == pytest.approx(1.0)
    assert angular_block_scores(acts, 2)[0] == pytest.approx(1.0)  # input of 0 vs output of 1


def test_similarity_result_saves_and_loads(tiny, tiny_batch, tmp_path):
    acts = capture_activations(tiny.model, tiny_batch, pooling="tokens", tokens_per_sample=4)
    sim = compute_similarity(acts)
    for name in ("npib", "cosine", "angular", "cka"):
        m = sim.matrices[name]
        assert m.shape == (6, 6)
        np.testing.assert_allclose(m, m.T, atol=1e-9)
    np.testing.assert_allclose(sim.block_scores(1), angular_block_scores(acts, 1), atol=1e-9)
    sim.save(tmp_path)
    again = SimilarityResult.load(tmp_path)
    for name in sim.matrices:
        np.testing.assert_array_equal(again.matrices[name], sim.matrices[name])
    meta = json.loads((tmp_path / "similarity.json").read_text())
    assert meta["layers"] == list(range(6)) and meta["params"]["k"] == 8
    assert (tmp_path / "npib.csv").read_text().startswith("layer,0,1,2,3,4,5\n0,1,")
