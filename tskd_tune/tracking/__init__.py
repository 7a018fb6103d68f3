"""MLflow records: one parent run per search, one nested child run per trial.

Runs are created with ``MlflowClient`` and an explicit ``mlflow.parentRunId`` tag rather than Ray's
MLflowLoggerCallback (which cannot nest runs and whose artifact logging is broken, ray#46569), and
without MLflow's global "active run", so trials in one worker process never mix up their runs.
A retried trial finds and continues its own child run (tag ``ray.trial_id``) instead of opening a
second one.

- ``artifacts``: artifacts beside a SQLite store (``mlartifacts/``), re-rooted when the store moves
- ``runs``: the client, the preflight check, parent and child runs (lookup, creation, lost ones closed)
- ``journal``: :class:`RunTracker`, whose writes wait in a journal while MLflow is unreachable
- ``compare``: what a trial's run holds (curves per epoch, a few end metrics, ``trial_summary.json``)
- ``lifecycle``: :func:`trial_run`, a trial's child run from start to FINISHED or FAILED
- ``system``: MLflow's system-metrics sampler on a trial's run
- ``registry``: exported students in the model registry
"""

from tskd_tune.secrets import SECRET_ENV, mask_secrets
from tskd_tune.tracking.artifacts import ARTIFACTS, artifact_location, reroot
from tskd_tune.tracking.compare import KIND_TAG, SUMMARY_FILE, at_end, curves, record_result
from tskd_tune.tracking.journal import (
    JOURNAL_DIR,
    QUICK_HTTP,
    BufferedClient,
    RunTracker,
    journal_path,
    sync_journals,
    unreachable,
)
from tskd_tune.tracking.lifecycle import TrialRun, failure_reason, trial_run
from tskd_tune.tracking.registry import register_export
from tskd_tune.tracking.runs import (
    SEARCH_TAG,
    TRIAL_TAG,
    absolute_uri,
    child_run,
    client,
    close_lost_children,
    experiment_id,
    find_child,
    numeric,
    parent_run,
    preflight,
)
from tskd_tune.tracking.system import stop_monitor, system_monitor

__all__ = [
    "ARTIFACTS",
    "JOURNAL_DIR",
    "KIND_TAG",
    "QUICK_HTTP",
    "SEARCH_TAG",
    "SECRET_ENV",
    "SUMMARY_FILE",
    "TRIAL_TAG",
    "BufferedClient",
    "RunTracker",
    "TrialRun",
    "absolute_uri",
    "artifact_location",
    "at_end",
    "child_run",
    "client",
    "curves",
    "close_lost_children",
    "experiment_id",
    "failure_reason",
    "find_child",
    "journal_path",
    "mask_secrets",
    "numeric",
    "parent_run",
    "preflight",
    "record_result",
    "register_export",
    "reroot",
    "stop_monitor",
    "sync_journals",
    "system_monitor",
    "trial_run",
    "unreachable",
]
