"""What a trial's MLflow run holds, so that runs compare at a glance in MLflow's UI: a few curves per epoch,
a short list of end-of-trial metrics and a few tags. The rest of what ``run_trial`` returned (timings,
counts, cache flags, synthetic-gate figures) is one ``trial_summary.json`` artifact, not metrics."""

from __future__ import annotations

from tskd_tune.cache import json_text
from tskd_tune.tracking.runs import numeric

CURVES = ("val_dice", "val_hd95", "train_loss", "lr")
"""Logged every epoch, with the per-class ``val_dice_<class>``. MLflow shows a metric's last value in its
tables: the last epoch's, which is the trial's final validation score (there is no ``final_val_dice``)."""
AT_END = ("test_dice", "test_hd95", "teacher_val_dice", "student_params", "student_latency_ms")
"""Logged once, when the trial ends, with the per-class ``test_dice_<class>`` (test scores: reference trials
only). The search adds ``gain_vs_scratch`` (val Dice over the scratch reference trial) when it ends."""
FLAG_TAGS = {
    "teacher_features_cached": "tskd.features_cached",
    "logits_cached": "tskd.logits_cached",
    "synth_cached": "tskd.synth_cached",
    "synth_gate_passed": "tskd.synth_gate_passed",
}
"""Cache and gate flags of the result, as tags beside ``tskd.teacher_cached`` (where the trial has them)."""
KIND_TAG = "tskd.kind"
"""What a child run is, as a tag a filter can ask for (MLflow's search cannot ask for a tag's absence):
``trial`` (a trial the leaderboard ranks: a joint search's, a staged search's student stage), ``teacher_trial``
(a staged search's teacher stage) or ``reference`` (a reference trial beside the search)."""
SUMMARY_FILE = "trial_summary.json"
"""Everything ``run_trial`` returned (what the trial's metrics.json holds), one artifact per run."""


def curves(metrics: dict) -> dict:
    """Of one epoch's ``metrics``, the curves runs are compared on (:data:`CURVES`), ``val_dice`` first: MLflow's
    UI lists a run's metrics in the order they were first logged."""
    keys = sorted(
        (k for k in metrics if k in CURVES or k.startswith("val_dice_")),
        key=lambda k: (CURVES.index(k) if k in CURVES else 0.5, k),
    )
    return {k: metrics[k] for k in keys}


def at_end(result) -> dict:
    """Of a trial's result, the finite end-of-trial metrics (:data:`AT_END`)."""
    return {k: v for k, v in numeric(result).items() if k in AT_END or k.startswith("test_dice_")}


def record_result(tracker, result, step: int) -> None:
    """Write the end of a trial to its run: end-of-trial metrics at ``step`` (its last epoch), tags,
    ``trial_summary.json`` and the output files (config, student, overlays)."""
    tracker.log_metrics(at_end(result), step=step)
    flags = {tag: result[k] for k, tag in FLAG_TAGS.items() if result.get(k) is not None}
    tracker.set_tags(result.tags() | flags)
    tracker.log_text(json_text(dict(result)), SUMMARY_FILE)  # strict JSON: an undefined score is null
    for path in result.files:
        if path.name != "metrics.json":  # its content is trial_summary.json
            tracker.log_artifact(path)
