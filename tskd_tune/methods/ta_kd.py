"""Task-agnostic KD (the baseline): distil the frozen pretrained encoder's features on the transfer set,
then fine-tune the student on the labels."""

from __future__ import annotations

import torch

from tskd_tune.data.transforms import paired_transforms
from tskd_tune.methods import common
from tskd_tune.methods.context import Outcome, TrialContext
from tskd_tune.methods.record import FROZEN_ENCODER
from tskd_tune.methods.registry import MethodSpec, register_method
from tskd_tune.models.teacher import ALL_FROZEN
from tskd_tune.train import Report, run_loop
from tskd_tune.transfer import build_transfer_set


def ta_kd(st: TrialContext, report: Report | None) -> Outcome:
    """Task-agnostic KD: match the frozen teacher's encoder features, then fine-tune on the labels."""
    cfg = st.cfg
    transfer = build_transfer_set(st.splits, st.pool, cfg)
    # the whole pretrained encoder, frozen: its cached output is exactly the features distilled here
    teacher = st.teacher_base(frozen=ALL_FROZEN).to(st.device).eval()
    st.record.teacher = FROZEN_ENCODER
    feats = st.teacher_features(teacher)
    st.record.count_transfer(transfer)
    positions = common.transfer_positions(st, transfer)
    student = common.student(st)
    proj = common.projection(st, student.feature_dim, teacher.feature_dim)
    bs = cfg.student.batch_size

    def distil_step(g):
        ti = positions[torch.randint(len(positions), (bs,), generator=g).numpy()]
        deepest = feats.transfer_rows(transfer.real, transfer.synthetic, ti)[-1]
        # feature channels are not classes: nothing to swap, they only move with the image
        x, tf = paired_transforms(
            transfer.read(st.prepared.images, ti), deepest, st.flips.augment, g, channel_swap=None
        )
        return proj(student.features(x.to(st.device))[-1], tf.to(st.device))

    steps = st.steps_per_epoch(transfer)
    with st.timed("student"):
        if st.resume is None or st.resume.get("phase") == "pretrain":
            pre = common.student_loop(
                st,
                "pretrain",
                {"student": student, "projection": proj},
                distil_step,
                cfg.distill.pretrain_epochs,
                steps,
            )
            # pretraining epochs are not reported: the scheduler compares trials on the fine-tuning epochs
            run_loop(pre, st.out_dir, None, st.resume)
        metrics = common.fine_tune(st, student, steps, report)
    # the frozen encoder has no trained head: it is not a segmenter to time or score
    return Outcome(student, metrics, record=st.record)


SPEC = register_method(MethodSpec("ta_kd", ta_kd, teacher="frozen", transfer=True, student=True))
