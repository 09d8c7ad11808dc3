"""How far each similarity measure can be trusted: the same measure on resamples of the
captured rows, with no extra forward pass.

- *split-half*: the rows of half the calibration documents (even positions of the documents, in
  order of appearance) against those of the other half; Spearman between the two matrices over
  all layer pairs and over adjacent pairs (what the merge planners read);
- *bootstrap*: B resamples of the samples, with replacement; the mean Spearman between
  replicates, and each cell's spread (standard deviation over the replicates);
- the NPIB matrix averaged over the replicates, which the `mka` planner can use instead of the
  single-sample NPIB (`npib="bootstrap"`): the paper's method given its best honest chance.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from mka_core.analysis.activations import Activations
from mka_core.analysis.similarity import measures_of
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.files import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "mka-stability"
VERSION = 1
MEASURES = ("npib", "cosine", "angular", "cka", "bi")
MIN_ROWS = 16  # NPIB needs rows: k = min(8, rows / 8) clusters


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation, None where it is undefined (fewer than 3 values, or a
    constant side)."""

    a, b = np.ravel(a), np.ravel(b)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def reading(rho: float | None) -> str:
    """A plain-language reading of an agreement between resamples."""
    if rho is None or not math.isfinite(rho):
        return "undefined (too few values)"
    if rho >= 0.9:
        return "reproducible on this data"
    if rho >= 0.7:
        return "mostly reproducible; small differences may not hold"
    if rho >= 0.4:
        return "weakly reproducible: treat its ranking as a rough guide"
    return "not reproducible on this data: its ranking is mostly noise"


def _values(measure: str, m: np.ndarray, n_layers: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(all values, adjacent values) of one measure's result: the upper triangle and the first
    off-diagonal of a matrix; the vector itself for Block Influence (no pairs)."""
    if measure == "bi":
        return m, None
    iu = np.triu_indices(n_layers, 1)
    return m[iu], np.diagonal(m, 1)


@dataclass
class StabilityResult:
    split_half: dict  # measure -> {"all": rho, "adjacent": rho or None}
    bootstrap: dict  # measure -> {"all": mean rho between replicates, "adjacent": ...}
    spread: dict  # measure -> (L, L) std of each cell over the replicates ((L,) for bi)
    npib_mean: np.ndarray  # (L, L) NPIB averaged over the replicates
    n_boot: int
    seconds: float
    params: dict = field(default_factory=dict)

    def score(self, measure: str, kind: str = "split_half") -> float | None:
        """The number the app shows: adjacent pairs for a pairwise measure, layers for bi."""
        d = getattr(self, kind)[measure]
        return d["all"] if measure == "bi" else d["adjacent"]

    def reading(self, measure: str) -> str:
        what = "layer ranking" if measure == "bi" else "adjacent-pair ranking"
        rho = self.score(measure)
        shown = "–" if rho is None else f"{rho:.2f}"
        return f"{what} {reading(rho)} (split-half Spearman {shown})"

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "split_half": self.split_half,
            "bootstrap": self.bootstrap,
            "n_boot": self.n_boot,
            "seconds": self.seconds,
            "params": self.params,
        }

    def save(self, out_dir: str | Path) -> Path:
        """stability.json (the agreements) and stability.npz (spread maps, mean NPIB)."""

        out = Path(out_dir).expanduser()
        write_text_atomic(
            out / "stability.json", json.dumps(self.to_dict(), indent=2) + "\n", overwrite=True
        )

        buf = io.BytesIO()
        np.savez(
            buf, npib_mean=self.npib_mean, **{f"spread_{k}": v for k, v in self.spread.items()}
        )
        write_bytes_atomic(out / "stability.npz", buf.getvalue(), overwrite=True)
        return out

    @classmethod
    def from_dict(cls, d: dict, arrays: dict) -> StabilityResult:
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
            raise MkaInputError(f"not an {FORMAT} v{VERSION} record")
        try:
            return cls(
                split_half=d["split_half"],
                bootstrap=d["bootstrap"],
                spread={
                    k[len("spread_") :]: v for k, v in arrays.items() if k.startswith("spread_")
                },
                npib_mean=arrays["npib_mean"],
                n_boot=int(d["n_boot"]),
                seconds=float(d["seconds"]),
                params=dict(d.get("params", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MkaInputError(f"stability record lacks or garbles {e}") from None

    @classmethod
    def load(cls, out_dir: str | Path) -> StabilityResult | None:
        """The stability saved beside an analysis, or None when there is none."""
        d = Path(out_dir).expanduser()
        if not (d / "stability.json").is_file():
            return None
        try:
            meta = json.loads((d / "stability.json").read_text(encoding="utf-8"))
            arrays = dict(np.load(d / "stability.npz"))
        except (OSError, ValueError) as e:
            raise MkaInputError(f"stability result in {d} is unreadable: {e}") from None
        return cls.from_dict(meta, arrays)


def _halves(acts: Activations) -> tuple[np.ndarray, np.ndarray, str]:
    """Row indices of two disjoint halves, by document (even / odd positions of the documents in
    order of appearance), or by sample when that leaves a half too small."""
    order: dict[str, int] = {}
    for lab in acts.labels:
        order.setdefault(lab, len(order))
    pos = np.array([order[lab] for lab in acts.labels])
    a, b = np.nonzero(pos % 2 == 0)[0], np.nonzero(pos % 2 == 1)[0]
    if min(len(a), len(b)) >= MIN_ROWS:
        return a, b, "documents"
    even = acts.sample_ids % 2 == 0
    return np.nonzero(even)[0], np.nonzero(~even)[0], "samples"


def _one(states: np.ndarray, sim_params: dict, seed: int) -> dict[str, np.ndarray]:
    p = sim_params
    matrices, bi, *_ = measures_of(
        states,
        k=int(p.get("k_requested", 8)),
        d=int(p.get("d", 4)),
        t=float(p.get("t", 1.0)),
        alpha=float(p.get("alpha", 0.5)),
        seed=seed,
    )
    return {**matrices, "bi": bi}


def _agreement(x: dict, y: dict, n_layers: int) -> dict:
    out = {}
    for m in MEASURES:
        xa, xj = _values(m, x[m], n_layers)
        ya, yj = _values(m, y[m], n_layers)
        out[m] = {"all": spearman(xa, ya), "adjacent": spearman(xj, yj) if xj is not None else None}
    return out


def compute_stability(
    acts: Activations,
    sim_params: dict,
    n_boot: int | None = None,
    budget_s: float | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> StabilityResult:
    """Split-half and bootstrap agreement of every measure on `acts` (see the module docstring).

    n_boot: bootstrap replicates; by default as many as fit in `budget_s` seconds (the caller
    passes 20 % of the analysis' time), at least 4 and at most 32, sized from the time the two
    halves took."""
    t_start = time.perf_counter()
    if acts.n_rows < 2 * MIN_ROWS:
        raise MkaInputError(
            f"stability needs at least {2 * MIN_ROWS} activation rows (two halves of "
            f"{MIN_ROWS}), got {acts.n_rows}; capture more samples"
        )
    n_layers = acts.n_layers
    a, b, split = _halves(acts)
    report(progress, 0.0, f"stability: two halves by {split} ({len(a)} and {len(b)} rows)")
    half_a = _one(acts.states[:, a], sim_params, seed)
    half_b = _one(acts.states[:, b], sim_params, seed)
    split_half = _agreement(half_a, half_b, n_layers)
    per_half = (time.perf_counter() - t_start) / 2
    if n_boot is None:
        per_rep = per_half * 2.2  # a replicate has all the rows: roughly twice a half
        room = (budget_s if budget_s is not None else 10 * per_rep) - 2 * per_half
        n_boot = int(min(32, max(4, room // max(per_rep, 1e-6))))
    if n_boot < 2:
        raise MkaInputError(f"bootstrap needs at least 2 replicates, got {n_boot}")
    rng = np.random.default_rng(seed)
    samples = np.unique(acts.sample_ids)
    rows_of = {s: np.nonzero(acts.sample_ids == s)[0] for s in samples}
    reps = []
    for r in range(n_boot):
        pick = rng.choice(samples, size=len(samples), replace=True)
        idx = np.concatenate([rows_of[s] for s in pick])
        reps.append(_one(acts.states[:, idx], sim_params, seed + 1 + r))
        report(progress, (r + 1) / n_boot, f"stability: bootstrap {r + 1}/{n_boot}")
    boot: dict = {}
    for m in MEASURES:
        alls, adjs = [], []
        for i in range(n_boot):
            for j in range(i + 1, n_boot):
                xa, xj = _values(m, reps[i][m], n_layers)
                ya, yj = _values(m, reps[j][m], n_layers)
                alls.append(spearman(xa, ya))
                if xj is not None:
                    adjs.append(spearman(xj, yj))
        boot[m] = {"all": _mean(alls), "adjacent": _mean(adjs) if m != "bi" else None}
    spread = {m: np.std(np.stack([rep[m] for rep in reps]), axis=0) for m in MEASURES}
    npib_mean = np.mean(np.stack([rep["npib"] for rep in reps]), axis=0)
    seconds = time.perf_counter() - t_start
    report(progress, 1.0, f"stability: {n_boot} bootstrap replicates in {seconds:.1f} s")
    return StabilityResult(
        split_half=split_half,
        bootstrap=boot,
        spread=spread,
        npib_mean=npib_mean,
        n_boot=n_boot,
        seconds=seconds,
        params={"split": split, "half_rows": [int(len(a)), int(len(b))], "seed": seed},
    )


def _mean(xs: list) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None
