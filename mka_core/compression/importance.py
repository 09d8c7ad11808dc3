"""What dropping or merging layers really costs: calibration loss measured, not guessed.

- `measure_importance`: the loss increase of dropping each layer alone and of merging each
  adjacent pair (α by a rule), on a calibration subset. One pass keeps the input of every block;
  each candidate then runs only the blocks from its change upwards (the unchanged prefix is
  computed once), on the layer-by-layer engine, so it works on streamed models too.
- `proxy_vs_truth`: Spearman between each similarity measure's prediction and that damage.
- planners that choose by the loss itself: `sleb` (Song et al. 2024: remove the block whose
  removal raises the calibration loss least, recompute, repeat) and `mka-loss` (MKA's merges,
  but the pair chosen by its measured merge loss and its α searched on the loss).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mka_core.analysis.stability import spearman
from mka_core.compression.plan import Step, compose
from mka_core.compression.planners.search import (
    _alpha,
    candidates_loss,
    start_pass,
    sub_progress,
)
from mka_core.data.corpus import CalibrationBatch
from mka_core.engine.layerpass import causal_lm_loss
from mka_core.errors import MkaInputError, ProgressFn
from mka_core.files import write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "mka-importance"
VERSION = 1
PROXIES = ("bi", "angular", "cosine", "cka", "npib")


@dataclass
class ImportanceResult:
    base_loss: float  # calibration loss of the model as it is
    drop: list[float]  # (L,) loss increase when layer l alone is dropped
    merge: list[float]  # (L - 1,) loss increase when layers l and l + 1 are merged
    merge_alpha: list[float]  # (L - 1,) the α of each merge (weight of layer l)
    alpha_rule: str
    n_samples: int
    n_tokens: int
    seconds: float  # the whole measurement
    drop_seconds: float
    merge_seconds: float
    full_pass_seconds: float  # one forward pass (with the loss) of the same samples, measured
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ImportanceResult:
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
            raise MkaInputError(f"not an {FORMAT} v{VERSION} record")
        names = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise MkaInputError(f"importance record: {e}") from None

    def save(self, out_dir: str | Path) -> Path:

        return write_text_atomic(
            Path(out_dir) / "importance.json",
            json.dumps(self.to_dict(), indent=2) + "\n",
            overwrite=True,
        )

    @classmethod
    def load(cls, out_dir: str | Path) -> ImportanceResult | None:
        p = Path(out_dir).expanduser() / "importance.json"
        if not p.is_file():
            return None
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise MkaInputError(f"{p} is not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# measuring


def measure_importance(
    loaded,
    batch: CalibrationBatch,
    sim=None,
    alpha_rule: str = "similarity",
    alpha: float = 0.5,
    n_samples: int = 32,
    progress: ProgressFn | None = None,
) -> ImportanceResult:
    """Drop-one and merge-one calibration loss of every layer and adjacent pair (module doc).

    alpha_rule: the α of the merges: similarity (NPIB, needs `sim`), rowmean, fixed (`alpha`)."""
    if alpha_rule not in ("similarity", "rowmean", "fixed"):
        raise MkaInputError(
            f"importance merges take alpha rule similarity, rowmean or fixed, not {alpha_rule!r}"
        )
    if alpha_rule in ("similarity", "rowmean") and sim is None:
        raise MkaInputError(f"alpha rule {alpha_rule} needs the similarity analysis")
    if not isinstance(n_samples, int) or n_samples < 2:
        raise MkaInputError(f"importance samples must be an integer >= 2, got {n_samples!r}")
    small = batch.subset(n_samples)
    n = loaded.n_layers
    t0 = time.perf_counter()
    causal_lm_loss(start_pass(loaded.model, small))  # one full pass: the yardstick of the cost
    full_pass = time.perf_counter() - t0
    ident = compose(n, [])
    s = sim.matrices["npib"] if sim is not None else None

    t0 = time.perf_counter()
    drops = [(i, compose(n, [Step.drop([i])])) for i in range(n)]
    base, drop_losses = candidates_loss(
        loaded.model, ident, small, drops, sub_progress(progress, 0.0, 0.5), "drop-one: layer "
    )
    drop_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    alphas = [
        float(min(max(_alpha(alpha_rule, s, [i], [i + 1], alpha), 0.0), 1.0)) for i in range(n - 1)
    ]
    merges = [(i, compose(n, [Step.merge([i, i + 1], [a, 1.0 - a])])) for i, a in enumerate(alphas)]
    _, merge_losses = candidates_loss(
        loaded.model, ident, small, merges, sub_progress(progress, 0.5, 1.0), "merge-one: pair "
    )
    merge_s = time.perf_counter() - t0
    return ImportanceResult(
        base_loss=base,
        drop=[x - base for x in drop_losses],
        merge=[x - base for x in merge_losses],
        merge_alpha=alphas,
        alpha_rule=alpha_rule,
        n_samples=small.n_samples,
        n_tokens=small.n_tokens,
        seconds=full_pass + drop_s + merge_s,
        drop_seconds=drop_s,
        merge_seconds=merge_s,
        full_pass_seconds=full_pass,
        meta={
            "model": getattr(loaded, "source", None),
            "fingerprint": getattr(loaded, "fingerprint", None),
        },
    )


# ---------------------------------------------------------------------------------------------
# proxies against the truth


def proxies(sim) -> dict[str, dict[str, np.ndarray]]:
    """What each measure predicts, as "higher = more damage": per layer l >= 1 (the change from
    layer l - 1's output to layer l's; Block Influence and angular use the block's own input and
    output) and per adjacent pair (1 - similarity; distance for angular)."""
    out = {}
    n = sim.n_layers
    out["bi"] = {"drop": np.asarray(sim.bi)[1:], "merge": np.asarray(sim.bi)[1:]}
    ang = np.asarray(sim.angular_states)
    out["angular"] = {
        "drop": np.array([ang[i, i + 1] for i in range(1, n)]),
        "merge": np.diagonal(np.asarray(sim.matrices["angular"]), 1),
    }
    for m in ("cosine", "cka", "npib"):
        adj = np.diagonal(np.asarray(sim.matrices[m]), 1)
        out[m] = {"drop": 1.0 - adj, "merge": 1.0 - adj}
    return out


def proxy_vs_truth(sim, imp: ImportanceResult) -> dict[str, dict[str, float | None]]:
    """Spearman(proxy, measured damage) per measure: drop-one over layers 1..L-1 (layer 0 has no
    previous output to compare with), merge-one over the adjacent pairs (for Block Influence, the
    influence of the pair's second layer, the one a merge takes away)."""
    drop = np.asarray(imp.drop)[1:]
    merge = np.asarray(imp.merge)
    return {
        m: {"drop": spearman(p["drop"], drop), "merge": spearman(p["merge"], merge)}
        for m, p in proxies(sim).items()
    }


# ---------------------------------------------------------------------------------------------
# planners that choose by the measured loss
