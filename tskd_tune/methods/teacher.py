"""The fine-tuned teacher itself, evaluated as the model: the upper reference, and a teacher search's trial."""

from __future__ import annotations

from tskd_tune.methods import common
from tskd_tune.methods.context import Outcome, TrialContext
from tskd_tune.methods.registry import MethodSpec, register_method
from tskd_tune.train import Report


def teacher(st: TrialContext, report: Report | None) -> Outcome:
    """The fine-tuned teacher evaluated as the model; every fine-tuning epoch is reported (a teacher that
    comes from the cache reports its final scores once, as its last epoch)."""
    reported: list[int] = []

    def each_epoch(epoch: int, metrics: dict, ckpt) -> None:
        reported.append(epoch)
        if report is not None:
            report(epoch, metrics, ckpt)

    model, teacher_metrics = common.fine_tuned_teacher(st, each_epoch)
    metrics = {
        k.removeprefix("teacher_"): v for k, v in teacher_metrics.items() if k.startswith("teacher_val_")
    }
    metrics |= teacher_metrics
    if report is not None and not reported:
        report(st.cfg.teacher.epochs, metrics | {"epoch": st.cfg.teacher.epochs}, None)
    feats = st.teacher_features(model)

    def evaluate(split: str) -> dict:
        return st.teacher_validator(model, feats, split)()

    return Outcome(model, metrics, model, evaluate, record=st.record)


SPEC = register_method(
    MethodSpec("teacher", teacher, teacher="fine_tuned", transfer=False, student=False, reports="teacher")
)
