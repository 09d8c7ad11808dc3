"""Per-layer manifold embeddings: diffusion maps as in MKA (Liu et al. 2024, Pruning via Merging), and 2-D projections
(diffusion, PCA, UMAP) for display.

The released MKA code embeds only the first prompt's first tokens with a fixed bandwidth and no
eigenvalue scaling; this module implements the method as the paper describes it instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA

from mka_core.errors import MkaInputError

log = logging.getLogger(__name__)

PROJECTIONS = ("diffusion", "pca", "umap")


@dataclass(frozen=True)
class DiffusionMap:
    embedding: np.ndarray  # (n_rows, d): [λ_1^t ψ_1, …, λ_d^t ψ_d]
    eigenvalues: np.ndarray  # (d + 1,) λ_0 = 1 first, descending
    epsilon: float  # the kernel bandwidth used


def squared_distances(x: np.ndarray) -> np.ndarray:
    """(n, n) ‖x_i − x_j‖², computed in float64 and clipped at 0 (rounding)."""
    x = np.asarray(x, dtype=np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.fill_diagonal(d2, 0.0)
    return np.maximum(d2, 0.0)


def diffusion_map(
    x: np.ndarray,
    d: int = 4,
    t: float = 1.0,
    alpha: float = 0.5,
    epsilon: float | None = None,
) -> DiffusionMap:
    """Diffusion-map embedding of the rows of `x` (n_rows, d_model) into `d` dimensions.

    1. D2_ij = ‖x_i − x_j‖², ε = median of the non-zero D2 (unless given);
    2. K = exp(−D2 / ε);  3. K ← K / (q qᵀ)^α with q_i = Σ_j K_ij (density normalisation);
    4. A = K / (s sᵀ), s_i = √(Σ_j K_ij), symmetric, eigen-decomposed;
    5. ψ_k = φ_k / φ_0, Y = [λ_k^t ψ_k] for k = 1..d (the trivial k = 0 is skipped).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise MkaInputError(
            f"diffusion map expects a 2-D array (rows, features), got shape {x.shape}"
        )
    n = x.shape[0]
    if not 1 <= d <= n - 2:
        raise MkaInputError(f"diffusion dimension d={d} must be between 1 and n_rows - 2 = {n - 2}")
    if not 0.0 <= alpha <= 1.0:
        raise MkaInputError(f"density normalisation alpha={alpha} must be in [0, 1]")
    d2 = squared_distances(x)
    if epsilon is None:
        nz = d2[d2 > 0]
        epsilon = float(np.median(nz)) if nz.size else 1.0  # all rows equal: any ε gives K = 1
    elif epsilon <= 0:
        raise MkaInputError(f"bandwidth epsilon={epsilon} must be > 0")
    k = np.exp(-d2 / epsilon)
    if alpha > 0:
        q = k.sum(axis=1)
        k = k / np.outer(q, q) ** alpha
    s = np.sqrt(k.sum(axis=1))
    a = k / np.outer(s, s)
    a = (a + a.T) / 2  # exact symmetry for eigh
    # s is the exact eigenvector of A for λ_0 = 1 (A s = s). Deflating it, instead of trusting
    # eigh to return it first, keeps ψ finite when outlier rows make λ = 1 degenerate.
    phi0 = s / np.linalg.norm(s)
    lam, phi = np.linalg.eigh(a - np.outer(phi0, phi0))  # ascending
    lam, phi = lam[::-1][:d], phi[:, ::-1][:, :d]
    psi = phi / phi0[:, None]  # right eigenvectors of the Markov matrix
    y = psi * np.power(np.clip(lam, 0.0, None), t)[None, :]
    lam = np.concatenate([[1.0], lam])
    return DiffusionMap(y.astype(np.float32), lam.astype(np.float64), float(epsilon))


def diffusion_maps(
    states: np.ndarray, d: int = 4, t: float = 1.0, alpha: float = 0.5, epsilon: float | None = None
) -> list[DiffusionMap]:
    """One diffusion map per layer of (n_layers, n_rows, d_model) activations."""
    return [diffusion_map(s, d=d, t=t, alpha=alpha, epsilon=epsilon) for s in states]


def project_2d(x: np.ndarray, method: str = "diffusion", seed: int = 0) -> np.ndarray:
    """A 2-D view of the rows of `x` for display: (n_rows, 2)."""
    x = np.asarray(x, dtype=np.float32)
    if method not in PROJECTIONS:
        raise MkaInputError(
            f"unknown projection {method!r}; expected one of {', '.join(PROJECTIONS)}"
        )
    if x.shape[0] < 4:
        raise MkaInputError(f"need at least 4 rows to project, got {x.shape[0]}")
    if method == "diffusion":
        return diffusion_map(x, d=2).embedding
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x).astype(np.float32)
    import umap  # imported lazily: it compiles with numba on first use

    n_neighbors = max(2, min(15, x.shape[0] - 1))
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed, n_jobs=1)
    return reducer.fit_transform(x).astype(np.float32)
