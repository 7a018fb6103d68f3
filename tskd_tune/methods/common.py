"""The stages methods share: the fine-tuned teacher, the student, its loops, and what the teacher reads."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tskd_tune.cache import json_text
from tskd_tune.features import Features
from tskd_tune.losses import FeatureLoss, supervised_loss
from tskd_tune.methods.context import TrialContext
from tskd_tune.methods.record import TeacherSource
from tskd_tune.metrics import latency_ms
from tskd_tune.models.students import build_student
from tskd_tune.models.teacher import adapted, load_adapted, save_adapted
from tskd_tune.train import LabeledBatches, Loop, Report, load_checkpoint, run_loop, seeded
from tskd_tune.transfer import TransferSet, teacher_key

log = logging.getLogger(__name__)

TEACHER_CHECKPOINT_S = 60.0
"""A fine-tuning teacher saves its state (in the cache, beside its entry) at most this often, and an
interrupted one resumes from it: a CPU's LoRA teacher takes tens of minutes, a checkpoint under a second."""


def fine_tuned_teacher(st: TrialContext, report: Report | None = None) -> tuple[nn.Module, dict]:
    """The fine-tuned teacher (head, or LoRA + head), from the cache when this exact teacher was trained before.

    With a frozen prefix it trains on the cached states of the labelled images and of their
    ``teacher.augment_views`` augmented views (pixel augmentation cannot happen after the prefix); with
    LoRA in every block it trains on images augmented on the fly. ``report`` gets every fine-tuning epoch's
    val scores (a teacher search's scheduler compares teachers on them); a cached teacher is not trained,
    so it reports nothing here. Where the teacher came from goes into the trial's record.
    """
    cfg, t = st.cfg, st.cfg.teacher
    feats = st.teacher_features(st.teacher_base())
    key = teacher_key(cfg, st.prepared, st.splits)
    partial = st.store.partial("teacher", key)  # checkpoints: an interrupted fine-tuning resumes

    def build(tmp: Path) -> None:
        model = adapted(st.teacher_base(), t).to(st.device)
        sup = supervised_loss(t.ce_weight, t.dice_weight)
        labeled = np.sort(st.splits.labeled)
        masks = torch.from_numpy(np.asarray(st.prepared.masks[labeled], dtype=np.int64))
        images = LabeledBatches(
            st.prepared.images, st.prepared.masks, labeled, st.flips.augment, st.flips.label_swap
        )
        views = (
            st.teacher_views(st.teacher_base(), labeled) if feats is not None and t.augment_views else None
        )
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
        validate = st.teacher_validator(model, feats) if report is not None else None
        loop = Loop(
            phase="teacher",
            modules={"teacher": model},
            step=reseeding(images, step),
            epochs=t.epochs,
            steps_per_epoch=steps,
            lr=t.lr,
            weight_decay=t.weight_decay,
            seed=cfg.seed,
            autocast=st.amp,
            warmup_steps=t.warmup_epochs * steps,
            hooks=st.hooks,
            evaluate=validate,
            checkpoint_every_s=TEACHER_CHECKPOINT_S,
            checkpoint_trainable=True,
        )
        resume = load_checkpoint(partial / "checkpoint") if partial is not None else None
        if resume is not None and resume.get("phase") == "teacher" and resume["epoch"] < t.epochs:
            log.warning(
                "teacher: resuming its fine-tuning after epoch %d of %d (%s)",
                resume["epoch"],
                t.epochs,
                partial,
            )
        else:
            resume = None
        # the checkpoints are the cache's (any trial that needs this teacher resumes it), not the trial's
        epochs = (lambda epoch, metrics, _ckpt: report(epoch, metrics, None)) if report is not None else None
        trained = run_loop(loop, out_dir=partial, report=epochs, resume=resume)
        metrics = {f"teacher_{k}": v for k, v in st.teacher_validator(model, feats)().items()}
        metrics["teacher_train_loss"] = trained["train_loss"]
        metrics["teacher_resumed_after_epoch"] = resume["epoch"] if resume is not None else 0
        # the whole teacher on one image, as it would be deployed (measured once, with the teacher)
        metrics["teacher_latency_ms"] = latency_ms(
            model, cfg.data.channels, cfg.data.image_size, device=st.device, repeats=3, warmup=1
        )
        save_adapted(model, tmp)
        (tmp / "metrics.json").write_text(json_text(metrics))

    with st.timed("teacher"):
        hit = st.store.get_or_build("teacher", key, build)
        if partial is not None:  # the entry is written: its checkpoints are of no more use
            shutil.rmtree(partial, ignore_errors=True)
        model = load_adapted(st.teacher_base(), hit.path).to(st.device).eval()
    st.record.teacher = TeacherSource(cached=hit.cached, adapter=str(hit.path))
    return model, json.loads((hit.path / "metrics.json").read_text())


def cut(teacher: nn.Module) -> bool:
    """Whether the teacher's frozen prefix is cut off (its trainable part then reads cached states)."""
    return teacher.frozen > 0


def teacher_inputs(st: TrialContext, feats: Features | None, transfer: TransferSet):
    """What the teacher reads at transfer positions: cached prefix states, or the images themselves."""
    if feats is None:
        return lambda pos: transfer.read(st.prepared.images, pos)
    return lambda pos: feats.transfer_rows(transfer.real, transfer.synthetic, pos)


def transfer_positions(
    st: TrialContext, transfer: TransferSet, logits: np.ndarray | None = None
) -> np.ndarray:
    """The transfer-set positions the student learns from: every real image, and the drawn synthetic images
    that ``synthetic.filter`` keeps: those inside the real manifold (the pool's semantic gate) and, given the
    teacher's ``logits`` on the transfer set, those the teacher is confident on. Sets the record's
    ``synth_drawn`` and ``synth_kept`` when a filter applies."""
    n_real, sc = len(transfer.real), st.cfg.synthetic
    everything = np.arange(len(transfer), dtype=np.int64)
    if sc.filter == "none" or not len(transfer.synthetic):
        return everything
    keep = np.ones(len(transfer.synthetic), bool)
    if sc.filter in ("manifold", "both") and st.pool.semantic is not None:  # None: a pool of <= K images
        keep &= st.pool.semantic["inside"][transfer.synthetic]
    if sc.filter in ("confidence", "both") and logits is not None:
        keep &= confidence(logits, everything[n_real:]) >= sc.min_confidence
    st.record.synth_drawn, st.record.synth_kept = len(keep), int(keep.sum())
    return np.concatenate([everything[:n_real], everything[n_real:][keep]])


def confidence(logits: np.ndarray, positions: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Per row of ``logits`` (N, K, H, W) at ``positions``: the mean over pixels of the largest softmax
    probability (1: certain everywhere; 1/K: no idea)."""
    out = np.empty(len(positions))
    for start in range(0, len(positions), chunk):
        part = torch.from_numpy(np.asarray(logits[positions[start : start + chunk]], np.float32))
        out[start : start + len(part)] = part.softmax(1).amax(1).mean((1, 2)).numpy()
    return out


def student(st: TrialContext) -> nn.Module:
    cfg = st.cfg
    with seeded(cfg.seed):
        return build_student(cfg.student, cfg.data.channels, st.num_classes, cfg.data.image_size).to(
            st.device
        )


def projection(st: TrialContext, student_dim: int, teacher_dim: int) -> FeatureLoss:
    with seeded(st.cfg.seed + 1):
        return FeatureLoss(student_dim, teacher_dim).to(st.device)


def labeled_batches(st: TrialContext) -> LabeledBatches:
    flips = st.flips
    return LabeledBatches(
        st.prepared.images, st.prepared.masks, st.splits.labeled, flips.augment, flips.label_swap
    )


def student_loop(
    st: TrialContext, phase: str, modules: dict, step, epochs: int, steps: int, evaluate_fn=None
) -> Loop:
    """A student phase with the student's optimiser settings, checkpoints and the trial's hooks."""
    s = st.cfg.student
    return Loop(
        phase=phase,
        modules=modules,
        step=step,
        epochs=epochs,
        steps_per_epoch=steps,
        lr=s.lr,
        weight_decay=s.weight_decay,
        seed=st.cfg.seed,
        evaluate=evaluate_fn,
        checkpoint_every=s.checkpoint_every,
        autocast=st.amp,
        hooks=st.hooks,
    )


def fine_tune(st: TrialContext, student: nn.Module, steps: int, report: Report | None) -> dict:
    """The second phase of a pretraining method (ta_kd, mae): the whole student on its supervised loss over
    labelled batches, ``student.epochs`` epochs of ``steps`` steps; reported and checkpointed as ``finetune``
    (a trial resumed in this phase skips the pretraining)."""
    s = st.cfg.student
    labeled, sup = labeled_batches(st), supervised_loss(s.ce_weight, s.dice_weight)

    def step(g):
        x, y = labeled.sample(s.batch_size, g)
        return sup(student(x.to(st.device)), y.to(st.device))

    loop = student_loop(
        st, "finetune", {"student": student}, reseeding(labeled, step), s.epochs, steps, st.validator(student)
    )
    return run_loop(loop, st.out_dir, report, st.resume)


def reseeding(labeled: LabeledBatches, step_fn):
    """Wrap a step so that augmentation is reseeded from each epoch's generator (exact resume)."""
    state = {}

    def step(g):
        if state.get("g") is not g:
            state["g"] = g
            labeled.reseed(int(torch.randint(2**31 - 1, (1,), generator=g)))
        return step_fn(g)

    return step
