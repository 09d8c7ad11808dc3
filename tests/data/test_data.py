"""The corpus split, calibration batches, user text, MMLU folders and evaluation windows."""

from pathlib import Path

import pytest
import torch

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

ROOT = Path(__file__).resolve().parents[2]


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
