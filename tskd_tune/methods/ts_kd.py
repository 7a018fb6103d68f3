"""Task-specific KD: the teacher fine-tuned on the labels, then its logits distilled on the transfer set.

The student's loss is ``sup_weight * DiceCE`` on labelled batches + ``kd_weight * T^2 * KL`` against the
teacher's cached logits on transfer batches (augmented together with them), + ``feature_weight`` * a
feature loss through a learned projection."""

from __future__ import annotations

import torch
from torch import nn

from tskd_tune.data.transforms import paired_transforms
from tskd_tune.losses import kd_loss, supervised_loss
from tskd_tune.methods import common
from tskd_tune.methods.context import Outcome, TrialContext, rows
from tskd_tune.methods.registry import MethodSpec, register_method
from tskd_tune.train import Report, run_loop
from tskd_tune.transfer import build_transfer_set, cached_outputs, teacher_key


def ts_kd(st: TrialContext, report: Report | None) -> Outcome:
    """Task-specific KD: fine-tuned teacher's soft labels on the transfer set + supervised loss on labels."""
    cfg, d = st.cfg, st.cfg.distill
    teacher, teacher_metrics = common.fine_tuned_teacher(st)
    transfer = build_transfer_set(st.splits, st.pool, cfg)
    read = common.teacher_inputs(st, st.teacher_features(teacher), transfer)
    with st.timed("transfer"):
        key = teacher_key(cfg, st.prepared, st.splits)
        logits, st.record.logits_cached = cached_outputs(
            st.store,
            "logits",
            key,
            transfer,
            read,
            teacher.from_state if common.cut(teacher) else teacher,
            st.device,
            amp=st.amp,
        )
        feats = None
        if d.feature_weight > 0:
            deepest = (
                (lambda s: teacher.features_from(s)[-1])
                if common.cut(teacher)
                else (lambda x: teacher.features(x)[-1])
            )
            feats, _ = cached_outputs(
                st.store, "features", key, transfer, read, deepest, st.device, amp=st.amp
            )
    st.record.count_transfer(transfer)
    positions = common.transfer_positions(st, transfer, logits)
    student = common.student(st)
    modules: dict[str, nn.Module] = {"student": student}
    feat_loss = None
    if feats is not None:
        feat_loss = common.projection(st, student.feature_dim, feats.shape[1])
        modules["projection"] = feat_loss
    labeled, sup = common.labeled_batches(st), supervised_loss(cfg.student.ce_weight, cfg.student.dice_weight)
    bs = cfg.student.batch_size

    def step(g):
        xl, yl = labeled.sample(bs, g)
        ti = positions[torch.randint(len(positions), (bs,), generator=g).numpy()]
        # soft labels have a channel per class: a flip moves the left class's into the right class's channel
        xt, lt = paired_transforms(
            transfer.read(st.prepared.images, ti),
            rows(logits, ti),
            st.flips.augment,
            g,
            channel_swap=st.flips.label_swap,
        )
        xl, yl, xt, lt = (t.to(st.device) for t in (xl, yl, xt, lt))
        loss = d.sup_weight * sup(student(xl), yl) + d.kd_weight * kd_loss(student(xt), lt, d.temperature)
        if feat_loss is not None:
            # features are not flipped with the images: feature matching is computed on unflipped inputs
            xf = transfer.read(st.prepared.images, ti).to(st.device)
            loss = loss + d.feature_weight * feat_loss(
                student.features(xf)[-1], rows(feats, ti).to(st.device)
            )
        return loss

    loop = common.student_loop(
        st,
        "student",
        modules,
        common.reseeding(labeled, step),
        cfg.student.epochs,
        st.steps_per_epoch(transfer),
        st.validator(student),
    )
    with st.timed("student"):
        metrics = run_loop(loop, st.out_dir, report, st.resume)
    return Outcome(student, metrics | teacher_metrics, teacher, record=st.record)


SPEC = register_method(MethodSpec("ts_kd", ts_kd, teacher="fine_tuned", transfer=True, student=True))
