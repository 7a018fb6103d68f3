"""The trial context every method works with (config, data, cache, device, the record its stages fill) and
what a method hands back."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tskd_tune.cache import Store
from tskd_tune.config import Config
from tskd_tune.data.lateral import FlipPlan, flip_plan
from tskd_tune.data.prepare import Prepared, Splits, take_rows
from tskd_tune.features import Features, FromState, StateRows, Views, augmented_views, encoder_features
from tskd_tune.methods.record import Record
from tskd_tune.metrics import evaluate
from tskd_tune.models.teacher import build_teacher
from tskd_tune.models.vit import Segmenter
from tskd_tune.synth import Pool
from tskd_tune.train import Hooks
from tskd_tune.transfer import TransferSet


@dataclass
class TrialContext:
    """What every method works with: the config, the data, the cache, the device and the trial's
    :class:`Record`, which the stages fill while the method runs and the method hands back on its
    :class:`Outcome`."""

    cfg: Config
    prepared: Prepared
    splits: Splits
    store: Store
    device: torch.device
    out_dir: Path | None = None
    resume: dict | None = None
    record: Record = field(default_factory=Record)
    """What the method reports besides its scores; the trial starts it (data and pool timings, the pool's
    figures)."""
    pool: Pool | None = None
    fill_threads: int = 1
    """Threads for computing teacher features that are not in the cache yet."""
    hooks: Hooks = field(default_factory=Hooks)
    """What the adapter running the trial hooks into every training loop (heartbeat, fault injection)."""
    _features: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.prepared.classes)

    @functools.cached_property
    def flips(self) -> FlipPlan:
        """How flips treat left/right classes: the augmentation in effect and the class swap a flip applies."""
        return flip_plan(self.cfg.data, self.prepared.classes)

    @property
    def amp(self) -> bool:
        """bf16 autocast: asked for (``resources.mixed_precision``) and on CUDA."""
        return self.cfg.resources.mixed_precision and self.device.type == "cuda"

    def timed(self, phase: str):
        """Add the seconds the ``with`` block takes to ``phase`` in the record's timings."""
        return self.record.timed(phase)

    def validator(self, model: nn.Module, split: str = "val") -> Callable[[], dict]:
        idx = getattr(self.splits, split)
        images, masks = self.prepared.images[idx], self.prepared.masks[idx]
        bs = max(self.cfg.student.batch_size, 16)
        return lambda: evaluate(
            model, images, masks, self.prepared.classes, bs, self.device, prefix=f"{split}_"
        )

    def teacher_validator(
        self, teacher: nn.Module, feats: Features | None, split: str = "val"
    ) -> Callable[[], dict]:
        """Scores of a teacher on ``split``: its trainable part on the cached states (or on the images)."""
        if feats is None:
            return self.validator(teacher, split)
        idx = getattr(self.splits, split)
        return lambda: evaluate(
            FromState(teacher),
            StateRows(feats, idx),
            self.prepared.masks[idx],
            self.prepared.classes,
            16,
            self.device,
            prefix=f"{split}_",
        )

    def teacher_base(self, frozen: int | None = None) -> Segmenter:
        """The configured teacher before fine-tuning (frozen encoder, untrained head, no LoRA)."""
        cfg = self.cfg
        return build_teacher(
            cfg.teacher,
            in_chans=cfg.data.channels,
            num_classes=self.num_classes,
            image_size=cfg.data.image_size,
            seed=cfg.seed,
            frozen=frozen,
        )

    def teacher_views(self, model: Segmenter, indices: np.ndarray) -> Views:
        """Cached states of ``teacher.augment_views`` augmented views of images ``indices`` (counted into the
        record's ``teacher_features_cached`` / ``teacher_features_s`` like the other teacher features)."""
        t0 = time.perf_counter()
        views = augmented_views(
            self.cfg,
            model,
            self.prepared,
            indices,
            self.store,
            self.device,
            threads=self.fill_threads,
            progress=log_progress,
        )
        self.record.read_features(views.cached, time.perf_counter() - t0)
        return views

    def teacher_features(self, model: Segmenter) -> Features | None:
        """The cached states of ``model``'s frozen prefix for every image (and the synthetic pool), or None
        when nothing is frozen before its first adapted block. Counts the read into the record
        (``teacher_features_cached``: False if any state was computed in this trial; its seconds; the
        backend)."""
        if model.frozen == 0:
            return None
        if model.frozen not in self._features:
            pool = (self.pool.key, self.pool.images) if self.pool is not None and len(self.pool) else None
            f = encoder_features(
                self.cfg,
                model.to(self.device),
                self.prepared,
                self.store,
                self.device,
                pool=pool,
                threads=self.fill_threads,
                progress=log_progress,
            )
            self._features[model.frozen] = f
            backend = f"{f.plan['backend']} batch {f.plan['batch_size']}" if f.plan else None
            self.record.read_features(f.cached, f.seconds, backend)
        return self._features[model.frozen]

    def steps_per_epoch(self, transfer: TransferSet) -> int:
        """Equal compute for every method and every synthetic ratio: one pass over the real transfer images
        unless configured (synthetic images change what the student sees, not how long it trains)."""
        s = self.cfg.student
        return s.steps_per_epoch or max(1, math.ceil(len(transfer.real) / s.batch_size))


def rows(array: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(take_rows(array, indices))


@dataclass
class Outcome:
    """What a method hands back: the model to evaluate and export, its final scores and its record."""

    model: nn.Module
    metrics: dict
    teacher: nn.Module | None = None
    evaluate: Callable[[str], dict] | None = None
    """Scores of ``model`` on a split when it needs more than images (a teacher on cached states)."""
    record: Record = field(kw_only=True)
    """What the method reports besides its scores (the context's record, as its stages filled it)."""


def log_progress(what: str, done: int, total: int) -> None:
    import logging

    if done == total or done % max(1, total // 10) == 0:
        logging.getLogger("tskd_tune").info("%s: %d/%d images", what, done, total)
