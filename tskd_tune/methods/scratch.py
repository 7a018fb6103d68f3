"""The student trained on the labelled images only (the reference every distillation must beat)."""

from __future__ import annotations

from tskd_tune.losses import supervised_loss
from tskd_tune.methods import common
from tskd_tune.methods.context import Outcome, TrialContext
from tskd_tune.methods.registry import MethodSpec, register_method
from tskd_tune.train import Report, run_loop
from tskd_tune.transfer import build_transfer_set


def scratch(st: TrialContext, report: Report | None) -> Outcome:
    """The student trained on the labelled images only (same steps per epoch as the KD methods)."""
    cfg = st.cfg
    student = common.student(st)
    labeled, sup = common.labeled_batches(st), supervised_loss(cfg.student.ce_weight, cfg.student.dice_weight)
    st.record.transfer_real, st.record.transfer_synthetic = 0, 0  # it learns from no transfer set

    def step(g):
        x, y = labeled.sample(cfg.student.batch_size, g)
        return sup(student(x.to(st.device)), y.to(st.device))

    loop = common.student_loop(
        st,
        "student",
        {"student": student},
        common.reseeding(labeled, step),
        cfg.student.epochs,
        st.steps_per_epoch(build_transfer_set(st.splits)),
        st.validator(student),
    )
    with st.timed("student"):
        metrics = run_loop(loop, st.out_dir, report, st.resume)
    return Outcome(student, metrics, record=st.record)


SPEC = register_method(MethodSpec("scratch", scratch, teacher=None, transfer=False, student=True))
