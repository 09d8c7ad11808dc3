"""Capture, diffusion maps and projections, and the similarity measures on tiny models and constructed data."""

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
from mka_core.errors import MkaInputError

ROOT = Path(__file__).resolve().parents[2]


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
