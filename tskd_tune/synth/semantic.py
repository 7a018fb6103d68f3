"""The semantic gate: a synthetic pool measured against the real training images in the teacher's feature space.

The pixel checks of ``gate.py`` cannot tell an anatomically plausible image from one whose intensity
statistics merely match, nor say how much of the real variety a pool covers. Here both sets are seen
through the teacher's frozen encoder (LiteMedSAM's image embedding, read from the encoder-feature cache,
which already holds it for the real images and computes it once per pool), each image's embedding
average-pooled over space to one vector. Then:

- **Fréchet distance** (``fd``) between Gaussians fitted to the two sets, relative to the real set's total
  variance (so the figure does not depend on the encoder's scale): the whole pool against the whole
  training set;
- **precision** and **recall** (Kynkäänniemi et al., 2019): the real manifold is the union of balls around
  every real vector, each with the radius of its ``K``-th nearest real neighbour; precision is the fraction
  of synthetic images inside it (plausible), recall the fraction of real images inside the synthetic
  manifold built the same way (how much of the real variety the pool covers).

Vectors are standardised with the real set's mean and standard deviation and projected onto its first
``PCA_DIMS`` principal components, so that the few-dozen-image sets of this field give stable estimates.
The per-image "inside the real manifold" flags are kept for ``synthetic.filter``. ``pool.pool_semantics``
computes all this for a pool, once per pool and encoder.
"""

from __future__ import annotations

import numpy as np

K = 3
"""Neighbour whose distance is a ball's radius (Kynkäänniemi et al. use 3)."""
PCA_DIMS = 32
"""Principal components of the real vectors kept (at most a quarter of the real images)."""
MAX_IMAGES = 512
"""Images of each set measured (evenly spread); the figures cost well under a second."""

# ---- thresholds, measured on mni152 with LiteMedSAM's encoder (benchmarks/synth_gate.py, 3 seeds; docs/BENCHMARKS.md,
# "Synthetic pools"), each pool against the training images of its seed's split (FD / precision / recall).
# Held-back real images (val and test, about 40): FD 0.43-0.69, precision 0.50-0.90, recall 0.22-0.43.
# Failing pools: training images with their 16 px patches shuffled FD 2.3-2.4, precision <= 0.09; one
# training image repeated with noise 4.5-5.2 / 0; blurred training images 7.9-9.6 / <= 0.05; pure noise
# 12-21 / 0; the CPU-sized 32 px generator after 20-3000 steps 8-12.5 / 0 and the 64 px one after 2000
# steps 3.0 / 0 (blurred brain shapes without grey or white matter). With their background haze snapped
# (synthetic.snap_background), the 64 px generator after 2000 steps 0.34 / 0.05 fails on precision, and
# after 8000 steps 0.15 / 0.91 / 0.93 passes. Recall is the noisiest figure (a manifold of a few dozen
# images covers little), so its bar is low.
GATE_MAX_FD = 1.5
"""Largest Fréchet distance, as a fraction of the real vectors' total variance."""
GATE_MIN_PRECISION = 0.3
"""Smallest fraction of synthetic images inside the real manifold."""
GATE_MIN_RECALL = 0.1
"""Smallest fraction of real images inside the synthetic manifold (a pool that covers a corner of the real
variety teaches only that corner)."""

SEMANTIC_FIGURES = ("fd", "precision", "recall")
"""The semantic gate's figures that become ``synth_*`` trial metrics and rows of `tskd-tune synth`."""


def pooled(states: np.ndarray) -> np.ndarray:
    """(N, C, h, w) encoder states -> (N, C) float64 vectors, averaged over space (tokens: (N, T, C) -> mean)."""
    x = np.asarray(states, np.float64)
    if x.ndim == 4:
        return x.mean(axis=(2, 3))
    if x.ndim == 3:
        return x.mean(axis=1)
    return x.reshape(len(x), -1)


def semantic_gate(real: np.ndarray, synthetic: np.ndarray) -> tuple[dict, np.ndarray]:
    """The gate's figures for feature vectors ``real`` (N, D) and ``synthetic`` (M, D), with ``passed`` and
    the failed ``reasons``; and, per synthetic vector, whether it lies inside the real manifold."""
    real = np.asarray(real, np.float64)
    synthetic = np.asarray(synthetic, np.float64)
    if len(real) <= K or len(synthetic) <= K:
        raise ValueError(f"the semantic gate needs more than {K} real and synthetic images")
    r, s = project(real, synthetic)
    fd = frechet_distance(r, s) / max(float(np.trace(np.cov(r, rowvar=False))), 1e-12)
    inside = in_manifold(s, r)
    recall = float(in_manifold(r, s).mean())
    gate = {
        "n_real": len(real),
        "n_synthetic": len(synthetic),
        "dims": r.shape[1],
        "fd": float(fd),
        "precision": float(inside.mean()),
        "recall": recall,
    }
    return gate | verdict(gate), inside


def verdict(gate: dict) -> dict:
    """``passed`` and the ``reasons`` it failed, from the figures and today's thresholds (a cached pool's
    figures are judged again when the thresholds change)."""
    reasons = []
    if gate["fd"] > GATE_MAX_FD:
        reasons.append(f"feature Fréchet distance {gate['fd']:.2f} > {GATE_MAX_FD} (of the real variance)")
    if gate["precision"] < GATE_MIN_PRECISION:
        reasons.append(
            f"feature precision {gate['precision']:.2f} < {GATE_MIN_PRECISION}: most images lie outside the "
            "real images' manifold"
        )
    if gate["recall"] < GATE_MIN_RECALL:
        reasons.append(
            f"feature recall {gate['recall']:.2f} < {GATE_MIN_RECALL}: the pool covers little of the real variety"
        )
    return {"passed": not reasons, "reasons": reasons}


def project(real: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """``real`` and ``others`` standardised with ``real``'s statistics and projected onto its first principal
    components (at most ``PCA_DIMS``, at most a quarter of the real vectors)."""
    mean, std = real.mean(0), real.std(0)
    std[std < 1e-12] = 1.0
    z = (real - mean) / std
    dims = max(1, min(PCA_DIMS, len(real) // 4, z.shape[1]))
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    basis = vt[:dims].T
    return (z @ basis, *(((o - mean) / std) @ basis for o in others))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to rows of ``a`` and ``b``."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # tr (S_a S_b)^1/2 = tr (S_a^1/2 S_b S_a^1/2)^1/2, a symmetric PSD matrix: its eigenvalues' roots
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sb @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)


def in_manifold(points: np.ndarray, reference: np.ndarray, k: int = K) -> np.ndarray:
    """Per row of ``points``: inside some ball around a ``reference`` row whose radius is that row's distance
    to its ``k``-th nearest other reference row."""
    ref_d = _distances(reference, reference)
    np.fill_diagonal(ref_d, np.inf)
    radii = np.sort(ref_d, axis=1)[:, k - 1]
    return (_distances(points, reference) <= radii[None, :]).any(axis=1)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d2, 0, None))
