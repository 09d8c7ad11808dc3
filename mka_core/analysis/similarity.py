"""Layer-similarity measures on captured activations, and the result object that holds
them all: NPIB (MKA), cosine, angular distance (Gromov et al.), linear CKA, Block Influence (ShortGPT).

Every pairwise measure is an (n_layers, n_layers) symmetric matrix over block outputs A[l].
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

from mka_core.analysis.activations import Activations
from mka_core.analysis.manifold import diffusion_maps
from mka_core.errors import MkaInputError, ProgressFn, report
from mka_core.files import write_bytes_atomic

log = logging.getLogger(__name__)

MEASURES = ("npib", "cosine", "angular", "cka")
FORMAT = "mka-similarity"
VERSION = 1


# ---------------------------------------------------------------------------------------------
# the measures, each vectorised over all layer pairs


def _unit_rows(states: np.ndarray) -> np.ndarray:
    x = states.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def row_cosines(states: np.ndarray) -> np.ndarray:
    """(n_layers, n_layers, n_rows): cos(a_l,n, a_m,n) for every pair of layers and every row."""
    u = _unit_rows(states)  # (L, N, H)
    return np.clip(np.einsum("lnh,mnh->lmn", u, u), -1.0, 1.0)


def cosine_matrix(states: np.ndarray) -> np.ndarray:
    """Mean over rows of cos(a_l, a_m)."""
    return row_cosines(states).mean(axis=-1)


def angular_matrix(states: np.ndarray) -> np.ndarray:
    """Mean over rows of arccos(cos(a_l, a_m)) / π: 0 for identical directions, 1 for opposite."""
    return (np.arccos(row_cosines(states)) / np.pi).mean(axis=-1)


def angular_block_scores(acts: Activations, n: int) -> np.ndarray:
    """Gromov et al.: distance between the input of block l and the output of block l+n−1,
    for every start l = 0..L−n. Small means the n blocks change little."""
    if not 1 <= n < acts.n_layers:
        raise MkaInputError(f"block length n={n} must be between 1 and {acts.n_layers - 1}")
    a = _unit_rows(acts.states[: acts.n_layers - n + 1])  # inputs of blocks l
    b = _unit_rows(acts.states[n:])  # outputs of blocks l+n−1
    cos = np.clip(np.einsum("lnh,lnh->ln", a, b), -1.0, 1.0)
    return (np.arccos(cos) / np.pi).mean(axis=1)


def block_influence(acts: Activations) -> np.ndarray:
    """ShortGPT: 1 − mean cos(input of block l, output of block l), per layer."""
    a, b = _unit_rows(acts.inputs), _unit_rows(acts.outputs)
    return 1.0 - np.einsum("lnh,lnh->ln", a, b).mean(axis=1)


def cka_matrix(states: np.ndarray) -> np.ndarray:
    """Linear CKA between every pair of layers, through centred Gram matrices (n_rows ≤ d_model
    in practice, so the (N, N) Grams are the cheap side)."""
    x = states.astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)  # centre each feature over rows
    grams = np.einsum("lnh,lmh->lnm", x, x).reshape(x.shape[0], -1)  # (L, N*N)
    hsic = grams @ grams.T  # (L, L): ‖X_lᵀ X_m‖_F²
    norm = np.sqrt(np.clip(np.diag(hsic), 1e-300, None))
    return np.clip(hsic / np.outer(norm, norm), 0.0, 1.0)


def cluster_codes(embeddings: list[np.ndarray], k: int = 8, seed: int = 0) -> np.ndarray:
    """k-means codes per layer: (n_layers, n_rows) ints. k is capped at n_rows // 8 (≥ 2)."""

    n = embeddings[0].shape[0]
    k_eff = max(2, min(k, n // 8))
    codes = np.zeros((len(embeddings), n), dtype=np.int64)
    for i, y in enumerate(embeddings):
        n_distinct = len(np.unique(np.round(y, 6), axis=0))
        if n_distinct < 2:
            continue  # one point repeated: a single cluster
        km = KMeans(n_clusters=min(k_eff, n_distinct), n_init=4, random_state=seed)
        codes[i] = km.fit_predict(y.astype(np.float64))
    return codes


def npib_from_codes(codes: np.ndarray) -> np.ndarray:
    """S_lm = I(C_l; C_m) / √(H(C_l) H(C_m)), plug-in estimates in nats, all pairs at once."""
    n_layers, n = codes.shape
    k = int(codes.max()) + 1
    onehot = np.zeros((n_layers, n, k))
    onehot[np.arange(n_layers)[:, None], np.arange(n)[None, :], codes] = 1.0  # (L, N, k)
    joint = np.einsum("lnk,mnj->lmkj", onehot, onehot) / n  # (L, L, k, k)
    p = onehot.mean(axis=1)  # (L, k) marginals
    outer = p[:, None, :, None] * p[None, :, None, :]  # (L, L, k, k)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log(joint / np.where(outer > 0, outer, 1.0)), 0.0)
        logp = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    mi = terms.sum(axis=(2, 3))
    h = -(p * logp).sum(axis=1)  # (L,) entropies
    denom = np.sqrt(np.outer(h, h))
    s = np.where(denom > 0, mi / np.where(denom > 0, denom, 1.0), 0.0)
    s = np.clip((s + s.T) / 2, 0.0, 1.0)
    np.fill_diagonal(s, 1.0)
    return s


# ---------------------------------------------------------------------------------------------
# the result


@dataclass
class SimilarityResult:
    """All similarity matrices of one analysis, the parameters used and the layer indices."""

    layers: list[int]  # original layer indices covered (rows/cols of every matrix)
    matrices: dict[str, np.ndarray]  # name → (L, L): npib, cosine, angular, cka
    bi: np.ndarray  # (L,) Block Influence
    angular_states: np.ndarray  # (L+1, L+1) angular distance between block boundaries
    embeddings: np.ndarray  # (L, n_rows, d) diffusion embeddings of each layer's output
    codes: np.ndarray  # (L, n_rows) NPIB cluster codes
    labels: list[str]  # (n_rows,) document label of each row
    params: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # seconds per stage

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def block_scores(self, n: int) -> np.ndarray:
        """Angular block score of removing n consecutive layers starting at each l."""
        if not 1 <= n < self.n_layers:
            raise MkaInputError(f"block length n={n} must be between 1 and {self.n_layers - 1}")
        return np.array([self.angular_states[i, i + n] for i in range(self.n_layers - n + 1)])

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "layers": list(self.layers),
            "measures": list(self.matrices),
            "params": self.params,
            "timings": self.timings,
            "labels": self.labels,
        }

    def save(self, out_dir: str | Path) -> Path:
        """similarity.npz (one array per measure, plus bi and the embeddings), similarity.json
        (parameters, layer indices, timings) and one CSV per measure, written atomically."""
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        arrays = {name: m for name, m in self.matrices.items()}
        arrays.update(
            bi=self.bi,
            angular_states=self.angular_states,
            embeddings=self.embeddings,
            codes=self.codes,
            layers=np.asarray(self.layers),
        )
        _atomic(out / "similarity.npz", lambda f: np.savez(f, **arrays), binary=True)
        _atomic(out / "similarity.json", lambda f: json.dump(self.to_json(), f, indent=2))
        for name, m in self.matrices.items():
            _atomic(out / f"{name}.csv", lambda f, m=m: f.write(matrix_csv(m, self.layers)))
        _atomic(out / "bi.csv", lambda f: f.write(vector_csv(self.bi, self.layers, "bi")))
        return out

    @classmethod
    def load(cls, out_dir: str | Path) -> SimilarityResult:
        d = Path(out_dir).expanduser()
        try:
            meta = json.loads((d / "similarity.json").read_text())
            npz = np.load(d / "similarity.npz")
        except FileNotFoundError as e:
            raise MkaInputError(
                f"no similarity result in {d}: {Path(e.filename).name} missing"
            ) from None
        except (json.JSONDecodeError, ValueError) as e:
            raise MkaInputError(f"similarity result in {d} is corrupt: {e}") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise MkaInputError(f"{d}/similarity.json is not an {FORMAT} v{VERSION} file")
        return cls(
            layers=[int(i) for i in meta["layers"]],
            matrices={m: npz[m] for m in meta["measures"]},
            bi=npz["bi"],
            angular_states=npz["angular_states"],
            embeddings=npz["embeddings"],
            codes=npz["codes"],
            labels=list(meta.get("labels", [])),
            params=meta.get("params", {}),
            timings=meta.get("timings", {}),
        )


def matrix_csv(m: np.ndarray, layers: list[int]) -> str:
    head = "layer," + ",".join(str(i) for i in layers)
    rows = [f"{i}," + ",".join(f"{v:.6g}" for v in row) for i, row in zip(layers, m, strict=True)]
    return "\n".join([head, *rows]) + "\n"


def vector_csv(v: np.ndarray, layers: list[int], name: str) -> str:
    return (
        "\n".join([f"layer,{name}", *(f"{i},{x:.6g}" for i, x in zip(layers, v, strict=True))])
        + "\n"
    )


def _atomic(path: Path, write, binary: bool = False) -> None:
    """Write through `write(file)` into memory, then atomically to `path` (files.py)."""

    buf = io.BytesIO() if binary else io.StringIO()
    write(buf)
    data = buf.getvalue()
    write_bytes_atomic(path, data if binary else data.encode("utf-8"), overwrite=True)


def measures_of(
    states: np.ndarray,
    k: int = 8,
    d: int = 4,
    t: float = 1.0,
    alpha: float = 0.5,
    epsilon: float | None = None,
    seed: int = 0,
    timings: dict | None = None,
    progress: ProgressFn | None = None,
):
    """Every measure on pooled states (n_layers + 1, n_rows, d_model): (matrices, bi, angular
    between all block boundaries, diffusion maps, NPIB codes). Used on all rows by
    `compute_similarity` and on resampled rows by `stability`."""
    timings = {} if timings is None else timings
    outs = states[1:]  # (L, N, H)

    t0 = time.perf_counter()
    report(progress, 0.0, "diffusion maps")
    maps = diffusion_maps(outs, d=d, t=t, alpha=alpha, epsilon=epsilon)
    timings["diffusion"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    report(progress, 0.4, "NPIB: clustering and mutual information")
    codes = cluster_codes([m.embedding for m in maps], k=k, seed=seed)
    npib = npib_from_codes(codes)
    timings["npib"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    report(progress, 0.7, "cosine, angular, CKA, Block Influence")
    cos_all = row_cosines(states)  # (L+1, L+1, N) over all block boundaries
    cosine = cos_all[1:, 1:].mean(axis=-1)
    ang_states = (np.arccos(cos_all) / np.pi).mean(axis=-1)
    matrices = {
        "npib": npib,
        "cosine": cosine,
        "angular": ang_states[1:, 1:],
        "cka": cka_matrix(outs),
    }
    bi = 1.0 - np.array([cos_all[i, i + 1].mean() for i in range(states.shape[0] - 1)])
    timings["other_measures"] = time.perf_counter() - t0
    return matrices, bi, ang_states, maps, codes


def compute_similarity(
    acts: Activations,
    k: int = 8,
    d: int = 4,
    t: float = 1.0,
    alpha: float = 0.5,
    epsilon: float | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> SimilarityResult:
    """Every similarity measure (NPIB, cosine, angular, CKA, Block Influence) on one capture."""
    if acts.n_rows < 16:
        raise MkaInputError(f"need at least 16 activation rows for NPIB, got {acts.n_rows}")
    if k < 2:
        raise MkaInputError(f"number of clusters k={k} must be >= 2")
    timings: dict[str, float] = {}
    matrices, bi, ang_states, maps, codes = measures_of(
        acts.states, k, d, t, alpha, epsilon, seed, timings, progress
    )
    report(progress, 1.0, "similarity done")

    params = {
        "k": max(2, min(k, acts.n_rows // 8)),
        "k_requested": k,
        "d": d,
        "t": t,
        "alpha": alpha,
        "epsilon": "median" if epsilon is None else epsilon,
        "epsilons": [m.epsilon for m in maps],
        "seed": seed,
        "n_rows": acts.n_rows,
        **acts.meta,
    }
    return SimilarityResult(
        layers=list(range(acts.n_layers)),
        matrices=matrices,
        bi=bi,
        angular_states=ang_states,
        embeddings=np.stack([m.embedding for m in maps]),
        codes=codes,
        labels=list(acts.labels),
        params=params,
        timings=timings,
    )
