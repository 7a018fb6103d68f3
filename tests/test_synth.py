"""Synthetic transfer data: a tiny UNet2DModel generator, the cached pool, the ratio, the quality gate."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tskd_tune.cache import MANIFEST, Store, digest, write_manifest
from tskd_tune.config import validate
from tskd_tune.data.prepare import load
from tskd_tune.errors import ConfigError, TskdError
from tskd_tune.methods.checks import search_uses_transfer, uses_pool
from tskd_tune.synth import (
    GATE_FIGURES,
    Pool,
    build_pool,
    generator_key,
    make_unet,
    pool_for_search,
    pool_key,
    pool_semantics,
    quality_gate,
    snap_background,
    training_indices,
)
from tskd_tune.transfer import build_transfer_set, draw_synthetic, synthetic_count
from tskd_tune.trial import run_trial

# a 2-level UNet2DModel at 16 px (upsampled to the data's 32 px), a few steps: seconds, not minutes
TINY_SYNTH = {
    "generator": "ddpm",
    "image_size": 16,
    "channels": [8, 16],
    "train_steps": 2,
    "batch_size": 4,
    "sample_steps": 2,
    "pool_size": 8,
    "ratio": 1.0,
}
CPU = torch.device("cpu")
# each of the gate's reasons starts with the check that failed; the figure it is about
CHECKS = {
    "mean intensity distance": "mean_distance",
    "intensity std distance": "std_distance",
    "histogram distance": "hist_distance",
    "roughness ratio": "roughness_ratio",
    "nearest-real distance": "nn_ratio",
}


def _failed(gate: dict) -> list[str]:
    """The figures a gate's reasons name, in order (``copies`` for the memorisation reason)."""
    out = []
    for reason in gate["reasons"]:
        named = [figure for check, figure in CHECKS.items() if reason.startswith(check + " ")]
        out += named or (["copies"] if reason.endswith("(memorised)") else [reason])
    return out


def _pool(cfg, store=None):
    prepared, splits = load(cfg)
    return build_pool(cfg, prepared, splits, store or Store(cfg.cache.dir), CPU), prepared, splits


def test_pool_has_the_data_shape_and_range_and_gate_figures(tiny):
    cfg = tiny(synthetic=TINY_SYNTH)
    pool, prepared, _ = _pool(cfg)
    assert pool.images.shape == (8, 1, 32, 32) and pool.images.dtype == np.float16
    assert pool.images.min() >= 0 and pool.images.max() <= 1
    assert isinstance(pool.images, np.memmap) and (pool.path / "images.npy").is_file()
    assert not pool.cached and pool.info["generator_cached"] is False
    assert pool.gate["n_synthetic"] == 8 and pool.gate["size"] == 16  # compared at the generator's 16 px
    # two training steps make noise, not phantoms: too bright, too rough (its darkest pixels snapped to the
    # phantom's exact background), and far from every real image
    assert pool.gate["passed"] is False
    assert _failed(pool.gate) == ["mean_distance", "hist_distance", "roughness_ratio", "nn_ratio"], pool.gate[
        "reasons"
    ]
    background = float((np.asarray(prepared.images) == 0).mean())
    assert pool.info["background_snapped"] == pytest.approx(background, abs=0.02) and background > 0.05
    assert (np.asarray(pool.images) == 0).mean() == pytest.approx(background, abs=0.02)
    assert pool.gate == json.loads((pool.path / "gate.json").read_text())
    # the entry holds its picture (what a search's report shows): 4x4 synthetic | gap | 4x4 real, 4x larger
    assert Image.open(pool.path / "grid.png").size == ((128 + 4 + 128) * 4, 128 * 4 + 14)
    metrics = pool.metrics()
    assert metrics == {
        "synth_pool": 8,
        "synth_pool_dir": str(pool.path),
        "synth_cached": False,
        "synth_gate_passed": False,
        "synth_gate_reasons": "; ".join(pool.gate["reasons"]),
    } | {f"synth_{k}": pool.gate[k] for k in GATE_FIGURES}
    (training_json,) = (cfg.cache.dir / "generator").glob("*/training.json")
    training = json.loads(training_json.read_text())
    assert training["steps"] == 2 and training["image_size"] == 16
    assert training["images"] == len(training_indices(load(cfg)[1]))  # labelled + unlabelled, no val/test


def test_snapping_turns_a_samplers_haze_back_into_the_real_background():
    """Real slices: a background of exact zeros (about 70% of the pixels) around tissue of varying extent.
    The sampled ones: the same with the haze a sampler leaves (+0.011 +- 0.005)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    radius = rng.uniform(6, 12, 40)[:, None, None]
    tissue = ((yy - 16) ** 2 + (xx - 16) ** 2 < radius**2) * rng.uniform(0.4, 1.0, (40, 32, 32))
    real = tissue[:, None].astype(np.float32)
    synth = np.clip(real + rng.normal(0.011, 0.005, real.shape), 0, 1).astype(np.float16)
    before = synth.copy()
    assert (synth == 0).mean() < 0.05
    share = snap_background(synth, real)
    assert share == pytest.approx((real == 0).mean())
    assert synth.dtype == np.float16 and abs((synth == 0).mean() - share) < 0.01  # exact zeros again
    # the tissue is untouched, and each image keeps its own amount of background
    inside = real > 0
    assert np.array_equal(synth[inside], before[inside])
    assert np.corrcoef((synth == 0).mean((1, 2, 3)), (real == 0).mean((1, 2, 3)))[0, 1] > 0.99
    # real images without a background of one value (noise everywhere): nothing is snapped
    noisy = rng.uniform(0, 1, real.shape).astype(np.float32)
    kept = before.copy()
    assert snap_background(kept, noisy) is None and np.array_equal(kept, before)


def test_the_snap_is_part_of_the_pools_key(tiny):
    cfg = tiny(synthetic=TINY_SYNTH)
    prepared, splits = load(cfg)
    keys = {
        digest(pool_key(tiny(synthetic=TINY_SYNTH | {"snap_background": on}), prepared, splits))
        for on in (True, False)
    }
    assert len(keys) == 2
    assert digest(generator_key(cfg, prepared, splits)) == digest(
        generator_key(tiny(synthetic=TINY_SYNTH | {"snap_background": False}), prepared, splits)
    )  # one generator serves both


def test_same_seed_same_pool_other_seed_other_pool(tiny):
    a, _, _ = _pool(tiny(synthetic=TINY_SYNTH), Store("unused", enabled=False))
    b, _, _ = _pool(tiny(synthetic=TINY_SYNTH), Store("unused", enabled=False))
    c, _, _ = _pool(tiny(synthetic=TINY_SYNTH, seed=1), Store("unused", enabled=False))
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)


def test_pool_is_cached_without_the_ratio_and_a_corrupt_entry_is_rebuilt(tiny):
    first, _, _ = _pool(tiny(synthetic=TINY_SYNTH))
    before = np.array(first.images)
    second, _, _ = _pool(tiny(synthetic=TINY_SYNTH | {"ratio": 0.5}))
    assert second.cached and second.path == first.path and second.key == first.key
    assert np.array_equal(second.images, before)

    (first.path / "images.npy").write_bytes(b"truncated")
    third, _, _ = _pool(tiny(synthetic=TINY_SYNTH))
    assert not third.cached and third.info["generator_cached"] is True  # only the pool was rebuilt
    assert np.array_equal(third.images, before)

    bigger, _, _ = _pool(tiny(synthetic=TINY_SYNTH | {"pool_size": 10}))
    assert bigger.path != first.path and bigger.info["generator_cached"] is True
    # the generator's key has its training knobs and the seed, not the sampling or the ratio
    prepared, splits = load(tiny())
    key = lambda **kw: digest(generator_key(tiny(**kw), prepared, splits))  # noqa: E731
    base = key(synthetic=TINY_SYNTH)
    assert base == key(
        synthetic=TINY_SYNTH | {"ratio": 2.0, "pool_size": 3, "sample_steps": 5, "sampler": "dpm"}
    )
    assert base != key(synthetic=TINY_SYNTH | {"train_steps": 3}) and base != key(
        synthetic=TINY_SYNTH, seed=1
    )


def test_no_pool_without_a_generator_or_with_pool_size_0(tiny):
    assert _pool(tiny(synthetic={"ratio": 1.0}))[0] is None
    assert _pool(tiny(synthetic=TINY_SYNTH | {"pool_size": 0}))[0] is None


def test_a_search_builds_the_pool_before_its_trials_when_the_ratio_is_searched(tiny):
    space = {"synthetic.ratio": {"type": "choice", "values": [0.0, 1.0]}}
    cfg = tiny(synthetic=TINY_SYNTH | {"ratio": 0.0}, search={"space": space})
    prepared, splits = load(cfg)
    assert pool_for_search(tiny(synthetic=TINY_SYNTH | {"ratio": 0.0}), prepared, splits) is None
    assert not search_uses_transfer(tiny(synthetic=TINY_SYNTH, distill={"method": "scratch"}))  # none asked
    pool = pool_for_search(cfg, prepared, splits)
    assert pool is not None and not pool.cached
    trial_cfg = tiny(synthetic=TINY_SYNTH | {"ratio": 1.0})  # what a trial with ratio 1 finds
    assert build_pool(trial_cfg, prepared, splits, Store(cfg.cache.dir), CPU).cached


def test_ratio_arithmetic():
    assert synthetic_count(200, 0.0, 256) == 0
    assert synthetic_count(200, 0.5, 256) == 100
    assert synthetic_count(200, 1.0, 256) == 200
    assert synthetic_count(200, 2.0, 256) == 256  # capped by the pool
    assert synthetic_count(5, 0.5, 10) == 3  # rounded half up
    half, full = draw_synthetic(256, 100, seed=0), draw_synthetic(256, 200, seed=0)
    assert len(set(full.tolist())) == 200 and full.max() < 256
    assert set(half.tolist()) <= set(full.tolist())  # a larger ratio adds images, never swaps them
    assert np.array_equal(half, draw_synthetic(256, 100, seed=0))
    assert not np.array_equal(half, draw_synthetic(256, 100, seed=1))


def test_transfer_set_reads_real_then_synthetic_images(tiny):
    cfg = tiny(synthetic={"ratio": 0.5})
    prepared, splits = load(cfg)
    images = np.random.default_rng(0).random((50, 1, 32, 32)).astype(np.float16)
    pool = Pool(images, path=None, key="k", cached=True, gate={})
    transfer = build_transfer_set(splits, pool, cfg)
    n_real = len(splits.labeled) + len(splits.unlabeled)
    assert transfer.counts == {"transfer_real": n_real, "transfer_synthetic": round(0.5 * n_real)}
    assert len(transfer) == n_real + round(0.5 * n_real)
    x = transfer.read(prepared.images, np.array([0, n_real, len(transfer) - 1]))
    assert x.dtype == torch.float32 and x.shape == (3, 1, 32, 32)
    assert np.array_equal(x[0].numpy(), prepared.images[splits.labeled[0]].astype(np.float32))
    assert np.array_equal(x[1].numpy(), images[transfer.synthetic[0]].astype(np.float32))
    assert np.array_equal(x[2].numpy(), images[transfer.synthetic[-1]].astype(np.float32))
    # no pool: the real transfer set, with the same cache key as before synthetic data existed
    plain = build_transfer_set(splits)
    assert plain.counts["transfer_synthetic"] == 0 and np.array_equal(plain.real, transfer.real)
    assert plain.key() == {"transfer": digest(plain.real.tolist())}
    assert transfer.key() == plain.key() | {"pool": "k", "synthetic": digest(transfer.synthetic.tolist())}


def test_gate_passes_real_images_and_rejects_noise_flat_images_and_copies(tiny):
    prepared, splits = load(tiny())
    train = np.asarray(prepared.images[training_indices(splits)], np.float32)
    held_out = np.asarray(prepared.images[np.concatenate([splits.val, splits.test])], np.float32)
    real = quality_gate(held_out, train)
    assert real["passed"] is True and real["reasons"] == [] and real["copies"] == 0, real["reasons"]
    assert (real["n_synthetic"], real["n_real"], real["size"]) == (len(held_out), len(train), 32)
    assert max(real["mean_distance"], real["std_distance"], real["hist_distance"]) < 0.02
    assert 0.9 < real["roughness_ratio"] < 1.1 and 0.9 < real["nn_ratio"] < 1.1

    rng = np.random.default_rng(0)
    uniform = rng.random((64, 1, 32, 32), dtype=np.float32)
    gaussian = np.clip(rng.normal(0.5, 0.5, (64, 1, 32, 32)), 0, 1).astype(np.float32)
    flat = np.full((64, 1, 32, 32), train.mean(), np.float32)
    for name, fake, failed in [
        ("uniform noise", uniform, ["mean_distance", "hist_distance", "roughness_ratio", "nn_ratio"]),
        (
            "gaussian noise",
            gaussian,
            ["mean_distance", "std_distance", "hist_distance", "roughness_ratio", "nn_ratio"],
        ),
        ("flat", flat, ["std_distance", "hist_distance", "roughness_ratio"]),
    ]:
        gate = quality_gate(fake, train)
        assert gate["passed"] is False and _failed(gate) == failed, (name, gate["reasons"])
    noise = quality_gate(uniform, train)
    assert noise["reasons"] == [
        f"mean intensity distance {noise['mean_distance']:.3f} > 0.08",
        f"histogram distance {noise['hist_distance']:.3f} > 0.08",
        f"roughness ratio {noise['roughness_ratio']:.2f} outside [0.4, 2.0]",
        f"nearest-real distance {noise['nn_ratio']:.2f}x the real images' own > 2.0x",
    ]
    # uniform noise is mid-grey on average, much rougher than the phantoms and far from each of them
    assert abs(noise["mean_synth"] - 0.5) < 0.01 and noise["roughness_ratio"] > 4 and noise["nn_ratio"] > 3
    flat_gate = quality_gate(flat, train)  # no structure at all: no contrast, no roughness
    assert flat_gate["std_synth"] == 0.0 and flat_gate["roughness_ratio"] == 0.0
    copies = quality_gate(train[:40], train)
    assert copies["reasons"] == ["40 of 40 images are near-copies of training images (memorised)"]
    assert copies["copies"] == 40 and copies["nn_distance"] == 0.0


def _slice_stacks(volumes: int, slices: int, rng: np.random.Generator) -> np.ndarray:
    """(volumes * slices, 1, 32, 32) smooth images in [0, 1]; the slices of one volume are near-copies."""
    from scipy.ndimage import gaussian_filter

    def field() -> np.ndarray:
        f = gaussian_filter(rng.normal(size=(32, 32)), 3)
        return (f - f.mean()) / f.std()

    out = []
    for _ in range(volumes):
        base, drift = field(), field()
        out += [np.clip(0.5 + 0.15 * (base + 0.05 * k * drift), 0, 1) for k in range(slices)]
    return np.stack(out)[:, None].astype(np.float32)


def test_gate_judges_a_slice_stack_on_the_distance_between_volumes():
    rng = np.random.default_rng(0)
    train = _slice_stacks(24, 6, rng)
    groups = np.repeat(np.arange(24), 6)
    held_out = _slice_stacks(8, 6, rng)  # new volumes: as far from the training ones as those are apart
    flat = quality_gate(held_out, train)  # every training slice its own group: the neighbour is the scale
    assert flat["nn_real"] == flat["nn_self"] < flat["nn_distance"] / 4
    assert _failed(flat) == ["nn_ratio"] and flat["passed"] is False
    stacked = quality_gate(held_out, train, groups=groups)
    assert stacked["passed"] is True and stacked["copies"] == 0, stacked["reasons"]
    assert 0.7 < stacked["nn_ratio"] < 1.5 and stacked["nn_real"] > 4 * stacked["nn_self"]
    assert stacked["nn_self"] == flat["nn_self"] and stacked["version"] == 2
    # a copy is still judged on the neighbouring-slice scale: training slices come back as copies
    copies = quality_gate(train[::6], train, groups=groups)
    assert copies["copies"] == 24 and _failed(copies) == ["copies"]
    # one group only: nothing to measure across, so each image is its own group again
    assert quality_gate(held_out, train, groups=np.zeros(len(train)))["nn_real"] == flat["nn_real"]


def test_a_pool_cached_under_an_older_gate_is_judged_again(tiny):
    cfg = tiny(synthetic=TINY_SYNTH)
    pool, _, _ = _pool(cfg)
    path = pool.path / "gate.json"
    old = {k: v for k, v in pool.gate.items() if k not in ("version", "nn_self")} | {"passed": True}
    path.write_text(json.dumps(old))
    # checksummed again, as the older gate's build left the entry
    write_manifest(pool.path, json.loads((pool.path / MANIFEST).read_text())["key"])
    again, _, _ = _pool(cfg)
    assert again.cached and again.path == pool.path
    assert again.gate == pool.gate and json.loads(path.read_text()) == old  # judged in memory


def test_pretrained_pipeline_round_trip(tiny, tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    cfg = tiny(synthetic=TINY_SYNTH)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = make_unet(cfg.synthetic, channels=3, size=16)  # an RGB pipeline for grey data
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(
        tmp_path / "pipe"
    )
    pre = tiny(
        synthetic={
            "generator": "pretrained",
            "pretrained_path": str(tmp_path / "pipe"),
            "pool_size": 4,
            "sample_steps": 2,
            "ratio": 1.0,
        }
    )
    pool, _, _ = _pool(pre)
    assert pool.images.shape == (4, 1, 32, 32) and not pool.cached
    again, _, _ = _pool(pre)
    assert again.cached and np.array_equal(again.images, pool.images)

    (tmp_path / "empty").mkdir()
    for path, message in [
        (tmp_path / "missing", "not found"),
        (tmp_path / "empty", "not a diffusers pipeline folder (no model_index.json)"),
    ]:
        bad = tiny(synthetic={"generator": "pretrained", "pretrained_path": str(path), "ratio": 1.0})
        with pytest.raises(TskdError) as raised:
            _pool(bad)
        assert str(raised.value) == f"synthetic.pretrained_path: {path}: {message}"


def test_config_checks():
    with pytest.raises(
        ConfigError, match="synthetic.pretrained_path: required when synthetic.generator is pretrained"
    ):
        validate({"synthetic": {"generator": "pretrained"}})
    with pytest.raises(ConfigError, match=r"synthetic.image_size: must be divisible by 4 .*got 30"):
        validate({"synthetic": {"generator": "ddpm", "image_size": 30, "channels": [8, 16, 16]}})


def test_trial_with_ratio_1_distils_on_synthetic_images_and_caches_their_logits(tiny, tmp_path):
    cfg = tiny(synthetic=TINY_SYNTH | {"pool_size": 64}, student={"epochs": 1}, teacher={"epochs": 2})
    result = run_trial(cfg)
    n_real = result["transfer_real"]
    assert result["transfer_synthetic"] == min(64, n_real) > 0
    assert result["synth_s"] > 0 and result["synth_cached"] is False
    # the trial reports its pool's gate as it is cached (the 2-step generator's pool fails it)
    prepared, splits = load(cfg)
    pool = build_pool(cfg, prepared, splits, Store(cfg.cache.dir), CPU)
    assert pool.cached and result["synth_gate_passed"] is False and result["synth_pool"] == 64
    # ... and its semantic gate, computed once (the second call finds it cached)
    pool.semantic = pool_semantics(cfg, prepared, splits, pool, Store(cfg.cache.dir), CPU)
    assert pool.semantic["cached"] is True and result["synth_semantic_passed"] is pool.semantic["passed"]
    expected = pool.metrics() | {"synth_cached": False}  # the first trial built it
    assert {k: result[k] for k in expected} == expected
    logits = [p for p in (tmp_path / "cache" / "logits").iterdir() if not p.name.endswith(".lock")]
    (entry,) = logits
    assert np.load(entry / "outputs.npy", mmap_mode="r").shape[0] == n_real + result["transfer_synthetic"]
    # the logits are keyed by this pool and by the synthetic images drawn from it
    transfer = build_transfer_set(splits, pool, cfg)
    assert transfer.key()["pool"] == pool.key and len(transfer.synthetic) == result["transfer_synthetic"]
    key = json.loads((entry / "MANIFEST.json").read_text())["key"]
    assert {k: key[k] for k in ("transfer", "pool", "synthetic")} == transfer.key()
    again = run_trial(cfg)
    assert (again["synth_cached"], again["logits_cached"], again["teacher_cached"]) == (True, True, True)
    assert again["val_dice"] == result["val_dice"]
    assert not uses_pool(tiny(synthetic=TINY_SYNTH | {"ratio": 0.0}))  # ratio 0: no pool is even loaded
    assert not uses_pool(tiny(synthetic=TINY_SYNTH, distill={"method": "scratch"}))


def test_cli_synth_writes_the_grid_and_the_gate(tmp_path, capsys):
    from tests.conftest import tiny_raw
    from tskd_tune.cli import main

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_raw(tmp_path, synthetic=TINY_SYNTH)))
    assert main(["synth", str(space), "--out", str(tmp_path / "synth"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["shape"], summary["generator"]) == (8, [1, 32, 32], "ddpm")
    assert summary["generator_image_size"] == 16 and summary["cached"] is False
    assert summary["training"]["steps"] == 2 and summary["gate"]["passed"] is False
    # gate.json holds what --json printed; the grid is 4x4 synthetic | gap | 4x4 real tiles of 32 px,
    # drawn 4x larger under a 14 px title line
    assert json.loads((tmp_path / "synth" / "gate.json").read_text()) == summary
    grid = tmp_path / "synth" / "grid.png"
    assert summary["grid"] == str(grid) and Image.open(grid).size == ((128 + 4 + 128) * 4, 128 * 4 + 14)
    assert main(["synth", str(space), "--out", str(tmp_path / "synth")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"pool: 8 synthetic images (1x32x32), reused from the cache: {summary['pool']}"
    assert f"warning: quality gate FAILED: {'; '.join(summary['gate']['reasons'])}" in lines
    assert lines[-1] == f"grid (synthetic | real): {grid}"
    share = summary["background_snapped"]  # the phantom's background is exact zeros
    assert (
        0.05 < share < 1
        and (
            f"background: the pool's darkest {share:.1%} of pixels set to the training images' exact background "
            "(synthetic.snap_background)"
        )
        in lines
    )

    assert (
        main(
            [
                "synth",
                str(space),
                "--set",
                "synthetic.generator=pretrained",
                "--set",
                f"synthetic.pretrained_path={tmp_path}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: synthetic.pretrained_path: {tmp_path}: not a diffusers pipeline folder (no model_index.json)"
    ]


def test_the_generator_runs_and_keys_its_effective_precision(tiny):
    from tskd_tune.runtime import native_bf16
    from tskd_tune.synth.generator import train_generator
    from tskd_tune.synth.pool import precision

    cpu = torch.device("cpu")
    prepared, splits = load(tiny())
    asked, off = tiny(synthetic=TINY_SYNTH), tiny(synthetic=TINY_SYNTH | {"mixed_precision": False})
    native = native_bf16(cpu)
    assert precision(off, cpu) == "fp32" and precision(asked, cpu) == ("bf16" if native else "fp32")
    same = digest(generator_key(asked, prepared, splits)) == digest(generator_key(off, prepared, splits))
    assert same is not native  # a CPU that cannot run bf16 trains one generator for both settings
    images = torch.rand(4, 1, 16, 16)
    _, _, stats = train_generator(images, asked.synthetic, seed=0, device=cpu)
    assert stats["precision"] == precision(asked, cpu) and np.isfinite(stats["loss_last"])


def test_a_pool_built_in_the_other_precision_is_used_not_built_again(tiny):
    # a search's driver (a CPU head node) may build the pool its GPU trials then look for under bf16
    fp32, _, _ = _pool(tiny(synthetic=TINY_SYNTH | {"mixed_precision": False}))
    asked, _, _ = _pool(tiny(synthetic=TINY_SYNTH))
    assert asked.cached and asked.path == fp32.path and asked.key == fp32.key
