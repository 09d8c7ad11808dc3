"""The command line on the tiny model: outputs, the plan → apply → evaluate path, and bad input
(non-zero exit, one line on stderr, no traceback)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mka_core.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--model", "tiny:llama", "--quiet"]
CALIB = ["--samples", "24", "--tokens", "32"]
EVAL = ["--budget", "1024", "--window", "256", "--no-speed", "--no-generations"]


def run_cli(*args, cwd=None):
    """Run as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "mka_core", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )


def assert_one_line_error(proc, fragment):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_analyze_writes_every_measure(tmp_path, capsys):
    out = tmp_path / "an"
    assert main(["analyze", *FAST, *CALIB, "--out", str(out)]) == 0
    z = np.load(out / "similarity.npz")
    for name in ("npib", "cosine", "angular", "cka"):
        assert z[name].shape == (6, 6)
    assert z["bi"].shape == (6,)
    meta = json.loads((out / "similarity.json").read_text())
    assert meta["layers"] == list(range(6)) and meta["params"]["n_samples"] == 24
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["timings"]) >= {"capture", "diffusion", "npib", "other_measures"}
    # a second run refuses to overwrite the results
    assert main(["analyze", *FAST, *CALIB, "--out", str(out)]) == 2


def test_bad_model_path_is_one_line(tmp_path):
    proc = run_cli("analyze", "--model", "/no/such/path", "--out", str(tmp_path / "x"))
    assert_one_line_error(proc, "model path not found: /no/such/path")
    assert not (tmp_path / "x").exists()


def test_empty_text_file_and_too_many_samples(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["analyze", *FAST, "--data", str(empty), "--out", str(tmp_path / "a")]) == 2
    assert "contains no text" in capsys.readouterr().err
    small = tmp_path / "small.txt"
    small.write_text("a short document.\n\nanother one.")
    assert main(["analyze", *FAST, "--data", str(small), "--out", str(tmp_path / "b")]) == 2
    assert "128 samples requested but the data yields only" in capsys.readouterr().err


def test_plan_apply_evaluate_round_trip(tmp_path):
    plan = tmp_path / "plan.json"
    proc = run_cli("plan", *FAST, *CALIB, "--layers-to-remove", "2", "--out", str(plan))
    assert proc.returncode == 0, proc.stderr
    d = json.loads(plan.read_text())
    assert d["format"] == "mka-plan" and len(d["layers"]) == 4
    out = tmp_path / "model"
    proc = run_cli("apply", str(plan), "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4
    proc = run_cli("evaluate", "--model", str(out), "--json", "--quiet", *EVAL)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["n_layers"] == 4 and np.isfinite(result["perplexity"])
    assert 0 <= result["top1"] <= 1 and result["kl"] >= 0  # compared with the original
    assert result["original"]["n_layers"] == 6

    # the same plan through the library gives the same model, weight for weight
    from mka_core.compression.merge import apply_plan
    from mka_core.compression.plan import Plan
    from mka_core.models.loading import load_model

    lib = apply_plan(load_model("tiny:llama").model, Plan.load(plan))
    for k, v in lib.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k


def test_apply_refuses_bad_plans(tmp_path):
    cases = {
        "not json {": "not valid JSON",
        '{"format": "mka-plan", "version": 9}': "version",
        '{"format": "other"}': "format",
        "[]": "expected a JSON object",
    }
    for i, (text, fragment) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.json"
        bad.write_text(text)
        proc = run_cli("apply", str(bad), "--out", str(tmp_path / f"o{i}"))
        assert_one_line_error(proc, fragment)
    proc = run_cli("apply", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, "missing.json")


def test_apply_refuses_a_plan_for_another_model(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                *FAST,
                *CALIB,
                "--planner",
                "shortgpt",
                "--layers-to-remove",
                "1",
                "--out",
                str(plan),
            ]
        )
        == 0
    )
    code = main(
        [
            "apply",
            str(plan),
            "--model",
            "tiny:llama",
            "--seed",
            "5",
            "--quiet",
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert code == 2 and "fingerprint" in capsys.readouterr().err
    assert (
        main(
            [
                "apply",
                str(plan),
                "--model",
                "tiny:llama",
                "--seed",
                "5",
                "--force",
                "--quiet",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )


def test_manual_picks_and_mergekit(tmp_path, capsys):
    plan = tmp_path / "p.json"
    assert (
        main(
            [
                "plan",
                *FAST,
                "--planner",
                "manual",
                "--picks",
                "drop:2;drop:3",
                "--alpha",
                "fixed",
                "--out",
                str(plan),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["export-mergekit", str(plan)]) == 0
    import yaml

    cfg = yaml.safe_load(capsys.readouterr().out)
    assert [s["sources"][0]["layer_range"] for s in cfg["slices"]] == [[0, 2], [4, 6]]
    assert (
        main(
            [
                "plan",
                *FAST,
                "--planner",
                "manual",
                "--picks",
                "merge:2",
                "--alpha",
                "fixed",
                "--out",
                str(tmp_path / "q.json"),
            ]
        )
        == 2
    )
    assert "at least two layers" in capsys.readouterr().err


def test_budget_larger_than_the_model(tmp_path, capsys):
    assert (
        main(["plan", *FAST, *CALIB, "--layers-to-remove", "9", "--out", str(tmp_path / "p")]) == 2
    )
    assert "removing 9 of 6 layers" in capsys.readouterr().err


def test_refuses_to_write_into_the_source_folder(tmp_path, capsys):
    plan = tmp_path / "p.json"
    assert (
        main(
            [
                "plan",
                *FAST,
                "--planner",
                "manual",
                "--picks",
                "drop:2",
                "--alpha",
                "fixed",
                "--out",
                str(plan),
            ]
        )
        == 0
    )
    model_dir = tmp_path / "m"
    assert main(["apply", str(plan), "--quiet", "--out", str(model_dir)]) == 0
    before = sorted(p.name for p in model_dir.iterdir())
    assert (
        main(
            [
                "transact",
                "--model",
                str(model_dir),
                "--quiet",
                "--mlp-keep",
                "0.5",
                *CALIB,
                "--out",
                str(model_dir),
                "--overwrite",
            ]
        )
        == 2
    )
    assert "a model was loaded from" in capsys.readouterr().err
    assert sorted(p.name for p in model_dir.iterdir()) == before


@pytest.mark.parametrize("flag", [["--samples", "0"], ["--pooling", "max"]])
def test_argument_errors_exit_non_zero(flag):
    proc = run_cli("analyze", *FAST, *flag)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_transact_then_heal_records_every_stage(tmp_path, capsys):
    pruned = tmp_path / "pruned"
    assert (
        main(
            [
                "transact",
                *FAST,
                *CALIB,
                "--mlp-keep",
                "0.5",
                "--heads-keep",
                "0.5",
                "--shots",
                "2",
                "--out",
                str(pruned),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["new_intermediate_size"] == 64 and report["new_n_heads"] == 2
    cfg = json.loads((pruned / "config.json").read_text())
    assert cfg["intermediate_size"] == 64 and cfg["num_attention_heads"] == 2
    healed = tmp_path / "healed"
    assert (
        main(
            [
                "heal",
                "--model",
                str(pruned),
                "--quiet",
                *CALIB,
                *EVAL[:4],
                "--steps",
                "3",
                "--out",
                str(healed),
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert np.isfinite(info["perplexity_before"]) and np.isfinite(info["perplexity_after"])
    record = json.loads((healed / "mka-run.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["transact", "heal"]
    assert record["source"] == "tiny:llama"
    assert main(["evaluate", "--model", str(healed), "--json", "--quiet", *EVAL]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["intermediate_size"] == 64 and result["original"]["intermediate_size"] == 128


def test_bad_keep_values(tmp_path, capsys):
    for bad in ("0", "-1", "abc", "1.5", "99999"):
        code = main(["transact", *FAST, *CALIB, "--mlp-keep", bad, "--out", str(tmp_path / bad)])
        assert code == 2, bad
        assert capsys.readouterr().err.startswith(
            "error: --mlp-keep" if bad in ("abc", "1.5") else "error: "
        )


def test_one_command_plans_merges_and_exports_a_streamed_model(tmp_path, capsys):
    """plan --apply on a model forced to stream: the folder written equals plan + apply in memory,
    and evaluate streams both models (speed and text skipped, and said so)."""
    from mka_core.compression.plan import Plan
    from mka_core.engine.weights import SafetensorsStore
    from mka_core.models.loading import load_model

    out = tmp_path / "small"
    args = ["plan", *FAST, *CALIB, "--offload", "--planner", "mka", "--layers-to-remove", "2"]
    args += ["--out", str(tmp_path / "p.json"), "--apply", str(out), "--out-dtype", "bf16"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["layers_out"] == 4
    store = SafetensorsStore(out)
    assert {store.info(n).dtype for n in store.names()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    plan = Plan.load(tmp_path / "p.json")
    mem = load_model("tiny:llama", dtype="fp32")
    from mka_core.compression.merge import apply_plan
    from mka_core.workflows.export import save_model

    ref = SafetensorsStore(
        save_model(apply_plan(mem.model, plan), None, tmp_path / "ref", out_dtype="bf16")
    )
    for name in ref.names():
        torch.testing.assert_close(
            store.get(name).float(), ref.get(name).float(), rtol=1e-2, atol=1e-3
        )

    assert main(["evaluate", "--model", str(out), "--offload", "--quiet", "--json", *EVAL[:4]]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["meta"]["streamed"] and res["original"]["meta"]["streamed"]
    assert "streamed" in res["meta"]["skipped"]["speed"] and res["decode_tps"] is None
    assert res["n_layers"] == 4 and res["original"]["n_layers"] == 6


def test_a_budget_beyond_a_streamed_model_is_one_line(tmp_path):
    proc = run_cli("plan", *FAST, "--offload", "--planner", "shortgpt", "--layers-to-remove", "9")
    assert_one_line_error(proc, "budget")


def test_heal_refuses_a_streamed_model(tmp_path):
    proc = run_cli("heal", *FAST, "--offload", "--steps", "1", "--out", str(tmp_path / "h"))
    assert_one_line_error(proc, "cannot be healed here")
    assert not (tmp_path / "h").exists()


def test_analyze_writes_stability_and_importance(tmp_path, capsys):
    out = tmp_path / "an"
    args = ["analyze", *FAST, "--samples", "48", "--tokens", "32", "--n-boot", "3"]
    assert main([*args, "--importance", "--importance-samples", "8", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"stability.json", "stability.npz", "importance.json"} <= {p.name for p in out.iterdir()}
    st = summary["stability"]
    assert set(st) == {"npib", "cosine", "angular", "cka", "bi"} and "reading" in st["npib"]
    assert summary["stability_bootstrap_replicates"] == 3
    assert len(summary["importance"]["drop"]) == 6
    assert set(summary["importance"]["proxy_vs_truth_spearman"]) >= {"bi", "npib", "cka"}


def test_compare_command_writes_the_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", *FAST, "--samples", "48", "--tokens", "32", *EVAL[:4]]
    args += ["--planners", "shortgpt,sleb", "--budgets", "1,2", "--transact", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "shortgpt -1" in text and "transact -2" in text
    rows = (out / "compare.csv").read_text().splitlines()
    assert (
        rows[0].startswith("config,planner,option,merge_mode,compensation,layers_removed")
        and len(rows) == 1 + 7
    )


def test_compare_bad_planner_and_dead_ray_address_are_one_line(tmp_path):
    proc = run_cli("compare", *FAST, "--planners", "mka,bogus", "--out", str(tmp_path / "c"))
    assert_one_line_error(proc, "unknown planner 'bogus'")
    proc = run_cli(
        "compare", *FAST, "--samples", "48", "--tokens", "32", "--planners", "shortgpt",
        "--budgets", "1", "--executor", "ray", "--address", "127.0.0.1:1",
        "--out", str(tmp_path / "c"),
    )  # fmt: skip
    assert_one_line_error(proc, "does not answer")
    assert not (tmp_path / "c").exists()
