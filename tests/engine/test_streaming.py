"""The streamed path (weights on disk, one block at a time) gives the numbers of the in-memory
path: activations, similarity, plans applied, TransAct, evaluation; for Llama, Qwen2 with sliding
layers and Gemma 3 with sliding and full layers. And bad folders are refused in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mka_core.compression.merge import apply_plan
from mka_core.compression.plan import Step, make_plan
from mka_core.compression.transact import prune
from mka_core.engine.layerpass import Stack
from mka_core.engine.weights import SafetensorsStore
from mka_core.errors import MkaInputError
from mka_core.evaluation.evaluate import compare
from mka_core.models.loading import load_model
from mka_core.models.tiny import tiny_config, tiny_tokenizer
from mka_core.workflows.export import save_model
from mka_core.workflows.pipeline import analyze, eval_windows

ROOT = Path(__file__).resolve().parents[2]


def _config(arch: str):
    from transformers import AutoConfig

    if arch == "gemma3":
        cfg = AutoConfig.for_model(
            "gemma3_text",
            vocab_size=len(tiny_tokenizer()),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"] * 3,
            final_logit_softcapping=30.0,
            max_position_embeddings=1024,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        cfg.architectures = ["Gemma3ForCausalLM"]
        return cfg
    cfg = tiny_config(arch, vocab_size=len(tiny_tokenizer()))
    if arch == "qwen2":
        cfg.use_sliding_window, cfg.sliding_window = True, 8
        cfg.layer_types = ["full_attention", "sliding_attention"] * 3
    return cfg


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def folder_of(request, tmp_path_factory):
    """A random fp32 model folder of each family."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(_config(request.param)).eval()
    folder = tmp_path_factory.mktemp(request.param) / "model"
    return save_model(model, tiny_tokenizer(), folder)


@pytest.fixture(scope="module")
def pair(folder_of):
    """(in memory, streamed) loads of one folder, computing in its own dtype (fp32): the two paths
    must then agree bit for bit."""
    resident = load_model(str(folder_of), offload=False, dtype="fp32")
    streamed = load_model(str(folder_of), offload=True, dtype="fp32")
    assert not resident.streamed and streamed.streamed
    assert isinstance(streamed.model, Stack) and streamed.fingerprint == resident.fingerprint
    return resident, streamed


def test_bf16_compute_is_the_same_streamed_up_to_rounding(folder_of):
    """In bf16 the model in memory holds rounded weights, while a streamed merge sums the stored
    fp32 ones: unchanged blocks agree exactly, merged ones to bf16 rounding."""
    resident = load_model(str(folder_of), offload=False, dtype="bf16")
    streamed = load_model(str(folder_of), offload=True, dtype="bf16")
    a = analyze(resident, n_samples=16, max_tokens=32)
    b = analyze(streamed, n_samples=16, max_tokens=32)
    np.testing.assert_array_equal(a.activations.states, b.activations.states)
    plan = make_plan(resident, [Step.merge((2, 3), (0.5, 0.5))], {})
    windows = eval_windows(resident, budget_tokens=256, window=64)
    kw = dict(with_speed=False, with_generations=False)
    _, ra = compare(resident, apply_plan(resident.model, plan), windows, **kw)
    _, sa = compare(streamed, apply_plan(streamed.model, plan), windows, **kw)
    assert ra.perplexity == pytest.approx(sa.perplexity, rel=1e-3)


def test_analysis_is_the_same_streamed(pair):
    resident, streamed = pair
    a = analyze(resident, n_samples=24, max_tokens=32)
    b = analyze(streamed, n_samples=24, max_tokens=32)
    np.testing.assert_array_equal(a.activations.states, b.activations.states)
    for name, m in a.similarity.matrices.items():
        np.testing.assert_allclose(m, b.similarity.matrices[name], rtol=0, atol=1e-12, err_msg=name)
    np.testing.assert_array_equal(a.similarity.bi, b.similarity.bi)


def test_applied_plan_and_export_are_the_same_streamed(pair, tmp_path):
    resident, streamed = pair
    plan = make_plan(resident, [Step.merge((1, 2), (0.6, 0.4)), Step.drop((4,))], {})
    a = save_model(apply_plan(resident.model, plan), None, tmp_path / "a")
    b = save_model(apply_plan(streamed.model, plan), None, tmp_path / "b")
    sa, sb = SafetensorsStore(a), SafetensorsStore(b)
    assert sa.names() == sb.names()
    for name in sa.names():
        assert torch.equal(sa.get(name), sb.get(name)), name  # bit for bit, merged ones too
    kept = "model.layers.3.self_attn.q_proj.weight"  # output 3 is original layer 5, kept whole
    assert torch.equal(
        sb.get(kept), SafetensorsStore(streamed.folder).get(kept.replace(".3.", ".5."))
    )
    ca, cb = (
        json.loads((a / "config.json").read_text()),
        json.loads((b / "config.json").read_text()),
    )
    assert ca == cb and ca["num_hidden_layers"] == 4
    if "layer_types" in ca:
        assert len(ca["layer_types"]) == 4


def test_evaluation_is_the_same_streamed(pair):
    resident, streamed = pair
    plan = make_plan(resident, [Step.merge((2, 3), (0.5, 0.5))], {})
    windows = eval_windows(resident, budget_tokens=256, window=64)
    kw = dict(with_speed=False, with_generations=False)
    ra, rb = compare(resident, apply_plan(resident.model, plan), windows, **kw)
    sa, sb = compare(streamed, apply_plan(streamed.model, plan), windows, **kw)
    assert ra.perplexity == pytest.approx(sa.perplexity, rel=1e-6)
    assert rb.perplexity == pytest.approx(sb.perplexity, rel=1e-6)
    assert rb.kl == pytest.approx(sb.kl, rel=1e-5, abs=1e-9) and rb.top1 == sb.top1
    assert rb.params == sb.params and rb.n_layers == sb.n_layers == 5


def test_streamed_evaluation_skips_speed_and_text_and_says_so(pair):
    _, streamed = pair
    windows = eval_windows(streamed, budget_tokens=128, window=64)
    _, res = compare(streamed, streamed.model, windows)
    assert res.decode_tps is None and res.generations == ()
    assert "streamed" in res.meta["skipped"]["speed"] and res.meta["streamed"] is True


def test_transact_is_the_same_streamed(pair, tmp_path):
    resident, streamed = pair
    batch = analyze(resident, n_samples=16, max_tokens=32).batch
    a, rep_a = prune(resident.model, batch, mlp_keep=0.5, heads_keep=0.5, shots=2)
    b, rep_b = prune(streamed.model, batch, mlp_keep=0.5, heads_keep=0.5, shots=2)
    assert rep_a.mlp_kept == rep_b.mlp_kept and rep_a.heads_kept == rep_b.heads_kept
    assert rep_a.params_after == rep_b.params_after
    sa = SafetensorsStore(save_model(a, None, tmp_path / "a"))
    sb = SafetensorsStore(save_model(b, streamed.tokenizer, tmp_path / "b"))
    for name in sa.names():
        assert torch.equal(sa.get(name), sb.get(name)), name
    back = load_model(str(tmp_path / "b"), offload=False)  # a standard config: plain loading works
    assert back.model.config.intermediate_size == rep_b.new_intermediate_size


def test_export_dtype_is_selectable_and_defaults_to_the_source(pair, tmp_path):
    _, streamed = pair
    assert streamed.source_dtype == torch.float32
    out = save_model(streamed.model, None, tmp_path / "bf16", out_dtype="bf16")
    store = SafetensorsStore(out)
    assert {store.info(n).dtype for n in store.names()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    default = SafetensorsStore(save_model(streamed.model, None, tmp_path / "same"))
    assert {default.info(n).dtype for n in default.names()} == {torch.float32}


# ---------------------------------------------------------------------------------------------
# bad folders


@pytest.fixture()
def folder(tmp_path):
    loaded = load_model("tiny:llama")
    return save_model(loaded.model, loaded.tokenizer, tmp_path / "m")


def _shard(folder: Path) -> Path:
    return next(folder.glob("model-*.safetensors"))


def test_missing_shard_is_one_line(folder):
    _shard(folder).unlink()
    with pytest.raises(MkaInputError, match="index names 1 shard.*missing"):
        load_model(str(folder))


def test_truncated_shard_is_one_line(folder):
    shard = _shard(folder)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(MkaInputError, match="truncated"):
        load_model(str(folder), offload=True)


def test_index_naming_absent_tensors_is_one_line(folder):
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.layers.9.mlp.up_proj.weight"] = _shard(folder).name
    index.write_text(json.dumps(doc))
    with pytest.raises(MkaInputError, match="index names 1 tensor"):
        load_model(str(folder))


def test_folder_without_tokenizer_is_one_line(folder):
    for f in folder.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(MkaInputError, match="no usable tokenizer"):
        load_model(str(folder))


def test_garbage_gguf_is_one_line(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(MkaInputError, match="not a GGUF file"):
        load_model(str(bad))


def test_not_enough_disk_space_is_refused_before_writing(folder, tmp_path, monkeypatch):
    import shutil

    loaded = load_model(str(folder), offload=True)
    real = shutil.disk_usage

    def tiny_disk(path):
        u = real(path)
        return type(u)(u.total, u.used, 1024)

    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    with pytest.raises(MkaInputError, match="not enough disk space"):
        save_model(loaded.model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_one_block_too_big_is_refused(monkeypatch, folder):
    from mka_core.models import loading as models

    monkeypatch.setattr(models, "available_memory", lambda device: 1000)
    with pytest.raises(MkaInputError, match="even one block"):
        load_model(str(folder))


# ---------------------------------------------------------------------------------------------
# memory, measured


def test_streamed_analysis_peak_memory_stays_below_the_model_in_fp32(tmp_path):
    """A 258 M-parameter model (1.03 GB in fp32, 0.52 GB of bf16 on disk), analysed streamed in a
    child process: its peak resident memory stays below the fp32 size (measured: about 0.6 GB,
    most of it Python, torch and transformers themselves)."""
    from mka_core.models.synthetic import llama_config, write_random_model

    cfg = llama_config(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )
    folder = write_random_model(cfg, tmp_path / "big", tokenizer=tiny_tokenizer())
    fp32_bytes = 4 * sum(
        SafetensorsStore(folder).info(n).numel for n in SafetensorsStore(folder).names()
    )
    assert fp32_bytes > 1.0e9
    # the child reads its own high-water mark (VmHWM): getrusage's ru_maxrss would also count
    # the memory of this pytest process, which Linux carries over into a forked child
    code = (
        "import sys; from mka_core.cli.main import main; rc = main(sys.argv[1:]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]; "
        "print('PEAK', int(hwm.split()[1]) * 1024); sys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "analyze", "--model", str(folder), "--offload"]
        + ["--samples", "16", "--tokens", "32", "--out", str(tmp_path / "a"), "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    peak = int(out.stdout.split("PEAK")[-1])
    assert peak < fp32_bytes, f"peak {peak / 1e9:.2f} GB vs fp32 {fp32_bytes / 1e9:.2f} GB"
    assert (tmp_path / "a" / "similarity.json").is_file()
