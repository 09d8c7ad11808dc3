"""Quantization as the GGUF export stores it: the storage rule, the round trip against gguf-py's own
quantizers, models in memory and streamed alike, and quantized rows in `compare`."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import dequantize, quantize

from mka_core.cli.main import main
from mka_core.engine.layerpass import Stack
from mka_core.engine.quant import (
    QUANT_TYPES,
    check_quant,
    gguf_bytes,
    quantized,
    round_trip,
    storage_type,
)
from mka_core.errors import MkaInputError
from mka_core.evaluation.evaluate import perplexity
from mka_core.evaluation.results import load_results
from mka_core.models.tiny import tiny_folder
from mka_core.workflows.compare import best_rows, compare_sweep
from mka_core.workflows.pipeline import analyze


def test_storage_rule_and_round_trip_are_gguf_pys_own():
    x = torch.randn(8, 64)
    assert storage_type((64,), "Q4_0") == T.F32  # norms and biases stay exact
    assert storage_type((8, 64), "Q4_0") == T.Q4_0
    assert storage_type((8, 33), "Q8_0") == T.F16  # rows not whole blocks of 32: F16
    for q in ("Q8_0", "Q5_0", "Q4_0"):
        qt = T[q]
        want = dequantize(quantize(x.numpy(), qt), qt)
        assert np.array_equal(round_trip(x, q).numpy(), want)
    v = torch.randn(64)
    assert round_trip(v, "Q4_0") is v
    errs = [(round_trip(x, q) - x).abs().max().item() for q in ("Q8_0", "Q5_0", "Q4_0")]
    assert 0 < errs[0] < errs[1] < errs[2]  # fewer bits, larger error
    assert round_trip(x.to(torch.bfloat16), "Q8_0").dtype == torch.bfloat16


def test_bad_quant_types_are_one_line():
    assert check_quant("q8_0") == "Q8_0" and "Q4_0" in QUANT_TYPES
    with pytest.raises(MkaInputError, match="cannot write it") as e:
        check_quant("Q4_K")
    assert "\n" not in str(e.value)
    with pytest.raises(MkaInputError, match="unknown quantization type 'Q9'"):
        check_quant("Q9")


def test_quantized_model_in_memory_equals_streamed_and_leaves_the_original(tiny):
    windows = torch.randint(0, 400, (3, 48))
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    mem = quantized(tiny.model, "Q4_0")
    assert all(torch.equal(v, tiny.model.state_dict()[k]) for k, v in before.items())
    w = mem.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w, round_trip(tiny.model.model.layers[0].mlp.down_proj.weight, "Q4_0"))
    streamed = quantized(Stack.from_folder(tiny_folder("llama", 0), "cpu", torch.float32), "Q4_0")
    assert perplexity(mem, windows) == pytest.approx(perplexity(streamed, windows), rel=1e-6)
    assert perplexity(mem, windows) != perplexity(tiny.model, windows)
    n = sum(p.numel() for p in tiny.model.parameters())
    # Q4_0: 18 bytes per 32 weights, F32 for norms: a bit more than 4.5 bits per parameter
    assert 0.5625 * n < gguf_bytes(tiny.model, "Q4_0") < 0.6 * n
    n_1d = sum(p.numel() for p in tiny.model.parameters() if p.dim() == 1)
    assert gguf_bytes(tiny.model, "BF16") == 2 * n + 2 * n_1d  # 1-D tensors stay F32


def test_a_streamed_compressed_model_must_be_exported_first(tiny):
    stack = Stack.from_folder(tiny_folder("llama", 0), "cpu", torch.float32)
    with pytest.raises(MkaInputError, match="export it"):
        quantized(stack.compose([[(i, 1.0)] for i in (0, 1, 2, 3, 5)]), "Q8_0")


def test_compare_gains_quantized_rows_and_the_original_alone(tiny):
    analysis = analyze(tiny, n_samples=16, max_tokens=32, n_boot=0)
    res = compare_sweep(
        tiny, analysis, "shortgpt", "1", quants="Q8_0,q4_0", eval_budget=512, eval_window=128
    )
    rows = res.rows
    assert [(r["config"], r.get("quant")) for r in rows] == [
        ("original", None),
        ("original", "Q8_0"),
        ("original", "Q4_0"),
        ("shortgpt -1", None),
        ("shortgpt -1", "Q8_0"),
        ("shortgpt -1", "Q4_0"),
    ]
    orig, q8, q4 = rows[:3]
    assert 0 < q8["kl"] < q4["kl"] and q8["top1"] > q4["top1"]
    assert q4["gguf_bytes"] < q8["gguf_bytes"] < orig["gguf_bytes"]
    assert rows[4]["params"] == rows[3]["params"] and rows[4]["perplexity"] != rows[3]["perplexity"]
    assert best_rows(rows)[1] is rows[3]
    assert res.meta["quants"] == ["Q8_0", "Q4_0"]


def test_compare_command_refuses_a_bad_quant_before_loading(tmp_path, capsys):
    code = main(
        ["compare", "--model", "tiny:llama", "--quant", "Q4_K", "--out", str(tmp_path / "c")]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Q4_K" in err[0]
    assert not (tmp_path / "c").exists()


def test_evaluate_quant_rows_against_the_unquantized_model(tmp_path, capsys):
    out = tmp_path / "ev.json"
    args = ["evaluate", "--model", "tiny:llama", "--quant", "Q8_0,Q4_0", "--no-speed"]
    args += ["--no-generations", "--budget", "1024", "--window", "128", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    base, q8, q4 = load_results(out)
    assert (q8.meta["quant"], q4.meta["quant"]) == ("Q8_0", "Q4_0")
    assert q8.label == "tiny:llama @Q8_0" and base.kl is None
    assert 0 < q8.kl < q4.kl and q4.disk_bytes < q8.disk_bytes
    assert q8.params == base.params and q8.eval_tokens == base.eval_tokens
