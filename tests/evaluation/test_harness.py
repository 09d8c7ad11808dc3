"""lm-evaluation-harness scores (harness.run_tasks): the same numbers as lm_eval's own command
line, the same prompts and accuracy as the product's MMLU scorer, one-line errors, and the
evaluate command storing them in its results. The tasks are written here: multiple-choice YAMLs
reading a local JSONL (no hub, no network)."""

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mka_core.cli.main import main
from mka_core.data.corpus import mmlu_prompts
from mka_core.errors import MkaInputError
from mka_core.evaluation.harness import check_tasks, run_tasks
from mka_core.evaluation.mmlu import mmlu_accuracy
from mka_core.evaluation.results import EvalResult, load_results

ROOT = Path(__file__).resolve().parents[2]
SUBJECT = "general_knowledge"
LETTERS = "ABCD"
QUESTIONS = [  # (question, choices, index of the answer): the answers cycle through A-D
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("Which animal says 'meow'?", ["Dog", "Cat", "Cow", "Duck"], 1),
    ("What color is the sky on a clear day?", ["Green", "Red", "Blue", "Yellow"], 2),
    ("How many legs does a spider have?", ["Four", "Six", "Ten", "Eight"], 3),
    ("What is 2 + 2?", ["4", "3", "5", "22"], 0),
    ("Which planet do we live on?", ["Mars", "Earth", "Venus", "Jupiter"], 1),
    ("What do bees make?", ["Milk", "Silk", "Honey", "Wool"], 2),
    ("What is frozen water called?", ["Steam", "Sand", "Glass", "Ice"], 3),
    ("Which is the largest ocean on Earth?", ["Pacific", "Atlantic", "Indian", "Arctic"], 0),
    ("What gas do plants take from the air?", ["Oxygen", "Carbon dioxide", "Helium", "Neon"], 1),
    ("How many days are in a week?", ["Five", "Six", "Seven", "Ten"], 2),
    ("Which language is spoken in Brazil?", ["Spanish", "French", "English", "Portuguese"], 3),
    ("Who wrote 'Romeo and Juliet'?", ["Shakespeare", "Dickens", "Twain", "Austen"], 0),
    ("At what Celsius temperature does water boil?", ["50", "100", "0", "212"], 1),
    ("Which organ pumps blood through the body?", ["Lung", "Liver", "Heart", "Brain"], 2),
    ("What is the opposite of hot?", ["Warm", "Big", "Loud", "Cold"], 3),
]
DEV = [  # solved examples for the 5-shot prompts (MMLU's dev split)
    ("What is 1 + 1?", ["3", "2", "7", "11"], 1),
    ("Which color is grass?", ["Green", "Purple", "Black", "White"], 0),
    ("How many hours are in a day?", ["12", "60", "100", "24"], 3),
    ("What do cows drink?", ["Oil", "Juice", "Water", "Milk"], 2),
    ("Which of these is a fruit?", ["Car", "Apple", "Rock", "Chair"], 1),
]
# the product's MMLU prompt (data/corpus.py: mmlu_prompt), as an lm-eval template
MMLU_TEXT = (
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
    "D. {{choices[3]}}\nAnswer:"
)
HEADER = f"The following are multiple choice questions (with answers) about {SUBJECT.replace('_', ' ')}.\n\n"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _jsonl(path: Path, rows) -> Path:
    path.write_text(
        "".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in rows)
    )
    return path


def write_tasks(folder: Path) -> Path:
    """Three tasks on the same questions: MMLU's prompt 0-shot (mka_mc) and 5-shot (mka_mc5),
    and a cloze task whose choices are the answers' texts (mka_cloze: several tokens each, so
    acc_norm differs from acc). And the same questions as an MMLU folder (mmlu/test, mmlu/dev)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "test": str(_jsonl(folder / "test.jsonl", QUESTIONS)),
        "dev": str(_jsonl(folder / "dev.jsonl", DEV)),
    }
    mc = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},  # dev in order, as the MMLU scorer takes them
        "output_type": "multiple_choice",
        "description": HEADER,
        "doc_to_text": MMLU_TEXT,
        "doc_to_choice": list(LETTERS),  # after "Answer:" with lm-eval's " ": " A" ... " D"
        "doc_to_target": "answer",
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True}
            for m in ("acc", "acc_norm")
        ],
        "metadata": {"version": 1.0},
    }
    tasks = {
        "mka_mc": {**mc, "num_fewshot": 0},
        "mka_mc5": {**mc, "num_fewshot": 5},
        "mka_cloze": {
            **mc,
            "description": "",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "{{choices}}",
            "num_fewshot": 0,
        },
    }
    for name, cfg in tasks.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **cfg}, sort_keys=False))
    group = {  # a group of two: its accuracy is the mean over both tasks' 32 examples
        "group": "mka_group",
        "task": ["mka_mc", "mka_cloze"],
        "aggregate_metric_list": [
            {"metric": m, "aggregation": "mean", "weight_by_size": True}
            for m in ("acc", "acc_norm")
        ],
        "metadata": {"version": 1.0},
    }
    (folder / "mka_group.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    for split, rows in (("test", QUESTIONS), ("dev", DEV)):
        (folder / "mmlu" / split).mkdir(parents=True, exist_ok=True)
        with open(folder / "mmlu" / split / f"{SUBJECT}_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([q, *c, LETTERS[a]] for q, c, a in rows)
    return folder


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """The datasets library's converted copies of the JSONL go to this test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def one_line(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# A: lm_eval's own command line on the exported model gives what run_tasks gives in memory


def test_lm_eval_command_line_reports_what_run_tasks_reports(
    tiny, tasks_dir, tmp_path, monkeypatch
):
    export = tmp_path / "model"
    tiny.model.save_pretrained(export)
    tiny.tokenizer.save_pretrained(export)
    names = "mka_group,mka_mc5"  # the group runs mka_mc and mka_cloze
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf"]
    cmd += ["--model_args", f"pretrained={export},dtype=float32", "--include_path", str(tasks_dir)]
    cmd += ["--tasks", names, "--output_path", str(tmp_path / "out"), "--device", "cpu"]
    cmd += ["--batch_size", "4"]
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "cli-cache")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = (tmp_path / "out").rglob("results_*.json")
    cli = json.loads(found.read_text())

    weights = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    rng = (torch.get_rng_state(), random.getstate())
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    ours = run_tasks(tiny.model, tiny.tokenizer, names, tasks_dir=tasks_dir, batch_size=4)

    assert (
        set(ours["tasks"]) == set(cli["results"]) == {"mka_group", "mka_mc", "mka_cloze", "mka_mc5"}
    )
    for task, got in ours["tasks"].items():
        for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert got["metrics"][metric] == cli["results"][task][f"{metric},none"], (task, metric)
        if task != "mka_group":
            assert got["n"] == cli["n-samples"][task]["effective"] == len(QUESTIONS)
    group = ours["tasks"]["mka_group"]
    assert group["n"] == 2 * len(QUESTIONS) and group["subtasks"] == ["mka_mc", "mka_cloze"]
    mc, cloze = ours["tasks"]["mka_mc"]["metrics"], ours["tasks"]["mka_cloze"]["metrics"]
    assert group["metrics"]["acc"] == pytest.approx((mc["acc"] + cloze["acc"]) / 2)
    # the cloze task's answers differ in length: acc_norm is a second, different number
    assert cloze["acc"] != cloze["acc_norm"]
    assert ours["lm_eval_version"] == cli["lm_eval_version"] and ours["limit"] is None
    assert ours["tasks_dir"] == str(tasks_dir.resolve())
    json.dumps(ours)  # goes into a run record as is
    # the caller's model and random generators are left as they were
    assert all(torch.equal(v, weights[k]) for k, v in tiny.model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert not tiny.model.training and "tie_weights" not in vars(tiny.model)
    assert not list((tmp_path / "cwd").iterdir())  # nothing written in the current folder


# ---------------------------------------------------------------------------------------------
# B: the product's MMLU scorer and lm-eval on the same questions


def lm_eval_requests(tasks_dir: Path, name: str, num_fewshot: int):
    """(context, continuation) of every request lm-eval builds for the task, in document order."""
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(tasks_dir), include_defaults=False).load([name])["tasks"][
        name
    ]
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=None)
    assert task.config.num_fewshot == num_fewshot
    by_doc: dict[int, list] = {}
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        by_doc.setdefault(inst.doc_id, []).append(inst.arguments)
    return [by_doc[d] for d in sorted(by_doc)]


@pytest.mark.parametrize(("name", "k"), [("mka_mc", 0), ("mka_mc5", 5)])
def test_lm_eval_prompts_are_the_mmlu_scorers_prompts(tasks_dir, name, k):
    prompts = [p for p, _ in mmlu_prompts(tasks_dir / "mmlu", k_shot=k)]
    requests = lm_eval_requests(tasks_dir, name, k)
    assert len(requests) == len(prompts) == len(QUESTIONS)
    for prompt, choices in zip(prompts, requests, strict=True):
        assert [c for c, _ in choices] == [prompt] * 4
        assert [a for _, a in choices] == [" A", " B", " C", " D"]
    assert prompts[0].startswith(HEADER + ("What is 1 + 1?" if k else "What is the capital"))


def test_mmlu_scorer_agrees_with_lm_eval_when_letters_are_two_tokens(tiny, tasks_dir):
    """The tiny tokenizer splits " B" and " D" into a space and the letter: the scorer then sums
    each letter's tokens' log-probabilities, as lm-eval does, and reports its accuracy."""
    tok = tiny.tokenizer
    assert max(len(tok(" " + x, add_special_tokens=False)["input_ids"]) for x in LETTERS) == 2
    ours = run_tasks(tiny.model, tok, "mka_mc,mka_mc5", tasks_dir=tasks_dir)
    for name, k in (("mka_mc", 0), ("mka_mc5", 5)):
        product = mmlu_accuracy(tiny.model, tok, tasks_dir / "mmlu", k_shot=k, batch_size=3)
        assert product["accuracy"] == ours["tasks"][name]["metrics"]["acc"], name


@pytest.mark.integration
def test_mmlu_scorer_agrees_with_lm_eval_on_the_bundled_model(bundled, tasks_dir):
    """On SmolLM2's tokenizer " A" … " D" are one token each, so the MMLU scorer's argmax over the
    four letters' logits is lm-eval's argmax over their log-likelihoods: the same accuracy."""
    tok = bundled.tokenizer
    assert all(len(tok(" " + x, add_special_tokens=False)["input_ids"]) == 1 for x in LETTERS)
    ours = run_tasks(bundled.model, tok, "mka_mc,mka_mc5,mka_cloze", tasks_dir=tasks_dir)
    for name, k in (("mka_mc", 0), ("mka_mc5", 5)):
        product = mmlu_accuracy(bundled.model, tok, tasks_dir / "mmlu", k_shot=k)
        assert product["n"] == ours["tasks"][name]["n"] == len(QUESTIONS)
        assert product["accuracy"] == ours["tasks"][name]["metrics"]["acc"], name
    # a real model knows these answers when it is asked for the answer's text
    assert ours["tasks"]["mka_cloze"]["metrics"]["acc"] >= 0.75


# ---------------------------------------------------------------------------------------------
# C: bad input, one line each


def test_task_lm_eval_does_not_know(tiny, tasks_dir):
    with pytest.raises(MkaInputError) as e:
        run_tasks(tiny.model, tiny.tokenizer, "mka_mcq", tasks_dir=tasks_dir)
    one_line(e, "unknown lm-eval task 'mka_mcq'", "built-in tasks", str(tasks_dir), "mka_mc")
    assert "--tasks-dir" in str(e.value) and "did you mean" in str(e.value)
    with pytest.raises(MkaInputError) as e:  # checked before any model is loaded
        check_tasks("mka_mc,no_such_task_anywhere", tasks_dir)
    one_line(e, "unknown lm-eval task 'no_such_task_anywhere'", "--tasks-dir")


def test_hub_task_offline(tiny, tasks_dir, monkeypatch):
    """hellaswag reads its dataset from the hub: offline (as this machine is), one line."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(MkaInputError) as e:
        run_tasks(tiny.model, tiny.tokenizer, ["hellaswag"], tasks_dir=tasks_dir)
    one_line(
        e,
        "task hellaswag needs its dataset from the Hugging Face hub and this machine is offline",
        "put a task YAML reading local JSONL files in a folder and pass --tasks-dir",
    )


def test_bad_arguments(tiny, tasks_dir, tmp_path):
    for empty in ("", " , ", []):
        with pytest.raises(MkaInputError) as e:
            run_tasks(tiny.model, tiny.tokenizer, empty, tasks_dir=tasks_dir)
        one_line(e, "no lm-eval tasks given")
    with pytest.raises(MkaInputError) as e:
        run_tasks(tiny.model, tiny.tokenizer, "mka_mc", tasks_dir=tmp_path / "nowhere")
    one_line(e, f"tasks folder not found: {tmp_path / 'nowhere'}")
    for limit in (0, -3, 2.5, True):
        with pytest.raises(MkaInputError) as e:
            run_tasks(tiny.model, tiny.tokenizer, "mka_mc", tasks_dir=tasks_dir, limit=limit)
        one_line(e, "limit must be an integer >= 1")
    with pytest.raises(MkaInputError) as e:
        check_tasks(None, tasks_dir)
    one_line(e, "without any lm-eval tasks")
    # a task whose data file is gone
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = yaml.safe_load((tasks_dir / "mka_mc.yaml").read_text())
    cfg["task"] = "mka_gone"
    cfg["dataset_kwargs"]["data_files"] = {"test": str(tmp_path / "gone.jsonl")}
    (broken / "gone.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(MkaInputError) as e:
        run_tasks(tiny.model, tiny.tokenizer, "mka_gone", tasks_dir=broken)
    one_line(e, "task mka_gone could not read its data", "gone.jsonl")


def test_streamed_model_is_refused(tasks_dir):
    from mka_core.models.loading import load_model

    streamed = load_model("tiny:llama", device="cpu", dtype="fp32", offload=True)
    assert streamed.streamed
    with pytest.raises(MkaInputError) as e:
        run_tasks(streamed.model, streamed.tokenizer, "mka_mc", tasks_dir=tasks_dir)
    one_line(e, "need the model in memory", "streamed from disk", "--no-offload")


def test_lm_eval_not_installed(tiny, tasks_dir, monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import lm_eval` now fails
    for call in (
        lambda: run_tasks(tiny.model, tiny.tokenizer, "mka_mc", tasks_dir=tasks_dir),
        lambda: check_tasks("mka_mc", tasks_dir),
    ):
        with pytest.raises(MkaInputError) as e:
            call()
        one_line(e, "lm_eval package, which is not installed", "pip install lm-eval")


# ---------------------------------------------------------------------------------------------
# D: evaluate --tasks on the original and the compressed model


def test_evaluate_command_scores_both_models(tiny, tasks_dir, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "--model",
                "tiny:llama",
                "--quiet",
                "--picks",
                "drop:2;drop:3",
                "--out",
                str(plan),
            ]
        )
        == 0
    )
    capsys.readouterr()
    out = tmp_path / "results.json"
    args = ["evaluate", "--model", "tiny:llama", "--dtype", "fp32", "--device", "cpu", "--quiet"]
    args += ["--plan", str(plan), "--budget", "1024", "--window", "256", "--no-speed"]
    args += ["--no-generations", "--tasks", "mka_mc", "--tasks-dir", str(tasks_dir)]
    args += ["--limit", "8", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out

    original, compressed = load_results(out)
    assert (original.n_layers, compressed.n_layers) == (6, 4)
    from mka_core.compression.merge import apply_plan
    from mka_core.compression.plan import Plan

    small = apply_plan(tiny.model, Plan.load(plan))
    for result, model in ((original, tiny.model), (compressed, small)):
        direct = run_tasks(model, tiny.tokenizer, "mka_mc", tasks_dir=tasks_dir, limit=8)
        assert result.tasks == direct  # the model's own scores, stored whole
        task = result.tasks["tasks"]["mka_mc"]
        assert task["n"] == 8 and task["n_total"] == len(QUESTIONS) and result.tasks["limit"] == 8
        acc = task["metrics"]["acc"]
        assert f"{result.label}: mka_mc: acc {acc:.4f} ± " in printed, printed
        assert EvalResult.from_dict(result.to_dict()) == result
    with pytest.raises(MkaInputError, match="'tasks' must be an object"):
        EvalResult.from_dict({**original.to_dict(), "tasks": [1]})


def test_evaluate_command_bad_task_is_one_line_before_loading(tasks_dir, capsys):
    args = ["evaluate", "--model", "/no/such/model", "--quiet", "--tasks", "", "--tasks-dir"]
    assert main([*args, str(tasks_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: no lm-eval tasks given; name at least one, e.g. --tasks arc_easy"
    assert main(["evaluate", "--model", "/no/such/model", "--quiet", "--limit", "3"]) == 2
    assert "without any lm-eval tasks" in capsys.readouterr().err
    # a streamed model is refused before its perplexity is measured
    args = ["evaluate", "--model", "tiny:llama", "--offload", "--quiet", "--no-reference"]
    assert main([*args, "--tasks", "mka_mc", "--tasks-dir", str(tasks_dir)]) == 2
    assert "streamed from disk" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# E: lm-eval scores in compare's table and in the app's runs


def test_compare_and_runs_carry_lm_eval_scores(tiny, tasks_dir):
    from mka_core.workflows.compare import compare_sweep
    from mka_core.workflows.pipeline import EvalSettings, analyze, make_budget_plan, run_plan

    analysis = analyze(tiny, n_samples=16, max_tokens=32, n_boot=0)
    res = compare_sweep(
        tiny,
        analysis,
        "shortgpt",
        "1",
        quants="Q8_0",
        tasks="mka_mc",
        tasks_dir=tasks_dir,
        task_limit=8,
        eval_budget=512,
        eval_window=128,
    )
    key = "lm-eval mka_mc acc"
    orig, orig_q8, row, row_q8 = res.rows
    assert (
        orig[key]
        == run_tasks(tiny.model, tiny.tokenizer, "mka_mc", tasks_dir, 8)["tasks"]["mka_mc"][
            "metrics"
        ]["acc"]
    )
    assert key in row and key not in orig_q8 and key not in row_q8  # quantized rows: not scored
    assert key in res.csv().splitlines()[0]

    settings = EvalSettings(
        budget_tokens=512,
        window=128,
        with_speed=False,
        with_generations=False,
        tasks=("mka_mc",),
        tasks_dir=tasks_dir,
        task_limit=8,
    )
    plan = make_budget_plan(tiny, analysis, "shortgpt", n_remove=1)
    first = run_plan(tiny, plan, settings=settings)
    assert first.original.tasks["tasks"]["mka_mc"]["metrics"]["acc"] == orig[key]
    assert first.compressed.tasks["tasks"]["mka_mc"]["metrics"]["acc"] == row[key]
    again = run_plan(tiny, plan, settings=settings, original=first.original)
    assert again.original is first.original  # the original's scores are reused, not re-run
