"""The synthetic pool: its cache keys, and building it (training or loading the generator, sampling, gating).

Generator and pool are entries of the content-addressed store (kinds ``generator`` and ``synth_pool``),
keyed by the data identity, the training images, the generator config and the seed; ``synthetic.ratio``
is not in the key, so trials with any ratio share one pool. A pool that fails the quality gate
(``gate.py``) is returned all the same, with a warning.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tskd_tune.cache import Store, digest, verify
from tskd_tune.config import Config, SyntheticConfig
from tskd_tune.data.prepare import Prepared, Splits, take_rows
from tskd_tune.errors import TskdError
from tskd_tune.faults import beat
from tskd_tune.kinds import generator_kind
from tskd_tune.runtime import resolve_device
from tskd_tune.synth.gate import GATE_FIGURES, GATE_MAX_IMAGES, GATE_VERSION, quality_gate, spread
from tskd_tune.synth.generator import (
    BETA_SCHEDULE,
    PREDICTION,
    TRAIN_TIMESTEPS,
    VERSION,
    Progress,
    load_pipeline,
    sample_images,
    train_generator,
    unet_size,
    uses_bf16,
)
from tskd_tune.synth.grid import sample_grid
from tskd_tune.synth.semantic import (
    MAX_IMAGES,
    PCA_DIMS,
    SEMANTIC_FIGURES,
    K,
    in_manifold,
    pooled,
    project,
    semantic_gate,
    verdict,
)

# the name the log lines carried before synth.py became a package
log = logging.getLogger("tskd_tune.synth")


@dataclass
class Pool:
    """A pool of synthetic images (N, C, S, S) float16 in [0, 1], memory-mapped, with its gate figures."""

    images: np.ndarray
    path: Path
    key: str
    cached: bool
    gate: dict
    info: dict = field(default_factory=dict)
    semantic: dict | None = None
    """The semantic gate (``semantic.pool_semantics``): figures, ``passed``, ``reasons`` and the per-image
    ``inside`` flags; set once the teacher's encoder has seen the pool."""

    def __len__(self) -> int:
        return len(self.images)

    def metrics(self) -> dict:
        """The pool's figures as flat ``synth_*`` trial metrics; the gate passes when both stages pass."""
        g, sem = self.gate, self.semantic
        reasons = list(g["reasons"]) + (list(sem["reasons"]) if sem else [])
        out = {
            "synth_pool": len(self),
            "synth_pool_dir": str(self.path),
            "synth_cached": self.cached,
            "synth_gate_passed": bool(g["passed"]) and (sem is None or bool(sem["passed"])),
            "synth_gate_reasons": "; ".join(reasons),
        }
        out |= {f"synth_{k}": g[k] for k in GATE_FIGURES}
        if sem is not None:
            out |= {f"synth_{k}": sem[k] for k in SEMANTIC_FIGURES}
            out["synth_semantic_passed"] = bool(sem["passed"])
        return out


# ---------------------------------------------------------------------------------------- keys
def training_indices(splits: Splits) -> np.ndarray:
    """The images a generator may learn from: every training image (labelled and unlabelled), sorted."""
    return np.sort(np.concatenate([splits.labeled, splits.unlabeled])).astype(np.int64)


def generator_size(cfg: Config) -> int:
    """Side length the ``ddpm`` generator trains and samples at."""
    return cfg.synthetic.image_size or cfg.data.image_size


def precision(cfg: Config, device: torch.device | None = None) -> str:
    """The generator's effective arithmetic on ``device`` (default: the config's): ``bf16`` or ``fp32``.

    Keyed instead of ``synthetic.mixed_precision`` itself, which only asks: a CPU without native bf16
    runs float32 whatever the config says."""
    return "bf16" if uses_bf16(cfg.synthetic, device or resolve_device(cfg)) else "fp32"


def generator_key(
    cfg: Config, prepared: Prepared, splits: Splits, device: torch.device | None = None
) -> dict:
    """Exactly what determines the generator: data, training images, generator config, seed, precision."""
    gc = cfg.synthetic
    key = {
        "kind": "generator",
        "version": VERSION,
        "data": prepared.path.name,
        "train": digest(training_indices(splits).tolist()),
        "generator": gc.generator,
        "seed": cfg.seed,
        "precision": precision(cfg, device),  # of training (ddpm) and of sampling (every generator)
    }
    if generator_kind(gc.generator).folder:
        return key | {"pretrained": pipeline_fingerprint(pretrained_folder(gc))}
    train_fields = {
        "channels",
        "attention",
        "batch_size",
        "lr",
        "ema_decay",
        "train_steps",
    }
    return key | {
        "ddpm": gc.model_dump(mode="json", include=train_fields),
        "image_size": generator_size(cfg),
        "timesteps": TRAIN_TIMESTEPS,
        "beta_schedule": BETA_SCHEDULE,
        "prediction": PREDICTION,
    }


def pool_key(cfg: Config, prepared: Prepared, splits: Splits, device: torch.device | None = None) -> dict:
    """The generator's key plus what sampling adds; ``synthetic.ratio`` is deliberately not in it."""
    gc = cfg.synthetic
    return generator_key(cfg, prepared, splits, device) | {
        "kind": "synth_pool",
        "pool_size": gc.pool_size,
        "sampler": gc.sampler,
        "sample_steps": gc.sample_steps,
        "out": [cfg.data.channels, cfg.data.image_size],
        "snap_background": gc.snap_background,
    }


def pipeline_fingerprint(path: Path) -> list:
    """Names, sizes and modification times of a pipeline folder's files (an edit changes the pool)."""
    rows = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            rows.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
    return [str(path.resolve()), digest(rows)]


def pretrained_folder(gc: SyntheticConfig) -> Path:
    """The ``pretrained`` generator's pipeline folder, checked; errors name ``synthetic.pretrained_path``."""
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
def draws_synthetic(cfg: Config) -> bool:
    """Whether ``cfg``'s synthetic settings give images to draw: a generator, a pool, a ratio > 0 (whether
    its method distils on a transfer set at all is the method's to say: ``methods.checks.uses_pool``)."""
    gc = cfg.synthetic
    return generator_kind(gc.generator).images and gc.pool_size > 0 and gc.ratio > 0


def pool_for_search(
    cfg: Config, prepared: Prepared, splits: Splits, progress: Progress | None = None
) -> Pool | None:
    """Build a search's pool once, before its trials start, when its trials may draw from it
    (``synthetic.ratio`` > 0, or searched up to > 0); trials then find it in the cache. The caller asks
    only for a search whose methods distil on a transfer set.

    Trials whose generator knobs are themselves searched build their own pools (once each, under a lock).
    """
    gc, space = cfg.synthetic, cfg.search.space
    ratios = space["synthetic.ratio"].boundary_values() if "synthetic.ratio" in space else [gc.ratio]
    if max(ratios) <= 0:
        return None
    return build_pool(cfg, prepared, splits, Store(cfg.cache.dir, cfg.cache.enabled), progress=progress)


def build_pool(
    cfg: Config,
    prepared: Prepared,
    splits: Splits,
    store: Store,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> Pool | None:
    """The synthetic pool for ``cfg`` from the cache, or generated now (training the generator if needed).

    Returns None when ``synthetic.generator`` makes no images (none) or ``synthetic.pool_size`` is 0. A
    pool that fails the quality gate is returned all the same, with a warning; its ``gate["passed"]`` is
    False.
    """
    gc = cfg.synthetic
    if not generator_kind(gc.generator).images or gc.pool_size == 0:
        return None
    if device is None:
        device = resolve_device(cfg)
    progress = progress or _log_progress
    key_obj = pool_key(cfg, prepared, splits, device)
    other = key_obj | {"precision": "fp32" if key_obj["precision"] == "bf16" else "bf16"}
    if store.enabled and verify(store.path("synth_pool", digest(other))):
        # a search's driver may have built the pool on another device (a CPU head node for GPU workers):
        # its images serve as well, and a second generator would cost the whole training again
        key_obj = other
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
        info["sample_s"] = time.perf_counter() - t0
        size = min(unet_size(unet), cfg.data.image_size)
        real, groups = _gate_sample(prepared, splits)
        if gc.snap_background:
            info["background_snapped"] = snap_background(images, real)
        images.flush()
        gate = quality_gate(np.asarray(images), real, size=size, groups=groups)
        (tmp / "gate.json").write_text(json.dumps(gate, indent=1))
        # what the report shows of the pool: 16 of its images beside 16 training images
        sample_grid(np.asarray(images), real, tmp / "grid.png")
        (tmp / "meta.json").write_text(json.dumps(info | {"generator": str(folder)}, indent=1))
        del images

    hit = store.get_or_build("synth_pool", key_obj, build)
    gate = json.loads((hit.path / "gate.json").read_text())
    meta = json.loads((hit.path / "meta.json").read_text())
    images = np.load(hit.path / "images.npy", mmap_mode="r")
    if gate.get("version") != GATE_VERSION:
        # a pool cached under an older gate is judged again (in memory: the entry's files are checksummed)
        real, groups = _gate_sample(prepared, splits)
        gate = quality_gate(np.asarray(images), real, size=gate["size"], groups=groups)
    pool = Pool(images, hit.path, digest(key_obj), hit.cached, gate, meta)
    if not gate["passed"]:
        log.warning(
            "synthetic pool %s FAILED the quality gate (%s): its images do not look like the training "
            "images; train the generator longer (synthetic.train_steps) or set synthetic.ratio: 0",
            hit.path,
            "; ".join(gate["reasons"]),
        )
    return pool


BACKGROUND_MIN_SHARE = 0.05
"""Share of the training pixels at their minimum from which that value counts as a background."""


def snap_background(images: np.ndarray, real: np.ndarray, chunk: int = 64) -> float | None:
    """In place, per channel: where the ``real`` images (M, C, h, w) have a background of one exact value
    (their minimum, on at least ``BACKGROUND_MIN_SHARE`` of the pixels), the darkest pixels of ``images``
    (N, C, H, W, e.g. a memory-mapped pool), as large a share of the set as the real background's, are set
    to that value; nothing else changes. Returns the largest share snapped (None: no background found).

    A diffusion model does not hit the edge of its range exactly: its background comes out as a faint
    haze (+0.011 +- 0.005 on mni152's zeros), and the teacher's encoder reads a haze as another kind of
    image. One threshold for the whole set, so images keep their own amount of background."""
    snapped = None
    for c in range(images.shape[1]):
        ref = _spread_pixels(real[:, c])
        low = float(ref.min())
        share = float((ref == low).mean())
        if share < BACKGROUND_MIN_SHARE:
            continue
        threshold = float(np.quantile(_spread_pixels(images[:, c]), share))
        for start in range(0, len(images), chunk):
            part = images[start : start + chunk, c]
            part[part <= threshold] = low
        snapped = max(share, snapped or 0.0)
    return snapped


PIXEL_SAMPLE = 1 << 22
"""Pixels of a set, evenly spread, from which its quantiles are taken."""


def _spread_pixels(x: np.ndarray) -> np.ndarray:
    flat = np.asarray(x).reshape(-1)
    step = max(1, len(flat) // PIXEL_SAMPLE)
    return flat[::step].astype(np.float32)


def _gate_sample(prepared: Prepared, splits: Splits) -> tuple[np.ndarray, np.ndarray]:
    """The training images a pool is gated against (at most GATE_MAX_IMAGES, spread) and their groups (which
    set the nearest-real scale)."""
    rows = spread(training_indices(splits), GATE_MAX_IMAGES)
    return take_rows(prepared.images, rows), np.asarray(prepared.groups)[rows]


def pool_semantics(
    cfg: Config,
    prepared: Prepared,
    splits: Splits,
    pool: Pool,
    store: Store,
    device: torch.device,
    threads: int = 1,
    progress: Progress | None = None,
) -> dict:
    """The semantic gate of ``pool`` for ``cfg``'s teacher encoder: computed once per pool and encoder (a
    cache entry of kind ``synth_semantic`` holding ``gate.json`` and the per-image ``inside.npy``), the
    encoder's states read from (or added to) the encoder-feature cache. Returns the gate with ``inside``
    (a bool array, one per pool image) added."""
    from tskd_tune.features import encoder_features, feature_key
    from tskd_tune.models.teacher import ALL_FROZEN, build_teacher

    model = build_teacher(
        cfg.teacher,
        in_chans=cfg.data.channels,
        num_classes=len(prepared.classes),
        image_size=cfg.data.image_size,
        seed=cfg.seed,
        frozen=ALL_FROZEN,
    )
    model.eval()
    train = training_indices(splits)
    key = {
        "kind": "synth_semantic",
        "version": 1,
        "pool": pool.key,
        "train": digest(train.tolist()),
        "encoder": feature_key(cfg, model, {}),
        "k": K,
        "dims": PCA_DIMS,
    }

    def vectors(states: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(rows), 64):
                part = [torch.from_numpy(take_rows(s, rows[start : start + 64])) for s in states]
                out.append(
                    pooled(model.features_from([p.to(device) for p in part])[-1].float().cpu().numpy())
                )
        return np.concatenate(out)

    def build(tmp) -> None:
        feats = encoder_features(
            cfg,
            model.to(device),
            prepared,
            store,
            device,
            pool=(pool.key, pool.images),
            threads=threads,
            progress=progress,
        )
        real = vectors(feats.data, spread(train, MAX_IMAGES))
        synth = vectors(feats.pool, np.arange(len(pool), dtype=np.int64))
        figures = spread(np.arange(len(synth)), MAX_IMAGES)
        gate, _ = semantic_gate(real, synth[figures])
        r, s = project(real, synth)
        np.save(tmp / "inside.npy", in_manifold(s, r))
        (tmp / "gate.json").write_text(json.dumps(gate, indent=1))

    hit = store.get_or_build("synth_semantic", key, build)
    gate = json.loads((hit.path / "gate.json").read_text())
    return gate | verdict(gate) | {"inside": np.load(hit.path / "inside.npy"), "cached": hit.cached}


def _where(gc: SyntheticConfig) -> str:
    folder = generator_kind(gc.generator).folder
    return "synthetic.pretrained_path" if folder else "synthetic (trained generator)"


def _generator(
    cfg: Config, prepared: Prepared, splits: Splits, store: Store, device: torch.device, progress: Progress
) -> tuple[Path, bool]:
    """The generator's pipeline folder: the user's (``pretrained``) or a cached, trained ``ddpm``."""
    gc = cfg.synthetic
    if generator_kind(gc.generator).folder:
        return pretrained_folder(gc), True

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

    hit = store.get_or_build("generator", generator_key(cfg, prepared, splits, device), build)
    return hit.path, hit.cached


def _log_progress(phase: str, done: int, total: int) -> None:
    """Default progress in logs (trials, searches): a line every 10%."""
    beat()  # a trial building the pool is making progress (hang watchdog)
    step = max(1, total // 10)
    if done == total or done % step == 0:
        what = "generator training step" if phase == "train" else "synthetic image"
        log.info("synthetic: %s %d/%d", what, done, total)
