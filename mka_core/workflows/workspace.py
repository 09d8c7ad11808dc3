"""Workspaces: a user's work kept on disk, so a reload or a server restart resumes it.

One folder per workspace, under ``$MKA_STUDIO_WORKSPACES`` (default: the user's data folder,
``$XDG_DATA_HOME/mka-studio/workspaces`` or ``~/.local/share/mka-studio/workspaces``):

    state.json          what the session chose: the model, the analysis settings, the pair,
                        the picks, the plan's origin, the history of runs, the exports
    analysis/           the analysis as `analyze --out` writes it (similarity.*, stability.*,
                        importance.json) plus activations.npz, so nothing is captured again
    plan.json           the current plan (the same file `plan --out` writes)
    runs/run-0001.json  each run as `mka-run.json` beside an export (stages, both evaluations)
    reports/            TransAct and heal reports of the runs that have them
    exports/            the default folder for exported models

Plans and results are the same JSON files the command line writes. Compressed models are not
kept (they are large); a run read back has its numbers, and its plan can be run again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mka_core.analysis.activations import Activations
from mka_core.compression.plan import Plan
from mka_core.data.corpus import Document
from mka_core.errors import MkaInputError
from mka_core.files import atomic_dir, write_bytes_atomic, write_text_atomic
from mka_core.workflows.pipeline import load_analysis, run_from_dict

FORMAT = "mka-workspace"
VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def root() -> Path:
    env = os.environ.get("MKA_STUDIO_WORKSPACES")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME")
    base = Path(data).expanduser() if data else Path.home() / ".local" / "share"
    return base / "mka-studio" / "workspaces"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise MkaInputError(
            f"workspace name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (no spaces)"
        )
    return name


def new_name() -> str:
    """A fresh workspace's name: the time, and a suffix when another workspace took that second
    (two sessions starting at once must not share one). The folder is claimed by mkdir, so two
    processes cannot both get it."""
    stem = datetime.now().strftime("ws-%Y%m%d-%H%M%S")
    root().mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        name = stem if i == 1 else f"{stem}-{i}"
        try:
            (root() / name).mkdir()
        except FileExistsError:
            continue
        return name
    raise MkaInputError(f"could not find a free workspace name under {root()}")


def list_workspaces() -> list[dict]:
    """Every workspace, newest first: name, updated, model, runs."""
    out = []
    base = root()
    if not base.is_dir():
        return out
    for d in base.iterdir():
        f = d / "state.json"
        if not f.is_file():
            continue
        try:
            state = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        model = (state.get("model") or {}).get("source")
        out.append(
            {
                "name": d.name,
                "updated": state.get("updated", ""),
                "model": model,
                "runs": len(state.get("history") or []),
                "analysis": state.get("analysis") is not None,
            }
        )
    return sorted(out, key=lambda w: w["updated"], reverse=True)


class Workspace:
    """One workspace folder (see the module docstring)."""

    def __init__(self, name: str, create: bool = False):
        self.name = check_name(name)
        self.path = root() / name
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / "state.json").exists():
                self.save_state({})
        elif not (self.path / "state.json").is_file():
            raise MkaInputError(f"no workspace named {name!r} in {root()}")

    # -- state ------------------------------------------------------------------------------

    def load_state(self) -> dict:
        try:
            d = json.loads((self.path / "state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise MkaInputError(f"workspace {self.name}: state.json is unreadable ({e})") from None
        if d.get("format") != FORMAT:
            raise MkaInputError(f"workspace {self.name}: state.json is not an {FORMAT} file")
        return d

    def save_state(self, state: dict) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        doc = {"format": FORMAT, "version": VERSION, **state, "name": self.name, "updated": now}
        doc.setdefault("created", now)
        write_text_atomic(
            self.path / "state.json", json.dumps(doc, indent=2, default=str) + "\n", overwrite=True
        )

    # -- analysis -----------------------------------------------------------------------------

    @property
    def analysis_dir(self) -> Path:
        return self.path / "analysis"

    def save_analysis(self, analysis) -> None:
        """The analysis' files, replaced as a whole (a half-written one is never read)."""

        with atomic_dir(self.analysis_dir, overwrite=True) as tmp:
            analysis.save(tmp)
            acts = analysis.activations
            if acts is not None:
                np.savez(
                    tmp / "activations.npz",
                    states=acts.states,
                    sample_ids=acts.sample_ids,
                    labels=np.asarray(acts.labels, dtype=object).astype(str),
                )
                (tmp / "activations.json").write_text(
                    json.dumps({"pooling": acts.pooling, "meta": acts.meta}, default=str)
                )

    def load_analysis(self, loaded, data=None):
        """The saved analysis for `loaded`, with its activations and the calibration batch
        rebuilt; None when there is none. `data`: the documents it was made from, when they were
        uploaded (a file name is not enough to find them again)."""

        if not (self.analysis_dir / "similarity.json").is_file():
            return None
        analysis = load_analysis(loaded, self.analysis_dir, data=data)
        if (self.analysis_dir / "activations.npz").is_file():
            z = np.load(self.analysis_dir / "activations.npz")
            meta = json.loads((self.analysis_dir / "activations.json").read_text())
            analysis.activations = Activations(
                z["states"],
                z["sample_ids"],
                [str(x) for x in z["labels"]],
                meta["pooling"],
                meta["meta"],
            )
        return analysis

    def save_documents(self, docs) -> None:
        """Uploaded calibration text, kept so the analysis can be rebuilt after a restart."""
        text = "\n".join(json.dumps({"text": d.text, "label": d.label}) for d in docs) + "\n"
        write_text_atomic(self.path / "calibration.jsonl", text, overwrite=True)

    def load_documents(self):

        f = self.path / "calibration.jsonl"
        if not f.is_file():
            return None
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line]
        return [Document(r["text"], r["label"]) for r in rows]

    # -- plan, runs, reports --------------------------------------------------------------------

    def save_plan(self, plan) -> None:
        if plan is None:
            (self.path / "plan.json").unlink(missing_ok=True)
        else:
            write_text_atomic(self.path / "plan.json", plan.to_json(), overwrite=True)

    def load_plan(self):

        f = self.path / "plan.json"
        return Plan.load(f) if f.is_file() else None

    def run_file(self, index: int) -> Path:
        return self.path / "runs" / f"run-{index + 1:04d}.json"

    def save_run(self, index: int, run) -> None:
        write_text_atomic(
            self.run_file(index), json.dumps(run.to_dict(), indent=2) + "\n", overwrite=True
        )

    def load_runs(self) -> list:
        """Every run, in order, without its compressed model (not kept on disk)."""

        out = []
        d = self.path / "runs"
        for f in sorted(d.glob("run-*.json")) if d.is_dir() else []:
            out.append(run_from_dict(json.loads(f.read_text(encoding="utf-8"))))
        return out

    def save_report(self, name: str, report) -> None:
        data = json.dumps(report.to_dict()).encode()
        write_bytes_atomic(self.path / "reports" / f"{name}.json", data, overwrite=True)

    def load_report(self, name: str, cls):
        f = self.path / "reports" / f"{name}.json"
        return cls.from_dict(json.loads(f.read_text(encoding="utf-8"))) if f.is_file() else None

    @property
    def exports_dir(self) -> Path:
        return self.path / "exports"

    def delete(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
