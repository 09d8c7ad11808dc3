"""mergekit itself, run on the YAML we export, builds the same tensors as our own export."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mka_core.compression.merge import apply_plan
from mka_core.compression.plan import Step, make_plan
from mka_core.engine.weights import SafetensorsStore
from mka_core.workflows.export import mergekit_yaml, save_model

MERGEKIT = Path(sys.executable).with_name("mergekit-yaml")


@pytest.fixture(scope="module")
def source(tiny, tmp_path_factory):
    if not MERGEKIT.is_file():
        pytest.fail(f"mergekit is a test dependency (requirements.txt); {MERGEKIT} is missing")
    return save_model(tiny.model, tiny.tokenizer, tmp_path_factory.mktemp("m") / "src")


def _mergekit(yaml_text: str, tmp_path: Path) -> Path:
    (tmp_path / "config.yml").write_text(yaml_text)
    out = tmp_path / "mergekit-out"
    r = subprocess.run(
        [str(MERGEKIT), str(tmp_path / "config.yml"), str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    "steps",
    [
        [Step.drop((1,)), Step.drop((3, 4))],
        [Step.merge((1, 2), (0.7, 0.3)), Step.drop((4,))],
        [Step.collapse((2, 3, 4))],
    ],
    ids=["drop", "merge", "collapse"],
)
def test_mergekit_builds_our_export(tiny, source, steps, tmp_path):
    plan = make_plan(tiny, steps, {"planner": "manual"})
    theirs = SafetensorsStore(_mergekit(mergekit_yaml(plan, model_path=str(source)), tmp_path))
    ours = SafetensorsStore(save_model(apply_plan(tiny.model, plan), None, tmp_path / "ours"))
    assert set(theirs.names()) == set(ours.names())
    for name in ours.names():
        a, b = theirs.get(name), ours.get(name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # both sum in fp32 with the same weights; a layer kept whole is copied bit for bit
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    kept = [g[0][0] for g in plan.layers if len(g) == 1]
    for pos, layer in enumerate(g[0][0] if len(g) == 1 else None for g in plan.layers):
        if layer is not None:
            name = f"model.layers.{pos}.self_attn.q_proj.weight"
            assert torch.equal(theirs.get(name), ours.get(name)), name
    assert kept  # every plan here keeps some layer whole
    shutil.rmtree(tmp_path / "mergekit-out")
