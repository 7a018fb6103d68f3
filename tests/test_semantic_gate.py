"""The semantic gate's figures on constructed feature sets, the per-image filter, and both in a trial."""

import numpy as np
import pytest
import torch

from tskd_tune.data.prepare import load
from tskd_tune.methods.common import confidence
from tskd_tune.synth.semantic import (
    GATE_MAX_FD,
    GATE_MIN_PRECISION,
    GATE_MIN_RECALL,
    frechet_distance,
    in_manifold,
    pooled,
    project,
    semantic_gate,
    verdict,
)
from tskd_tune.trial import run_trial

D = 48


def cloud(rng, n, shift=0.0, scale=1.0):
    """n vectors of a fixed correlated Gaussian (the same mixing matrix for every call)."""
    mix = np.random.default_rng(123).normal(size=(D, D)) / np.sqrt(D)
    return (rng.normal(size=(n, D)) * scale + shift) @ mix


def test_frechet_distance_of_shifted_copies_is_the_squared_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5)) * [1, 2, 3, 0.5, 1]
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-6)
    # scaling one set's spread by s adds (s - 1)^2 tr(S) for these commuting covariances
    s = 2.0
    expected = (s - 1) ** 2 * np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, a * s - a.mean(0) * (s - 1)) == pytest.approx(expected, rel=1e-6)


def test_manifold_balls_use_the_kth_neighbour():
    ref = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    # radii with k=1: 1, 1, 1, 1, 7 (the outlier's nearest is 3.0)
    inside = in_manifold(np.array([[0.5], [6.0], [17.5], [-1.5]]), ref, k=1)
    assert inside.tolist() == [True, True, False, False]


def test_same_distribution_passes_shift_noise_and_collapse_fail_naming_the_figure():
    rng = np.random.default_rng(0)
    real = cloud(rng, 100)
    same, _ = semantic_gate(real, cloud(rng, 128))
    assert same["passed"], same["reasons"]
    assert same["fd"] < GATE_MAX_FD and same["precision"] > 0.8 and same["recall"] > GATE_MIN_RECALL

    shifted, _ = semantic_gate(real, cloud(rng, 128, shift=2.0))
    assert not shifted["passed"] and shifted["fd"] > 1
    assert shifted["reasons"][0].startswith("feature Fréchet distance ")
    assert any(r.startswith("feature precision ") for r in shifted["reasons"])

    # unstructured vectors far larger than the real spread: outside the real manifold
    noise, inside = semantic_gate(real, rng.normal(size=(128, D)) * 4)
    assert noise["precision"] < GATE_MIN_PRECISION and not inside.any()
    assert any(r.startswith("feature precision ") for r in noise["reasons"])

    # a collapsed generator: plausible images (precision 1) that cover a corner of the real variety
    collapsed, inside = semantic_gate(real, real[:3].repeat(40, axis=0) + 1e-3 * rng.normal(size=(120, D)))
    assert collapsed["precision"] == 1.0 and inside.all()
    assert collapsed["recall"] < GATE_MIN_RECALL
    assert any(r.startswith("feature recall ") for r in collapsed["reasons"])


def test_the_verdict_is_drawn_from_the_figures_with_todays_thresholds():
    """A pool's figures are cached; passed and reasons are judged when read (thresholds were changed once)."""
    inside = {
        "fd": GATE_MAX_FD - 0.1,
        "precision": GATE_MIN_PRECISION + 0.05,
        "recall": GATE_MIN_RECALL + 0.01,
    }
    assert verdict(inside) == {"passed": True, "reasons": []}
    far = verdict(inside | {"fd": GATE_MAX_FD + 0.1})
    assert not far["passed"] and far["reasons"] == [
        f"feature Fréchet distance {GATE_MAX_FD + 0.1:.2f} > {GATE_MAX_FD} (of the real variance)"
    ]


def test_projection_is_fitted_on_the_real_set_and_sized_by_it():
    rng = np.random.default_rng(1)
    real, other = cloud(rng, 40), cloud(rng, 7)
    r, o = project(real, other)
    assert r.shape == (40, 10) and o.shape == (7, 10)  # a quarter of the real vectors
    assert np.allclose(r.mean(0), 0, atol=1e-9)  # centred on the real mean
    with pytest.raises(ValueError, match="more than 3"):
        semantic_gate(real[:3], other)


def test_pooled_averages_space_or_tokens():
    maps = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    assert np.allclose(pooled(maps), maps.mean((2, 3)))
    tokens = np.ones((2, 5, 3))
    assert pooled(tokens).shape == (2, 3)


def test_confidence_is_the_mean_max_softmax():
    logits = np.zeros((3, 4, 2, 2), np.float16)
    logits[1, 2] = 20  # certain of class 2 everywhere
    logits[2, 0, 0, 0] = 20  # certain on one pixel of four, undecided on the rest
    c = confidence(logits, np.array([0, 1, 2]))
    assert c == pytest.approx([0.25, 1.0, (1 + 3 * 0.25) / 4], abs=1e-3)


def test_trial_measures_its_pool_in_feature_space_and_filters_it(tiny):
    synth = {
        "generator": "ddpm",
        "image_size": 16,
        "channels": [8, 16],
        "train_steps": 2,
        "batch_size": 4,
        "sample_steps": 2,
        "pool_size": 24,
        "ratio": 1.0,
    }
    base = run_trial(tiny(synthetic=synth, student={"epochs": 1}, teacher={"epochs": 2}))
    for k in ("synth_fd", "synth_precision", "synth_recall", "synth_semantic_passed"):
        assert k in base, k
    assert "synth_kept" not in base  # no filter: every drawn image is used
    drawn = base["transfer_synthetic"]

    kept = {}
    for mode in ("manifold", "confidence", "both"):
        cfg = tiny(
            synthetic=synth | {"filter": mode, "min_confidence": 0.6},
            student={"epochs": 1},
            teacher={"epochs": 2},
        )
        result = run_trial(cfg)
        assert result["synth_drawn"] == drawn and 0 <= result["synth_kept"] <= drawn
        kept[mode] = result["synth_kept"]
        # the semantic gate is computed once per pool and encoder: the figures are the same in every trial
        assert result["synth_fd"] == base["synth_fd"]
    # "both" keeps exactly the images both criteria keep: never more than either
    assert kept["both"] <= min(kept["manifold"], kept["confidence"])
    # the manifold flags are the gate's: the kept count is the precision of the drawn images
    prepared, splits = load(cfg)
    from tskd_tune.cache import Store
    from tskd_tune.synth import build_pool, pool_semantics
    from tskd_tune.transfer import build_transfer_set

    pool = build_pool(cfg, prepared, splits, Store(cfg.cache.dir), torch.device("cpu"))
    sem = pool_semantics(cfg, prepared, splits, pool, Store(cfg.cache.dir), torch.device("cpu"))
    assert sem["cached"] is True and sem["inside"].shape == (24,)
    transfer = build_transfer_set(splits, pool, cfg)
    assert kept["manifold"] == int(sem["inside"][transfer.synthetic].sum())


def test_a_confidence_threshold_of_1_keeps_no_synthetic_image_and_the_trial_still_runs(tiny):
    synth = {
        "generator": "ddpm",
        "image_size": 16,
        "channels": [8, 16],
        "train_steps": 2,
        "batch_size": 4,
        "sample_steps": 2,
        "pool_size": 8,
        "ratio": 1.0,
        "filter": "confidence",
        "min_confidence": 1.0,
    }
    result = run_trial(tiny(synthetic=synth, student={"epochs": 1}, teacher={"epochs": 2}))
    assert result["synth_kept"] == 0 and result["synth_drawn"] == result["transfer_synthetic"] > 0
    assert np.isfinite(result["val_dice"])


def test_the_filter_and_its_threshold_are_searchable_knobs(tiny):
    import optuna

    from tskd_tune.space import to_optuna

    cfg = tiny(
        search={
            "space": {
                "synthetic.filter": {"type": "choice", "values": ["none", "confidence", "both"]},
                "synthetic.min_confidence": {"type": "uniform", "low": 0.5, "high": 0.99},
            }
        }
    )
    dists = to_optuna(cfg.search.space)
    assert isinstance(dists["synthetic.filter"], optuna.distributions.CategoricalDistribution)
    assert dists["synthetic.min_confidence"].high == 0.99
