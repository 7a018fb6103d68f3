"""The methods a trial can run, each a plain function over the stages: teacher -> transfer set -> student.

- ``ts_kd``   fine-tune the teacher with LoRA on the labels, then distil its logits on the transfer set
              (``sup_weight * DiceCE`` on labelled images + ``kd_weight * T^2 * KL`` on transfer images,
              + ``feature_weight`` * feature loss through a learned projection).
- ``ta_kd``   distil the frozen, pretrained teacher's encoder features into the student on the transfer
              set, then fine-tune the student on the labels (task-agnostic baseline).
- ``scratch`` the student on the labelled images only.
- ``teacher`` the fine-tuned teacher itself (the upper reference).
"""

from __future__ import annotations

import json
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
from tskd_tune.data.prepare import Prepared, Splits, take_rows
from tskd_tune.data.transforms import paired_transforms
from tskd_tune.features import Features, FromState, StateRows, Views, augmented_views, encoder_features
from tskd_tune.losses import FeatureLoss, kd_loss, supervised_loss
from tskd_tune.metrics import evaluate, latency_ms
from tskd_tune.models.students import build_student
from tskd_tune.models.teacher import ALL_FROZEN, adapted, build_teacher, load_adapted, save_adapted
from tskd_tune.models.vit import Segmenter
from tskd_tune.synth import Pool
from tskd_tune.train import LabeledBatches, Loop, Report, run_loop, seeded
from tskd_tune.transfer import TransferSet, build_transfer_set, cached_outputs, teacher_key


@dataclass
class Stages:
    """What every method works with: the config, the data, the cache, the device and run bookkeeping."""

    cfg: Config
    prepared: Prepared
    splits: Splits
    store: Store
    device: torch.device
    out_dir: Path | None = None
    resume: dict | None = None
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    pool: Pool | None = None
    fill_threads: int = 1
    """Threads for computing teacher features that are not in the cache yet."""
    _features: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.prepared.classes)

    @property
    def amp(self) -> bool:
        """bf16 autocast: asked for (``resources.mixed_precision``) and on CUDA."""
        return self.cfg.resources.mixed_precision and self.device.type == "cuda"

    def timed(self, name: str):
        return _Timer(self.timings, name)

    def validator(self, model: nn.Module, split: str = "val") -> Callable[[], dict]:
        idx = getattr(self.splits, split)
        images, masks = self.prepared.images[idx], self.prepared.masks[idx]
        bs = max(self.cfg.student.batch_size, 16)
        return lambda: evaluate(
            model, images, masks, self.prepared.classes, bs, self.device, prefix=f"{split}_"
        )

    def teacher_validator(self, teacher: nn.Module, feats: Features | None, split: str = "val") -> Callable[[], dict]:
        """Scores of a teacher on ``split``: its trainable part on the cached states (or on the images)."""
        if feats is None:
            return self.validator(teacher, split)
        idx = getattr(self.splits, split)
        return lambda: evaluate(FromState(teacher), StateRows(feats, idx), self.prepared.masks[idx],
                                self.prepared.classes, 16, self.device, prefix=f"{split}_")  # fmt: skip

    def teacher_base(self, frozen: int | None = None) -> Segmenter:
        """The configured teacher before fine-tuning (frozen encoder, untrained head, no LoRA)."""
        cfg = self.cfg
        return build_teacher(cfg.teacher, in_chans=cfg.data.channels, num_classes=self.num_classes,
                             image_size=cfg.data.image_size, seed=cfg.seed, frozen=frozen)  # fmt: skip

    def teacher_views(self, model: Segmenter, indices: np.ndarray) -> Views:
        """Cached states of ``teacher.augment_views`` augmented views of images ``indices`` (counted into
        ``teacher_features_cached`` / ``teacher_features_s`` like the other teacher features)."""
        t0 = time.perf_counter()
        views = augmented_views(self.cfg, model, self.prepared, indices, self.store, self.device,
                                threads=self.fill_threads, progress=_log_progress)  # fmt: skip
        self.info["teacher_features_cached"] = self.info.get("teacher_features_cached", True) and views.cached
        self.info["teacher_features_s"] = self.info.get("teacher_features_s", 0.0) + time.perf_counter() - t0
        return views

    def teacher_features(self, model: Segmenter) -> Features | None:
        """The cached states of ``model``'s frozen prefix for every image (and the synthetic pool), or None
        when nothing is frozen before its first adapted block. Adds ``teacher_features_cached`` (False if any
        state was computed in this trial) and ``teacher_features_s`` to the trial's metrics."""
        if model.frozen == 0:
            return None
        if model.frozen not in self._features:
            pool = (self.pool.key, self.pool.images) if self.pool is not None and len(self.pool) else None
            f = encoder_features(self.cfg, model.to(self.device), self.prepared, self.store, self.device,
                                 pool=pool, threads=self.fill_threads, progress=_log_progress)  # fmt: skip
            self._features[model.frozen] = f
            self.info["teacher_features_cached"] = self.info.get("teacher_features_cached", True) and f.cached
            self.info["teacher_features_s"] = self.info.get("teacher_features_s", 0.0) + f.seconds
            if f.plan:
                self.info["teacher_features_backend"] = f"{f.plan['backend']} batch {f.plan['batch_size']}"
        return self._features[model.frozen]

    def steps_per_epoch(self, transfer: TransferSet) -> int:
        """Equal compute for every method and every synthetic ratio: one pass over the real transfer images
        unless configured (synthetic images change what the student sees, not how long it trains)."""
        s = self.cfg.student
        return s.steps_per_epoch or max(1, math.ceil(len(transfer.real) / s.batch_size))


def rows(array: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(take_rows(array, indices))


class _Timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timings[f"{self.name}_s"] = (
            self.timings.get(f"{self.name}_s", 0.0) + time.perf_counter() - self.t0
        )


@dataclass
class Outcome:
    """What a method hands back: the model to evaluate and export, and its final metrics."""

    model: nn.Module
    metrics: dict
    teacher: nn.Module | None = None
    evaluate: Callable[[str], dict] | None = None
    """Scores of ``model`` on a split when it needs more than images (a teacher on cached states)."""


# ----------------------------------------------------------------------------------------- stages
def fine_tuned_teacher(st: Stages) -> tuple[nn.Module, dict]:
    """The fine-tuned teacher (head, or LoRA + head), from the cache when this exact teacher was trained before.

    With a frozen prefix it trains on the cached states of the labelled images and of their
    ``teacher.augment_views`` augmented views (pixel augmentation cannot happen after the prefix); with
    LoRA in every block it trains on images augmented on the fly.
    """
    cfg, t = st.cfg, st.cfg.teacher
    feats = st.teacher_features(st.teacher_base())

    def build(tmp: Path) -> None:
        model = adapted(st.teacher_base(), t).to(st.device)
        sup = supervised_loss(t.ce_weight, t.dice_weight)
        labeled = np.sort(st.splits.labeled)
        masks = torch.from_numpy(np.asarray(st.prepared.masks[labeled], dtype=np.int64))
        images = LabeledBatches(st.prepared.images, st.prepared.masks, labeled, cfg.data.augment)
        views = st.teacher_views(st.teacher_base(), labeled) if feats is not None and t.augment_views else None
        n = len(labeled) + (len(views) if views is not None else 0)

        def step(g):
            if feats is None:
                x, y = images.sample(t.batch_size, g)
                return sup(model(x.to(st.device)), y.to(st.device))
            i = torch.randint(n, (t.batch_size,), generator=g).numpy()
            i.sort()  # originals first, then views: each part gathered in one go
            orig, aug = i[i < len(labeled)], i[i >= len(labeled)] - len(labeled)
            state, y = feats.rows(labeled[orig]), masks[orig]
            if len(aug):
                vs, vy = views.rows(aug)
                state, y = [torch.cat([a, b]) for a, b in zip(state, vs, strict=True)], torch.cat([y, vy])
            return sup(model.from_state([s.to(st.device) for s in state]), y.to(st.device))

        steps = max(1, math.ceil(n / t.batch_size))
        loop = Loop("teacher", {"teacher": model}, _reseeding(images, step), t.epochs, steps, t.lr, t.weight_decay,
                    cfg.seed, autocast=st.amp)  # fmt: skip
        run_loop(loop, out_dir=None, report=None)
        metrics = {f"teacher_{k}": v for k, v in st.teacher_validator(model, feats)().items()}
        # the whole teacher on one image, as it would be deployed (measured once, with the teacher)
        metrics["teacher_latency_ms"] = latency_ms(model, cfg.data.channels, cfg.data.image_size,
                                                   device=st.device, repeats=3, warmup=1)  # fmt: skip
        save_adapted(model, tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics))

    with st.timed("teacher"):
        hit = st.store.get_or_build("teacher", teacher_key(cfg, st.prepared, st.splits), build)
        model = load_adapted(st.teacher_base(), hit.path).to(st.device).eval()
    st.info["teacher_cached"] = hit.cached
    st.info["teacher_adapter"] = str(hit.path)  # where the trained head / LoRA adapter lives (a reference)
    return model, json.loads((hit.path / "metrics.json").read_text())


def _cut(teacher: nn.Module) -> bool:
    """Whether the teacher's frozen prefix is cut off (its trainable part then reads cached states)."""
    return teacher.frozen > 0


def _log_progress(what: str, done: int, total: int) -> None:
    import logging

    if done == total or done % max(1, total // 10) == 0:
        logging.getLogger("tskd_tune").info("%s: %d/%d images", what, done, total)


def _teacher_inputs(st: Stages, feats: Features | None, transfer: TransferSet):
    """What the teacher reads at transfer positions: cached prefix states, or the images themselves."""
    if feats is None:
        return lambda pos: transfer.read(st.prepared.images, pos)
    return lambda pos: feats.transfer_rows(transfer.real, transfer.synthetic, pos)


def _student(st: Stages) -> nn.Module:
    cfg = st.cfg
    with seeded(cfg.seed):
        return build_student(cfg.student, cfg.data.channels, st.num_classes, cfg.data.image_size).to(
            st.device
        )


def _projection(st: Stages, student_dim: int, teacher_dim: int) -> FeatureLoss:
    with seeded(st.cfg.seed + 1):
        return FeatureLoss(student_dim, teacher_dim).to(st.device)


def _labeled(st: Stages) -> LabeledBatches:
    return LabeledBatches(st.prepared.images, st.prepared.masks, st.splits.labeled, st.cfg.data.augment)


def _student_loop(
    st: Stages, phase: str, modules: dict, step, epochs: int, steps: int, evaluate_fn=None
) -> Loop:
    s = st.cfg.student
    return Loop(
        phase,
        modules,
        step,
        epochs,
        steps,
        s.lr,
        s.weight_decay,
        st.cfg.seed,
        evaluate_fn,
        s.checkpoint_every,
        autocast=st.amp,
    )


def _reseeding(labeled: LabeledBatches, step_fn):
    """Wrap a step so that augmentation is reseeded from each epoch's generator (exact resume)."""
    state = {}

    def step(g):
        if state.get("g") is not g:
            state["g"] = g
            labeled.reseed(int(torch.randint(2**31 - 1, (1,), generator=g)))
        return step_fn(g)

    return step


# ---------------------------------------------------------------------------------------- methods
def ts_kd(st: Stages, report: Report | None) -> Outcome:
    """Task-specific KD: fine-tuned teacher's soft labels on the transfer set + supervised loss on labels."""
    cfg, d = st.cfg, st.cfg.distill
    teacher, teacher_metrics = fine_tuned_teacher(st)
    transfer = build_transfer_set(st.splits, st.pool, cfg)
    read = _teacher_inputs(st, st.teacher_features(teacher), transfer)
    with st.timed("transfer"):
        key = teacher_key(cfg, st.prepared, st.splits)
        logits, st.info["logits_cached"] = cached_outputs(
            st.store, "logits", key, transfer, read, teacher.from_state if _cut(teacher) else teacher,
            st.device, amp=st.amp,
        )  # fmt: skip
        feats = None
        if d.feature_weight > 0:
            deepest = (lambda s: teacher.features_from(s)[-1]) if _cut(teacher) else (lambda x: teacher.features(x)[-1])
            feats, _ = cached_outputs(st.store, "features", key, transfer, read, deepest, st.device, amp=st.amp)
    st.info |= transfer.counts
    student = _student(st)
    modules: dict[str, nn.Module] = {"student": student}
    feat_loss = None
    if feats is not None:
        feat_loss = _projection(st, student.feature_dim, feats.shape[1])
        modules["projection"] = feat_loss
    labeled, sup = _labeled(st), supervised_loss(cfg.teacher.ce_weight, cfg.teacher.dice_weight)
    bs = cfg.student.batch_size

    def step(g):
        xl, yl = labeled.sample(bs, g)
        ti = torch.randint(len(transfer), (bs,), generator=g).numpy()
        xt, lt = paired_transforms(transfer.read(st.prepared.images, ti), rows(logits, ti), cfg.data.augment, g)
        xl, yl, xt, lt = (t.to(st.device) for t in (xl, yl, xt, lt))
        loss = d.sup_weight * sup(student(xl), yl) + d.kd_weight * kd_loss(student(xt), lt, d.temperature)
        if feat_loss is not None:
            # features are not flipped with the images: feature matching is computed on unflipped inputs
            xf = transfer.read(st.prepared.images, ti).to(st.device)
            loss = loss + d.feature_weight * feat_loss(
                student.features(xf)[-1], rows(feats, ti).to(st.device)
            )
        return loss

    loop = _student_loop(st, "student", modules, _reseeding(labeled, step), cfg.student.epochs,
                         st.steps_per_epoch(transfer), st.validator(student))  # fmt: skip
    with st.timed("student"):
        metrics = run_loop(loop, st.out_dir, report, st.resume)
    return Outcome(student, metrics | teacher_metrics, teacher)


def ta_kd(st: Stages, report: Report | None) -> Outcome:
    """Task-agnostic KD: match the frozen teacher's encoder features, then fine-tune on the labels."""
    cfg = st.cfg
    transfer = build_transfer_set(st.splits, st.pool, cfg)
    # the whole pretrained encoder, frozen: its cached output is exactly the features distilled here
    teacher = st.teacher_base(frozen=ALL_FROZEN).to(st.device).eval()
    st.info["teacher_cached"] = None
    feats = st.teacher_features(teacher)
    st.info |= transfer.counts
    student = _student(st)
    proj = _projection(st, student.feature_dim, teacher.feature_dim)
    bs = cfg.student.batch_size

    def distil_step(g):
        ti = torch.randint(len(transfer), (bs,), generator=g).numpy()
        deepest = feats.transfer_rows(transfer.real, transfer.synthetic, ti)[-1]
        x, tf = paired_transforms(transfer.read(st.prepared.images, ti), deepest, cfg.data.augment, g)
        return proj(student.features(x.to(st.device))[-1], tf.to(st.device))

    steps = st.steps_per_epoch(transfer)
    with st.timed("student"):
        if st.resume is None or st.resume.get("phase") == "pretrain":
            pre = _student_loop(st, "pretrain", {"student": student, "projection": proj}, distil_step,
                                cfg.distill.pretrain_epochs, steps)  # fmt: skip
            # pretraining epochs are not reported: the scheduler compares trials on the fine-tuning epochs
            run_loop(pre, st.out_dir, None, st.resume)
        labeled, sup = _labeled(st), supervised_loss(cfg.teacher.ce_weight, cfg.teacher.dice_weight)

        def sup_step(g):
            x, y = labeled.sample(bs, g)
            return sup(student(x.to(st.device)), y.to(st.device))

        fine = _student_loop(st, "finetune", {"student": student}, _reseeding(labeled, sup_step), cfg.student.epochs,
                             steps, st.validator(student))  # fmt: skip
        metrics = run_loop(fine, st.out_dir, report, st.resume)
    # the frozen encoder has no trained head: it is not a segmenter to time or score
    return Outcome(student, metrics)


def scratch(st: Stages, report: Report | None) -> Outcome:
    """The student trained on the labelled images only (same steps per epoch as the KD methods)."""
    cfg = st.cfg
    student = _student(st)
    labeled, sup = _labeled(st), supervised_loss(cfg.teacher.ce_weight, cfg.teacher.dice_weight)
    st.info |= {"transfer_real": 0, "transfer_synthetic": 0}

    def step(g):
        x, y = labeled.sample(cfg.student.batch_size, g)
        return sup(student(x.to(st.device)), y.to(st.device))

    loop = _student_loop(st, "student", {"student": student}, _reseeding(labeled, step), cfg.student.epochs,
                         st.steps_per_epoch(build_transfer_set(st.splits)), st.validator(student))  # fmt: skip
    with st.timed("student"):
        metrics = run_loop(loop, st.out_dir, report, st.resume)
    return Outcome(student, metrics)


def teacher(st: Stages, report: Report | None) -> Outcome:
    """The fine-tuned teacher evaluated as the model (reported once, after fine-tuning)."""
    model, teacher_metrics = fine_tuned_teacher(st)
    metrics = {k.removeprefix("teacher_"): v for k, v in teacher_metrics.items() if k.startswith("teacher_val_")}
    metrics |= teacher_metrics
    if report is not None:
        report(1, metrics | {"epoch": 1}, None)
    feats = st.teacher_features(model)
    return Outcome(model, metrics, model, lambda split: st.teacher_validator(model, feats, split)())


METHODS: dict[str, Callable[[Stages, Report | None], Outcome]] = {
    "ts_kd": ts_kd,
    "ta_kd": ta_kd,
    "scratch": scratch,
    "teacher": teacher,
}
