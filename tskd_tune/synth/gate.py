"""The synthetic pool's quality gate: cheap checks that its images look like the real training images.

It compares per-image mean and std, the pooled intensity histogram, pixel-to-pixel roughness and
nearest-real-neighbour distances; a failing pool is logged as a warning and marked in the trial metrics
(``synth_gate_passed: false``).

Slices of one volume (or one slab) are near-copies of their neighbours, so the scale a new image is judged
on is the distance from each real image to its nearest real image of **another** group (volume, slab,
patient: ``Prepared.groups``), not to its neighbouring slice: measured on mni152 (docs/BENCHMARKS.md,
synthetic pools), held-back real slices lie 3.0-3.8x their training neighbours' own nearest-neighbour
distance but 0.99-1.32x the distance across slabs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

GATE_VERSION = 2  # 2: the nearest-real scale across groups (a pool cached under 1 is judged again on load)
GATE_MAX_IMAGES = 512  # enough for stable statistics; keeps the gate at a second or two
NN_SIZE = 32  # nearest-neighbour distances at <= 32 px: structure, not speckle, decides what is a copy

# ---- quality-gate thresholds (intensities are in [0, 1]; the gate compares at the generator's own
# resolution). Calibrated on the demo phantom: held-out real images vs the training images score
# <= 0.005 on each distance and 1.0 on each ratio; pure noise (uniform, clipped Gaussian, or Gaussian
# upsampled from 32 px) scores 0.18 on the mean and histogram distances, 2.3-2.9x on roughness and
# 2.5-2.9x on the nearest-real distance; the demo's generator scores about 0.02-0.03 on the distances,
# 0.6 on roughness and 0.9 on the nearest-real distance.
GATE_MAX_MEAN_DISTANCE = 0.08
"""Largest Wasserstein-1 distance between the per-image mean intensities of synthetic and real images."""
GATE_MAX_STD_DISTANCE = 0.08
"""Largest Wasserstein-1 distance between the per-image intensity standard deviations."""
GATE_MAX_HIST_DISTANCE = 0.08
"""Largest earth mover's distance between the pooled intensity histograms (64 bins)."""
GATE_ROUGHNESS_RANGE = (0.4, 2.0)
"""Allowed ratio of mean neighbouring-pixel differences, synthetic / real: noise is far rougher, blurred
mush (an undertrained model's mean image) far smoother."""
GATE_MAX_NN_RATIO = 2.0
"""Largest median synthetic-to-nearest-real distance, relative to the real images' own median distance to
their nearest real image of another group (``nn_real``): images farther from every real image than real
images of different volumes are from each other are off the data distribution."""
COPY_FACTOR = 0.5
"""A synthetic image closer to a real one than half the real images' median nearest-neighbour distance
within the set (``nn_self``, neighbouring slices included) counts as a memorised copy."""
GATE_MAX_COPY_FRACTION = 0.5
"""A pool that is mostly copies of training images adds little to the transfer set."""

GATE_FIGURES = (
    "mean_real",
    "mean_synth",
    "std_real",
    "std_synth",
    "mean_distance",
    "std_distance",
    "hist_distance",
    "roughness_ratio",
    "nn_distance",
    "nn_real",
    "nn_self",
    "nn_ratio",
    "copies",
)
"""The gate's figures that become ``synth_*`` trial metrics and rows of the `tskd-tune synth` table."""


def quality_gate(
    synthetic: np.ndarray,
    real: np.ndarray,
    size: int | None = None,
    groups: np.ndarray | list | None = None,
) -> dict:
    """Cheap checks that synthetic images look like real ones; ``passed`` and the failed ``reasons``.

    With ``size`` (the generator's resolution) both sets are first area-downsampled to it, so the blur
    of upsampling a low-resolution generator's samples is not held against them. ``groups`` (one label per
    real image: its volume, slab or patient) sets the nearest-real scale across groups; without it (or
    with a single group) every real image is its own group.

    Figures (intensities in [0, 1]): average per-image mean and std of each set; Wasserstein-1 distances
    between the per-image means and between the per-image stds; the earth mover's distance between the
    pooled intensity histograms; the roughness ratio (mean absolute difference of neighbouring pixels,
    synthetic / real); the median distance (RMS, at <= 32 px) from each synthetic image to its nearest
    real image (``nn_distance``) against the real images' median distance to their nearest real image of
    another group (``nn_real``), their ratio, the real images' median nearest-neighbour distance within
    the set (``nn_self``) and the number of synthetic images closer than half that to a real one (copies).
    """
    keep = spread(np.arange(len(real)), GATE_MAX_IMAGES)
    s = _resized(np.asarray(synthetic[spread(np.arange(len(synthetic)), GATE_MAX_IMAGES)], np.float32), size)
    r = _resized(np.asarray(real[keep], np.float32), size)
    own = np.arange(len(r))
    g = own if groups is None else np.unique(np.asarray(groups)[keep], return_inverse=True)[1]
    if len(np.unique(g)) < 2:
        g = own
    s_mean, r_mean = s.mean(axis=(1, 2, 3)), r.mean(axis=(1, 2, 3))
    s_std, r_std = s.std(axis=(1, 2, 3)), r.std(axis=(1, 2, 3))
    bins = np.linspace(0, 1, 65)
    hs = np.histogram(s, bins)[0] / s.size
    hr = np.histogram(r, bins)[0] / r.size
    hist_distance = float(np.abs(np.cumsum(hs) - np.cumsum(hr)).sum() * (bins[1] - bins[0]))
    small_r = _small(r)
    nn_synth = _nn_distances(_small(s), small_r)
    nn_real_median = _median(_nn_distances(small_r, small_r, (g, g)))
    nn_self_median = _median(_nn_distances(small_r, small_r, (own, own)))
    copies = int((nn_synth < COPY_FACTOR * nn_self_median).sum())
    gate = {
        "version": GATE_VERSION,
        "n_synthetic": len(s),
        "n_real": len(r),
        "size": s.shape[-1],
        "mean_real": float(r_mean.mean()),
        "mean_synth": float(s_mean.mean()),
        "std_real": float(r_std.mean()),
        "std_synth": float(s_std.mean()),
        "mean_distance": _w1(s_mean, r_mean),
        "std_distance": _w1(s_std, r_std),
        "hist_distance": hist_distance,
        "roughness_ratio": _roughness(s) / max(_roughness(r), 1e-8),
        "nn_distance": float(np.median(nn_synth)),
        "nn_real": nn_real_median,
        "nn_self": nn_self_median,
        "nn_ratio": float(np.median(nn_synth)) / max(nn_real_median, 1e-8),
        "copies": copies,
    }
    reasons = []
    if gate["mean_distance"] > GATE_MAX_MEAN_DISTANCE:
        reasons.append(f"mean intensity distance {gate['mean_distance']:.3f} > {GATE_MAX_MEAN_DISTANCE}")
    if gate["std_distance"] > GATE_MAX_STD_DISTANCE:
        reasons.append(f"intensity std distance {gate['std_distance']:.3f} > {GATE_MAX_STD_DISTANCE}")
    if gate["hist_distance"] > GATE_MAX_HIST_DISTANCE:
        reasons.append(f"histogram distance {gate['hist_distance']:.3f} > {GATE_MAX_HIST_DISTANCE}")
    lo, hi = GATE_ROUGHNESS_RANGE
    if not lo <= gate["roughness_ratio"] <= hi:
        reasons.append(f"roughness ratio {gate['roughness_ratio']:.2f} outside [{lo}, {hi}]")
    if gate["nn_ratio"] > GATE_MAX_NN_RATIO:
        reasons.append(
            f"nearest-real distance {gate['nn_ratio']:.2f}x the real images' own > {GATE_MAX_NN_RATIO}x"
        )
    if copies > GATE_MAX_COPY_FRACTION * len(s):
        reasons.append(f"{copies} of {len(s)} images are near-copies of training images (memorised)")
    return gate | {"passed": not reasons, "reasons": reasons}


def spread(indices: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` of ``indices``, evenly spread (deterministic)."""
    if len(indices) <= limit:
        return indices
    return indices[np.linspace(0, len(indices) - 1, limit).round().astype(int)]


def _w1(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance between two 1-D samples (mean gap between their quantile functions)."""
    q = (np.arange(200) + 0.5) / 200
    return float(np.abs(np.quantile(a, q) - np.quantile(b, q)).mean())


def _roughness(x: np.ndarray) -> float:
    return float((np.abs(np.diff(x, axis=-1)).mean() + np.abs(np.diff(x, axis=-2)).mean()) / 2)


def _resized(x: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or size >= x.shape[-1]:
        return x
    return F.adaptive_avg_pool2d(torch.from_numpy(x), size).numpy()


def _small(x: np.ndarray) -> np.ndarray:
    """(N, C*s*s) float32, area-downsampled to at most NN_SIZE px."""
    t = torch.from_numpy(x)
    if t.shape[-1] > NN_SIZE:
        t = F.adaptive_avg_pool2d(t, NN_SIZE)
    return t.flatten(1).numpy()


def _median(x: np.ndarray) -> float:
    return float(np.median(x)) if len(x) else float("nan")


def _nn_distances(
    a: np.ndarray, b: np.ndarray, groups: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray:
    """For each row of ``a``, the RMS distance to its nearest row of ``b``; with ``groups`` (labels of the
    rows of ``a`` and of ``b``), to its nearest row of another group (rows without one are dropped)."""
    bb = (b.astype(np.float64) ** 2).sum(1)
    out = np.empty(len(a))
    for start in range(0, len(a), 256):
        chunk = a[start : start + 256].astype(np.float64)
        d2 = (chunk**2).sum(1)[:, None] + bb[None, :] - 2 * chunk @ b.T.astype(np.float64)
        if groups is not None:
            d2[groups[0][start : start + 256, None] == groups[1][None, :]] = np.inf
        out[start : start + len(chunk)] = d2.min(1) if len(b) else np.inf
    out = out[np.isfinite(out)]
    return np.sqrt(np.maximum(out, 0) / a.shape[1])
