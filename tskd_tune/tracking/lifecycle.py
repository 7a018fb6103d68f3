"""A trial's child run from start to end as one ``with`` block: found or created, sampled, ended.

Every trial of a search (and every reference trial beside it) records the same way: its child run is
found by trial id (a retried trial continues its run) or created, written to through a journaled
:class:`RunTracker`, and ended FINISHED, or FAILED with the error, with the journal flushed either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tskd_tune.states import FAILED, FINISHED, MLFLOW_STATUS
from tskd_tune.tracking.journal import RunTracker, journal_path
from tskd_tune.tracking.system import stop_monitor, system_monitor


@dataclass
class TrialRun:
    """The open child run of one trial, as :func:`trial_run` hands it to its body."""

    tracker: RunTracker
    """What the trial writes through (params, metrics, tags, artifacts): the Tracker of ``run_trial``."""
    resumed: bool
    """Whether the run existed already: the trial is a retry or a resumed search's."""
    monitor: object | None = None
    """MLflow's system-metrics sampler on the run, or None."""

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None while the run could not be opened (MLflow unreachable at start)."""
        return self.tracker.run_id

    def stop_monitor(self) -> None:
        """Stop sampling system metrics now (the final metrics and artifacts follow); idempotent."""
        stop_monitor(self.monitor)
        self.monitor = None


def failure_reason(exc: BaseException) -> str:
    """The ``tskd.error`` text of a trial that raised ``exc``: its class and the start of its message."""
    return f"{exc.__class__.__name__}: {str(exc)[:480]}"


@contextmanager
def trial_run(
    uri: str,
    parent_run_id: str,
    trial_id: str,
    run_name: str,
    *,
    search_path: Path | None = None,
    tracking_cfg=None,
) -> Iterator[TrialRun]:
    """The child run of trial ``trial_id`` under ``parent_run_id``, open for the ``with`` block.

    The run is found by its trial id (a retried trial continues its own run) or created as ``run_name``.
    ``search_path``: the search folder, whose ``mlflow_journal/<trial_id>.jsonl`` keeps the writes made
    while MLflow is unreachable (None: no journal, writes go straight to MLflow). ``tracking_cfg``: the
    config's tracking section, whose ``system_metrics`` settings start MLflow's system-metrics sampler
    on the run (None: no sampler).

    A block that raises leaves the run FAILED with tags ``tskd.status=failed`` and ``tskd.error`` (the
    error's class and message, cut to 480 characters, secrets masked) and re-raises; a block that ends
    leaves it FINISHED with ``tskd.status=finished``. The sampler is stopped, then the journal flushed.
    """
    journal = journal_path(search_path, trial_id) if search_path is not None else None
    tracker = RunTracker(
        uri, journal=journal, parent_run_id=parent_run_id, trial_id=trial_id, run_name=run_name
    )
    run = TrialRun(tracker, tracker.start())
    # MLflow's sampler writes to the run directly: a trial that started while MLflow was down goes without
    if tracking_cfg is not None and tracker.run_id:
        run.monitor = system_monitor(tracking_cfg, uri, tracker.run_id, run.resumed)
    try:
        yield run
    except Exception as exc:
        run.stop_monitor()
        tracker.set_tags({"tskd.status": FAILED, "tskd.error": failure_reason(exc)})
        tracker.finish(MLFLOW_STATUS[FAILED])
        tracker.flush()
        raise
    # not `finally`: a process being stopped (SystemExit, KeyboardInterrupt) leaves the run RUNNING, and the
    # driver's finalizer ends it with the status only the driver knows (stopped by the scheduler, errored)
    run.stop_monitor()
    tracker.set_tags({"tskd.status": FINISHED})
    tracker.finish(MLFLOW_STATUS[FINISHED])
    tracker.flush()
