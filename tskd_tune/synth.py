"""Synthetic transfer images: a diffusion generator (trained here or loaded from disk) and a cached pool.

- generator ``ddpm``: a small diffusers ``UNet2DModel`` trained with ``DDPMScheduler`` on every training
  image of the dataset (labelled and unlabelled; never val/test) at ``synthetic.image_size``, with an
  EMA of its weights, bf16 autocast on CUDA; it is saved as a ``DDPMPipeline`` folder in the cache, so a
  trained generator can also be reused as ``pretrained``.
- generator ``pretrained``: a local diffusers pipeline folder holding an unconditional ``UNet2DModel``
  and its scheduler (e.g. ``DDPMPipeline.save_pretrained``); loaded with ``local_files_only``.

Either is sampled with DDIM or DPM-Solver++ into a pool of ``synthetic.pool_size`` images at the data's
resolution and channels. Generator and pool are entries of the content-addressed store (kinds
``generator`` and ``synth_pool``), keyed by the data identity, the training images, the generator
config and the seed; ``synthetic.ratio`` is not in the key, so trials with any ratio share one pool.

A cheap quality gate compares the pool with the real training images (per-image mean and std, the
pooled intensity histogram, pixel-to-pixel roughness, nearest-real-neighbour distances); a failing pool
is logged as a warning and marked in the trial metrics (``synth_gate_passed: false``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tskd_tune.cache import Store, digest
from tskd_tune.config import Config, SyntheticConfig
from tskd_tune.data.prepare import Prepared, Splits, take_rows
from tskd_tune.errors import TskdError
from tskd_tune.train import seeded

# a safety belt: nothing here may reach the Hugging Face Hub (pipelines load with local_files_only too)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total); phases: ``train`` (generator steps) and ``sample`` (pool images)."""

VERSION = 1
"""Bumped when training or sampling changes, so older cache entries are not reused."""
TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"  # the cosine schedule keeps small images from being noised too fast
# v-prediction: with epsilon-prediction the first sampling steps (almost pure noise) estimate the image
# badly, and a briefly trained model's samples drift in overall brightness
PREDICTION = "v_prediction"
SAMPLE_BATCH = 64
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
"""Largest median synthetic-to-nearest-real distance, relative to the real images' own median nearest
neighbour distance: images farther from every real image than real images are from each other are off
the data distribution."""
COPY_FACTOR = 0.5
"""A synthetic image closer to a real one than half the real images' median nearest-neighbour distance
counts as a memorised copy."""
GATE_MAX_COPY_FRACTION = 0.5
"""A pool that is mostly copies of training images adds little to the transfer set."""


@dataclass
class Pool:
    """A pool of synthetic images (N, C, S, S) float16 in [0, 1], memory-mapped, with its gate figures."""

    images: np.ndarray
    path: Path
    key: str
    cached: bool
    gate: dict
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def metrics(self) -> dict:
        """The pool's figures as flat ``synth_*`` trial metrics."""
        g = self.gate
        out = {
            "synth_pool": len(self),
            "synth_cached": self.cached,
            "synth_gate_passed": bool(g["passed"]),
            "synth_gate_reasons": "; ".join(g["reasons"]),
        }
        out |= {f"synth_{k}": g[k] for k in GATE_FIGURES}
        return out


GATE_FIGURES = ("mean_real", "mean_synth", "std_real", "std_synth", "mean_distance", "std_distance",
                "hist_distance", "roughness_ratio", "nn_distance", "nn_real", "nn_ratio", "copies")  # fmt: skip


# ---------------------------------------------------------------------------------------- keys
def training_indices(splits: Splits) -> np.ndarray:
    """The images a generator may learn from: every training image (labelled and unlabelled), sorted."""
    return np.sort(np.concatenate([splits.labeled, splits.unlabeled])).astype(np.int64)


def generator_size(cfg: Config) -> int:
    """Side length the ``ddpm`` generator trains and samples at."""
    return cfg.synthetic.image_size or cfg.data.image_size


def generator_key(cfg: Config, prepared: Prepared, splits: Splits) -> dict:
    """Exactly what determines the generator: data, training images, generator config, seed."""
    gc = cfg.synthetic
    key = {
        "kind": "generator",
        "version": VERSION,
        "data": prepared.path.name,
        "train": digest(training_indices(splits).tolist()),
        "generator": gc.generator,
        "seed": cfg.seed,
    }
    if gc.generator == "pretrained":
        return key | {"pretrained": pipeline_fingerprint(_pretrained_path(gc))}
    train_fields = {
        "channels",
        "attention",
        "batch_size",
        "lr",
        "ema_decay",
        "train_steps",
        "mixed_precision",
    }
    return key | {
        "ddpm": gc.model_dump(mode="json", include=train_fields),
        "image_size": generator_size(cfg),
        "timesteps": TRAIN_TIMESTEPS,
        "beta_schedule": BETA_SCHEDULE,
        "prediction": PREDICTION,
    }


def pool_key(cfg: Config, prepared: Prepared, splits: Splits) -> dict:
    """The generator's key plus what sampling adds; ``synthetic.ratio`` is deliberately not in it."""
    gc = cfg.synthetic
    return generator_key(cfg, prepared, splits) | {
        "kind": "synth_pool",
        "pool_size": gc.pool_size,
        "sampler": gc.sampler,
        "sample_steps": gc.sample_steps,
        "out": [cfg.data.channels, cfg.data.image_size],
    }


def pipeline_fingerprint(path: Path) -> list:
    """Names, sizes and modification times of a pipeline folder's files (an edit changes the pool)."""
    rows = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            rows.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
    return [str(path.resolve()), digest(rows)]


def _pretrained_path(gc: SyntheticConfig) -> Path:
    where = "synthetic.pretrained_path"
    if gc.pretrained_path is None:
        raise TskdError(f"{where}: required when synthetic.generator is pretrained")
    path = Path(gc.pretrained_path)
    if not path.exists():
        raise TskdError(f"{where}: {path}: not found")
    if not (path / "model_index.json").is_file():
        raise TskdError(f"{where}: {path}: not a diffusers pipeline folder (no model_index.json)")
    return path


# ---------------------------------------------------------------------------------------- pool
def uses_pool(cfg: Config) -> bool:
    """Whether a trial of ``cfg`` draws synthetic images (a transfer-set method with ratio > 0)."""
    gc = cfg.synthetic
    return (
        cfg.distill.method in ("ts_kd", "ta_kd")
        and gc.generator != "none"
        and gc.pool_size > 0
        and gc.ratio > 0
    )


def pool_for_search(
    cfg: Config, prepared: Prepared, splits: Splits, use_cache: bool = True, progress: Progress | None = None
) -> Pool | None:
    """Build a search's pool once, before its trials start, when any trial may draw from it (a transfer-set
    method, and ``synthetic.ratio`` > 0 or searched up to > 0); trials then find it in the cache.

    Trials whose generator knobs are themselves searched build their own pools (once each, under a lock).
    """
    gc, space = cfg.synthetic, cfg.search.space
    methods = (
        set(space["distill.method"].boundary_values()) if "distill.method" in space else {cfg.distill.method}
    )
    ratios = space["synthetic.ratio"].boundary_values() if "synthetic.ratio" in space else [gc.ratio]
    if not methods & {"ts_kd", "ta_kd"} or max(ratios) <= 0:
        return None
    return build_pool(cfg, prepared, splits, Store(cfg.cache.dir, use_cache), progress=progress)


def build_pool(
    cfg: Config,
    prepared: Prepared,
    splits: Splits,
    store: Store,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> Pool | None:
    """The synthetic pool for ``cfg`` from the cache, or generated now (training the generator if needed).

    Returns None when ``synthetic.generator`` is none or ``synthetic.pool_size`` is 0. A pool that fails
    the quality gate is returned all the same, with a warning; its ``gate["passed"]`` is False.
    """
    gc = cfg.synthetic
    if gc.generator == "none" or gc.pool_size == 0:
        return None
    if device is None:
        from tskd_tune.trial import resolve_device  # trial imports this module: resolved late

        device = resolve_device(cfg)
    progress = progress or _log_progress
    key_obj = pool_key(cfg, prepared, splits)
    info: dict = {}

    def build(tmp: Path) -> None:
        folder, info["generator_cached"] = _generator(cfg, prepared, splits, store, device, progress)
        unet, sched_config = load_pipeline(folder, _where(gc))
        t0 = time.perf_counter()
        images = np.lib.format.open_memmap(
            tmp / "images.npy",
            mode="w+",
            dtype=np.float16,
            shape=(gc.pool_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size),
        )
        sample_images(unet, sched_config, images, gc, seed=cfg.seed, device=device, progress=progress)
        images.flush()
        info["sample_s"] = time.perf_counter() - t0
        real = take_rows(prepared.images, _spread(training_indices(splits), GATE_MAX_IMAGES))
        gate = quality_gate(np.asarray(images), real, size=min(_sample_size(unet), cfg.data.image_size))
        del images
        (tmp / "gate.json").write_text(json.dumps(gate, indent=1))
        (tmp / "meta.json").write_text(json.dumps(info | {"generator": str(folder)}, indent=1))

    hit = store.get_or_build("synth_pool", key_obj, build)
    gate = json.loads((hit.path / "gate.json").read_text())
    meta = json.loads((hit.path / "meta.json").read_text())
    pool = Pool(
        np.load(hit.path / "images.npy", mmap_mode="r"), hit.path, digest(key_obj), hit.cached, gate, meta
    )
    if not gate["passed"]:
        log.warning(
            "synthetic pool %s FAILED the quality gate (%s): its images do not look like the training "
            "images; train the generator longer (synthetic.train_steps) or set synthetic.ratio: 0",
            hit.path,
            "; ".join(gate["reasons"]),
        )
    return pool


def _where(gc: SyntheticConfig) -> str:
    return "synthetic.pretrained_path" if gc.generator == "pretrained" else "synthetic (trained generator)"


def _generator(
    cfg: Config, prepared: Prepared, splits: Splits, store: Store, device: torch.device, progress: Progress
) -> tuple[Path, bool]:
    """The generator's pipeline folder: the user's (``pretrained``) or a cached, trained ``ddpm``."""
    gc = cfg.synthetic
    if gc.generator == "pretrained":
        return _pretrained_path(gc), True

    def build(tmp: Path) -> None:
        from diffusers import DDPMPipeline

        size = generator_size(cfg)
        real = take_rows(prepared.images, training_indices(splits))
        x = torch.from_numpy(real)
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        unet, scheduler, stats = train_generator(
            x.clamp(0, 1), gc, seed=cfg.seed, device=device, progress=progress
        )
        DDPMPipeline(unet=unet.cpu(), scheduler=scheduler).save_pretrained(str(tmp))
        (tmp / "training.json").write_text(json.dumps(stats, indent=1))

    hit = store.get_or_build("generator", generator_key(cfg, prepared, splits), build)
    return hit.path, hit.cached


# ------------------------------------------------------------------------------------ training
def make_unet(gc: SyntheticConfig, channels: int, size: int):
    """The ``ddpm`` generator's UNet2DModel: ``gc.channels`` per level, attention at the lowest if asked."""
    from diffusers import UNet2DModel

    levels = len(gc.channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if gc.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in gc.channels))
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(gc.channels),
        layers_per_block=1,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=groups,
        attention_head_dim=min(8, min(gc.channels)),
    )


def train_generator(
    images: torch.Tensor,
    gc: SyntheticConfig,
    *,
    seed: int,
    device: torch.device,
    progress: Progress | None = None,
):
    """Train a UNet2DModel on ``images`` (N, C, S, S) in [0, 1] with the DDPM noise-prediction loss.

    Batches, flips, noise and timesteps come from one CPU generator seeded with ``seed``, so a run is
    reproducible; the returned UNet holds the EMA weights (when ``gc.ema_decay`` > 0).
    """
    from diffusers import DDPMScheduler

    n, c, size = images.shape[0], images.shape[1], images.shape[-1]
    with seeded(seed):
        unet = make_unet(gc, c, size)
    unet.to(device).train()
    scheduler = DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE, prediction_type=PREDICTION
    )
    data = (images.float() * 2 - 1).to(device)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=gc.lr, weight_decay=0.0)
    warmup = max(1, min(200, gc.train_steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(s, gc.train_steps) / gc.train_steps))
        ),
    )
    ema = [p.detach().clone().float() for p in params] if gc.ema_decay > 0 else None
    amp = gc.mixed_precision and device.type == "cuda"
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(gc.train_steps):
        idx = torch.randint(n, (gc.batch_size,), generator=g)
        flip = torch.rand(gc.batch_size, generator=g) < 0.5
        x = data[idx.to(device)]
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        noise = torch.randn(x.shape, generator=g).to(device)
        t = torch.randint(TRAIN_TIMESTEPS, (gc.batch_size,), generator=g).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            pred = unet(scheduler.add_noise(x, noise, t), t).sample
        target = noise if PREDICTION == "epsilon" else scheduler.get_velocity(x, noise, t)
        loss = F.mse_loss(pred.float(), target)
        if not torch.isfinite(loss):
            raise TskdError(
                f"synthetic: generator loss became {loss.item()} at step {step + 1}; lower synthetic.lr"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            # the usual warm-up (as in diffusers' EMAModel): early weights are not averaged in for long
            decay = min(gc.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, params, strict=True):
                    e.lerp_(p.detach().float(), 1 - decay)
        losses.append(loss.item())
        if progress is not None:
            progress("train", step + 1, gc.train_steps)
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                p.copy_(e)
    unet.eval()
    k = max(1, len(losses) // 10)
    stats = {
        "steps": gc.train_steps,
        "images": n,
        "image_size": size,
        "params": sum(p.numel() for p in params),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "train_s": time.perf_counter() - t0,
        "device": device.type,
        "mixed_precision": amp,
    }
    return unet, scheduler, stats


# ------------------------------------------------------------------------------------ sampling
def load_pipeline(path: Path, where: str = "synthetic.pretrained_path"):
    """(UNet2DModel, scheduler config) of a local diffusers pipeline folder; never downloads."""
    import diffusers
    from diffusers import DiffusionPipeline, UNet2DModel

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    path = Path(path)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loading problem is the user's folder, reported in one line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise TskdError(
            f"{where}: {path}: cannot load the diffusers pipeline ({exc.__class__.__name__}: {first})"
        ) from None
    unet, scheduler = getattr(pipe, "unet", None), getattr(pipe, "scheduler", None)
    if not isinstance(unet, UNet2DModel) or scheduler is None:
        raise TskdError(
            f"{where}: {path}: {type(pipe).__name__} is not an unconditional UNet2DModel pipeline (such as DDPMPipeline)"
        )
    return unet, dict(scheduler.config)


def sample_images(
    unet,
    scheduler_config: dict,
    out: np.ndarray,
    gc: SyntheticConfig,
    *,
    seed: int,
    device: torch.device,
    progress: Progress | None = None,
) -> None:
    """Fill ``out`` (N, C, S, S) with samples in [0, 1], converted to C channels and resized to S."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    kind = DDIMScheduler if gc.sampler == "ddim" else DPMSolverMultistepScheduler
    # trailing spacing starts from the last training timestep: better samples at few steps
    scheduler = kind.from_config(scheduler_config, timestep_spacing="trailing")
    unet = unet.to(device).eval()
    size = _sample_size(unet)
    cin = unet.config.in_channels
    n, c, s = out.shape[0], out.shape[1], out.shape[-1]
    amp = gc.mixed_precision and device.type == "cuda"
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for start in range(0, n, SAMPLE_BATCH):
            b = min(SAMPLE_BATCH, n - start)
            x = torch.randn((b, cin, size, size), generator=g).to(device) * scheduler.init_noise_sigma
            scheduler.set_timesteps(gc.sample_steps, device=device)
            for t in scheduler.timesteps:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    pred = unet(scheduler.scale_model_input(x, t), t).sample
                x = scheduler.step(pred.float(), t, x).prev_sample
            img = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
            img = _convert_channels(img, c)
            if size != s:
                img = F.interpolate(
                    img, size=(s, s), mode="bilinear", antialias=s < size, align_corners=False
                )
            out[start : start + b] = img.clamp(0, 1).numpy().astype(np.float16)
            if progress is not None:
                progress("sample", start + b, n)


def _sample_size(unet) -> int:
    size = unet.config.sample_size
    return size if isinstance(size, int) else size[0]


def _convert_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    if x.shape[1] == c:
        return x
    if c == 1 and x.shape[1] == 3:
        return (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if c == 3 and x.shape[1] == 1:
        return x.repeat(1, 3, 1, 1)
    raise TskdError(f"synthetic: the generator makes {x.shape[1]}-channel images; data.channels is {c}")


# ---------------------------------------------------------------------------------- quality gate
def quality_gate(synthetic: np.ndarray, real: np.ndarray, size: int | None = None) -> dict:
    """Cheap checks that synthetic images look like real ones; ``passed`` and the failed ``reasons``.

    With ``size`` (the generator's resolution) both sets are first area-downsampled to it, so the blur
    of upsampling a low-resolution generator's samples is not held against them.

    Figures (intensities in [0, 1]): average per-image mean and std of each set; Wasserstein-1 distances
    between the per-image means and between the per-image stds; the earth mover's distance between the
    pooled intensity histograms; the roughness ratio (mean absolute difference of neighbouring pixels,
    synthetic / real); the median distance (RMS, at <= 32 px) from each synthetic image to its nearest
    real image (``nn_distance``) against the real images' own median nearest-neighbour distance
    (``nn_real``), their ratio, and the number of synthetic images that are near-copies of a real one.
    """
    s = _resized(np.asarray(synthetic[_spread(np.arange(len(synthetic)), GATE_MAX_IMAGES)], np.float32), size)
    r = _resized(np.asarray(real[_spread(np.arange(len(real)), GATE_MAX_IMAGES)], np.float32), size)
    s_mean, r_mean = s.mean(axis=(1, 2, 3)), r.mean(axis=(1, 2, 3))
    s_std, r_std = s.std(axis=(1, 2, 3)), r.std(axis=(1, 2, 3))
    bins = np.linspace(0, 1, 65)
    hs = np.histogram(s, bins)[0] / s.size
    hr = np.histogram(r, bins)[0] / r.size
    hist_distance = float(np.abs(np.cumsum(hs) - np.cumsum(hr)).sum() * (bins[1] - bins[0]))
    nn_synth = _nn_distances(_small(s), _small(r))
    nn_real = _nn_distances(_small(r), _small(r), exclude_self=True)
    nn_real_median = float(np.median(nn_real)) if len(nn_real) else float("nan")
    copies = int((nn_synth < COPY_FACTOR * nn_real_median).sum())
    gate = {
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


def _spread(indices: np.ndarray, limit: int) -> np.ndarray:
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


def _nn_distances(a: np.ndarray, b: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """For each row of ``a``, the RMS distance to its nearest row of ``b`` (itself excluded if asked)."""
    if exclude_self and len(b) < 2:
        return np.zeros(0, np.float32)
    bb = (b.astype(np.float64) ** 2).sum(1)
    out = np.empty(len(a))
    for start in range(0, len(a), 256):
        chunk = a[start : start + 256].astype(np.float64)
        d2 = (chunk**2).sum(1)[:, None] + bb[None, :] - 2 * chunk @ b.T.astype(np.float64)
        if exclude_self:
            d2[np.arange(len(chunk)), np.arange(start, start + len(chunk))] = np.inf
        out[start : start + len(chunk)] = d2.min(1)
    return np.sqrt(np.maximum(out, 0) / a.shape[1])


# ------------------------------------------------------------------------- command-line helpers
def _log_progress(phase: str, done: int, total: int) -> None:
    """Default progress in logs (trials, searches): a line every 10%."""
    step = max(1, total // 10)
    if done == total or done % step == 0:
        what = "generator training step" if phase == "train" else "synthetic image"
        log.info("synthetic: %s %d/%d", what, done, total)


@contextmanager
def progress_bar(console=None) -> Iterator[Progress]:
    """A rich progress bar (one line per phase) as a ``Progress`` callback."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    labels = {"train": "training generator", "sample": "sampling pool"}
    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
             TimeRemainingColumn(), console=console) as bar:  # fmt: skip
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(labels.get(phase, phase), total=total)
            bar.update(tasks[phase], completed=done)

        yield update


def sample_grid(
    pool: Pool, prepared: Prepared, splits: Splits, path: Path, n: int = 16, columns: int = 4
) -> Path:
    """A PNG: ``n`` synthetic images (left) next to ``n`` real training images (right); written atomically."""
    from PIL import Image, ImageDraw

    def tiles(images: np.ndarray) -> np.ndarray:
        rgb = np.repeat(images, 3, axis=1) if images.shape[1] == 1 else images
        rgb = (np.clip(np.asarray(rgb, np.float32), 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
        rows = []
        for start in range(0, n, columns):
            row = list(rgb[start : start + columns])
            row += [np.zeros_like(rgb[0])] * (columns - len(row))
            rows.append(np.concatenate(row, axis=1))
        return np.concatenate(rows, axis=0)

    synth = tiles(np.asarray(pool.images[_spread(np.arange(len(pool)), n)]))
    real = tiles(take_rows(prepared.images, _spread(training_indices(splits), n)))
    gap = np.full((synth.shape[0], max(4, synth.shape[1] // 32), 3), 255, np.uint8)
    grid = np.concatenate([synth, gap, real], axis=1)
    scale = max(1, 128 // prepared.images.shape[-1])
    picture = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    head = 14
    canvas = Image.new("RGB", (picture.width, picture.height + head), "white")
    canvas.paste(picture, (0, head))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), f"synthetic ({len(pool)} in the pool)", fill="black")
    draw.text(((synth.shape[1] + gap.shape[1]) * scale + 2, 1), "real (training images)", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def synth_command(cfg: Config, out_dir: Path, use_cache: bool = True, console=None) -> dict:
    """`tskd-tune synth`: train or load the generator, fill the pool (progress bar), write grid.png and gate.json."""
    from tskd_tune.data.prepare import load
    from tskd_tune.trial import resolve_device

    gc = cfg.synthetic
    if gc.generator == "none":
        raise TskdError(
            "synthetic.generator: is none, so there is nothing to generate (set ddpm or pretrained)"
        )
    if gc.pool_size == 0:
        raise TskdError("synthetic.pool_size: is 0, so there is nothing to generate")
    if cfg.resources.threads:
        torch.set_num_threads(cfg.resources.threads)
    if gc.generator == "pretrained":
        _pretrained_path(gc)  # a bad path fails before the data is prepared
    t0 = time.perf_counter()
    prepared, splits = load(cfg, use_cache=use_cache)
    store = Store(cfg.cache.dir, enabled=use_cache)
    pool_key(cfg, prepared, splits)  # a bad pretrained_path fails here, before the progress bar starts
    with progress_bar(console) as progress:
        pool = build_pool(cfg, prepared, splits, store, resolve_device(cfg), progress)
    assert pool is not None
    grid = sample_grid(pool, prepared, splits, Path(out_dir) / "grid.png")
    summary = {
        "pool": str(pool.path),
        "images": len(pool),
        "shape": list(pool.images.shape[1:]),
        "cached": pool.cached,
        "generator": gc.generator,
        "generator_image_size": generator_size(cfg) if gc.generator == "ddpm" else None,
        "grid": str(grid),
        "gate": pool.gate,
        "synth_s": time.perf_counter() - t0,
    } | {k: v for k, v in pool.info.items() if k != "generator"}
    training = Path(pool.info.get("generator", "")) / "training.json"
    if gc.generator == "ddpm" and training.is_file():
        summary["training"] = json.loads(training.read_text())
    path = Path(out_dir) / "gate.json"
    tmp = path.with_name(".gate.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)
    return summary


def print_summary(summary: dict, console) -> None:
    """Human-readable `tskd-tune synth` output: the pool, the gate's figures, and a warning if it failed."""
    from rich.table import Table

    gate = summary["gate"]
    state = "reused from the cache" if summary["cached"] else "built now"
    c, s, _ = summary["shape"]
    console.print(f"pool: {summary['images']} synthetic images ({c}x{s}x{s}), {state}: {summary['pool']}")
    if summary.get("training"):
        t = summary["training"]
        console.print(
            f"generator: {t['params'] / 1e6:.2f}M-parameter UNet2DModel trained {t['steps']} steps at "
            f"{t['image_size']}x{t['image_size']} on {t['images']} training images in {t['train_s']:.0f}s "
            f"(loss {t['loss_first']:.3f} -> {t['loss_last']:.3f})"
        )
    table = Table(
        "figure", "value", title="quality gate (synthetic vs real training images)", title_justify="left"
    )
    for k in GATE_FIGURES:
        v = gate[k]
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    if gate["passed"]:
        console.print("[green]quality gate passed[/green]")
    else:
        console.print(f"[yellow]warning: quality gate FAILED: {'; '.join(gate['reasons'])}[/yellow]")
    console.print(f"grid (synthetic | real): {summary['grid']}")
