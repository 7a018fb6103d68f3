"""How a trial ends, in one vocabulary: the ``tskd.status`` tag of its MLflow run, the ``state`` column of
leaderboard.csv and ``tskd-tune status`` all use these words (a leaf: no tskd_tune import)."""

from __future__ import annotations

FINISHED = "finished"
"""Ran every epoch and wrote its outputs (student, metrics)."""
STOPPED_EARLY = "stopped_early"
"""Stopped by the scheduler (ASHA) after fewer epochs: a normal outcome of a search, not a failure."""
FAILED = "failed"
"""Raised (non-finite loss, out of memory, full disk, a bug); the reason is in ``tskd.error``."""
TIMED_OUT = "timed_out"
"""Made no progress for ``search.trial_timeout_s`` and was stopped as hung."""
LOST = "lost"
"""Started by a driver that was killed before Ray recorded the trial; the resumed search ran another."""
RUNNING = "running"
"""Reported at least one epoch and has not ended yet (leaderboard only, while the search runs)."""
PENDING = "pending"
"""Not started yet (leaderboard only, while the search runs)."""

ENDED = (FINISHED, STOPPED_EARLY, FAILED, TIMED_OUT, LOST)
"""The five ways a trial ends."""

MLFLOW_STATUS = {
    FINISHED: "FINISHED",
    STOPPED_EARLY: "FINISHED",
    FAILED: "FAILED",
    TIMED_OUT: "KILLED",
    LOST: "KILLED",
}
"""The MLflow run status of each end: a trial stopped early is not shown as failed or killed in MLflow's UI."""
