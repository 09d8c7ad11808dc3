"""Text data: the built-in corpus and its disjoint split, user text files, MMLU-format folders,
and turning documents into calibration batches and evaluation windows."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

import torch

from mka_core.errors import MkaInputError

log = logging.getLogger(__name__)

BUILTIN = "builtin"
CHOICES = ("A", "B", "C", "D")


@dataclass(frozen=True)
class Document:
    text: str
    label: str  # where it came from: a pydoc topic, a file name, an MMLU subject


@dataclass(frozen=True)
class MmluItem:
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # one of A B C D


@dataclass
class CalibrationBatch:
    """N tokenised samples, right-padded: the input of `capture_activations`."""

    input_ids: torch.Tensor  # (n_samples, max_len) long
    attention_mask: torch.Tensor  # (n_samples, max_len) long, 1 on real tokens
    doc_index: list[int]  # which document each sample came from
    labels: list[str]  # that document's label (for colouring plots)

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def subset(self, n: int, between: bool = False) -> CalibrationBatch:
        """`n` samples, evenly spaced over the batch (the same text, fewer samples); `between`:
        the samples halfway between those (other samples when the batch has 2n or more)."""
        n = min(n, self.n_samples)
        half = 1 if between else 0
        idx = [((2 * i + half) * self.n_samples) // (2 * n) for i in range(n)]
        return CalibrationBatch(
            self.input_ids[idx],
            self.attention_mask[idx],
            [self.doc_index[i] for i in idx],
            [self.labels[i] for i in idx],
        )


# ---------------------------------------------------------------------------------------------
# sources of documents


def builtin_corpus() -> tuple[list[Document], list[Document]]:
    """pydoc's topic help, split by sorted key: even positions calibrate, odd ones evaluate."""

    docs = [Document(topics[k].strip(), k) for k in sorted(topics) if topics[k].strip()]
    return docs[0::2], docs[1::2]


def load_text_file(path: str | Path) -> list[Document]:
    """A .txt (documents separated by blank lines) or .jsonl (one object with "text" per line)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MkaInputError(f"text file not found: {p}")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MkaInputError(f"{p} is not UTF-8 text") from None
    return parse_text(raw, p.name, kind="jsonl" if p.suffix == ".jsonl" else "txt")


def parse_text(raw: str, name: str, kind: str = "txt") -> list[Document]:
    """Documents from the contents of a .txt or .jsonl file (also used for app uploads)."""
    docs: list[Document] = []
    if kind == "jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MkaInputError(f"{name} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise MkaInputError(
                    f"{name} line {n}: expected an object with a string 'text' field"
                )
            if obj["text"].strip():
                docs.append(Document(obj["text"].strip(), f"{name}:{n}"))
    elif kind == "txt":
        blocks = [b.strip() for b in raw.replace("\r\n", "\n").split("\n\n")]
        docs = [Document(b, f"{name}:{i}") for i, b in enumerate(blocks) if b]
    else:
        raise MkaInputError(f"unknown text kind {kind!r}; expected txt or jsonl")
    if not docs:
        raise MkaInputError(f"{name} contains no text")
    return docs


def _read_mmlu_csv(path: Path) -> list[MmluItem]:
    subject = path.stem.rsplit("_", 1)[0] if "_" in path.stem else path.stem
    items = []
    with path.open(newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) != 6:
                raise MkaInputError(
                    f"{path.name} row {n}: expected 6 columns (question, A, B, C, D, answer), "
                    f"got {len(row)}"
                )
            answer = row[5].strip().upper()
            if answer not in CHOICES:
                raise MkaInputError(f"{path.name} row {n}: answer {row[5]!r} is not A, B, C or D")
            items.append(
                MmluItem(subject, row[0].strip(), tuple(c.strip() for c in row[1:5]), answer)
            )
    return items


def load_mmlu(folder: str | Path, split: str = "test") -> list[MmluItem]:
    """All items of one split (`dev` or `test`) of an MMLU-layout folder, subjects sorted."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise MkaInputError(f"MMLU folder not found: {root}")
    sub = root / split
    if not sub.is_dir():
        raise MkaInputError(f"MMLU folder {root} has no {split}/ sub-folder")
    files = sorted(sub.glob("*.csv"))
    if not files:
        raise MkaInputError(f"{sub} contains no .csv files")
    items = [it for f in files for it in _read_mmlu_csv(f)]
    if not items:
        raise MkaInputError(f"{sub} contains no questions")
    return items


def is_mmlu_folder(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / "test").is_dir()


def format_question(item: MmluItem, with_answer: bool = False) -> str:
    lines = [item.question] + [f"{c}. {o}" for c, o in zip(CHOICES, item.options, strict=True)]
    lines.append(f"Answer: {item.answer}" if with_answer else "Answer:")
    return "\n".join(lines)


def mmlu_prompt(item: MmluItem, shots: list[MmluItem]) -> str:
    """The original MMLU prompt: a header, k solved dev examples, then the question."""
    subject = item.subject.replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    body = "".join(format_question(s, with_answer=True) + "\n\n" for s in shots)
    return head + body + format_question(item)


def mmlu_prompts(
    folder: str | Path, k_shot: int = 0, split: str = "test"
) -> list[tuple[str, MmluItem]]:
    """(prompt, item) for every item of `split`, with k-shot examples from dev/ of its subject."""
    if k_shot < 0:
        raise MkaInputError(f"k_shot must be >= 0, got {k_shot}")
    items = load_mmlu(folder, split)
    dev: dict[str, list[MmluItem]] = {}
    if k_shot:
        for it in load_mmlu(folder, "dev"):
            dev.setdefault(it.subject, []).append(it)
    return [(mmlu_prompt(it, dev.get(it.subject, [])[:k_shot]), it) for it in items]


def load_documents(source: str | Path = BUILTIN, split: str = "calibration") -> list[Document]:
    """Documents for calibration or evaluation from `builtin`, a .txt/.jsonl file or an MMLU folder.

    The built-in corpus is split so calibration and evaluation never share a document. A user file
    or an MMLU folder is used whole (MMLU calibration uses the question prompts, as the MKA paper).
    """
    if split not in ("calibration", "evaluation"):
        raise MkaInputError(f"unknown split {split!r}; expected calibration or evaluation")
    if source in (None, "", BUILTIN):
        calib, evl = builtin_corpus()
        return calib if split == "calibration" else evl
    p = Path(source).expanduser()
    if is_mmlu_folder(p):
        return [Document(prompt, it.subject) for prompt, it in mmlu_prompts(p, 0)]
    if p.is_dir():
        raise MkaInputError(f"{p} is a folder but not an MMLU folder (no test/ sub-folder)")
    if p.suffix not in (".txt", ".jsonl"):
        if not p.exists():
            raise MkaInputError(f"data file not found: {p}")
        raise MkaInputError(
            f"unsupported data file {p.name}: expected .txt, .jsonl or an MMLU folder"
        )
    return load_text_file(p)


# ---------------------------------------------------------------------------------------------
# tokenisation


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_calibration(
    tokenizer, docs: list[Document], n_samples: int = 128, max_tokens: int = 128
) -> CalibrationBatch:
    """N samples of at most T tokens: every document cut into T-token chunks, then N chunks taken
    evenly spaced across all of them (deterministic; covers the corpus rather than its start)."""
    if not isinstance(n_samples, int) or n_samples < 2:
        raise MkaInputError(f"number of samples must be an integer >= 2, got {n_samples!r}")
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise MkaInputError(f"tokens per sample must be an integer >= 2, got {max_tokens!r}")
    if not docs:
        raise MkaInputError("no calibration documents given")
    min_len = min(8, max_tokens)
    chunks: list[tuple[int, list[int]]] = []
    for i, d in enumerate(docs):
        ids = _encode(tokenizer, d.text)
        for s in range(0, len(ids), max_tokens):
            piece = ids[s : s + max_tokens]
            if len(piece) >= min_len or (s == 0 and len(piece) >= 2):
                chunks.append((i, piece))
    if len(chunks) < n_samples:
        raise MkaInputError(
            f"{n_samples} samples requested but the data yields only {len(chunks)} samples of up to "
            f"{max_tokens} tokens; lower the number of samples or give more text"
        )
    picks = [chunks[(j * len(chunks)) // n_samples] for j in range(n_samples)]
    width = max(len(p) for _, p in picks)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((n_samples, width), pad, dtype=torch.long)
    mask = torch.zeros((n_samples, width), dtype=torch.long)
    for r, (_, piece) in enumerate(picks):
        ids[r, : len(piece)] = torch.tensor(piece)
        mask[r, : len(piece)] = 1
    doc_index = [i for i, _ in picks]
    return CalibrationBatch(ids, mask, doc_index, [docs[i].label for i in doc_index])


def make_eval_windows(
    tokenizer, docs: list[Document], budget_tokens: int = 8192, window: int = 512
) -> torch.Tensor:
    """The evaluation text as non-overlapping windows: (n_windows, window) long.

    Documents are joined by blank lines and cut into full windows up to the token budget, so every
    model is scored on exactly the same tokens."""
    if window < 2 or budget_tokens < window:
        raise MkaInputError(
            f"evaluation budget ({budget_tokens}) must be at least one window ({window}) of >= 2 tokens"
        )
    if not docs:
        raise MkaInputError("no evaluation documents given")
    ids: list[int] = []
    sep = _encode(tokenizer, "\n\n")
    for d in docs:
        ids.extend(_encode(tokenizer, d.text) + sep)
        if len(ids) >= budget_tokens:
            break
    n = min(budget_tokens, len(ids)) // window
    if n == 0:
        raise MkaInputError(
            f"evaluation text has only {len(ids)} tokens, fewer than one window of {window}"
        )
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)
