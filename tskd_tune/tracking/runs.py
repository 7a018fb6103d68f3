"""Finding and creating runs: the store's client, its preflight check, a search's parent run and its
trials' child runs (one per trial id, continued when the trial is retried)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from tskd_tune.errors import TskdError
from tskd_tune.secrets import mask_secrets
from tskd_tune.states import LOST, MLFLOW_STATUS
from tskd_tune.tracking.artifacts import artifact_location

SEARCH_TAG = "tskd.search"
TRIAL_TAG = "ray.trial_id"
KIND_TAG = "mlflow.experimentKind"
KIND = {KIND_TAG: "custom_model_development"}
"""The experiment tag MLflow's UI reads to open an experiment on its training runs (not on GenAI traces)."""


def absolute_uri(uri: str) -> str:
    """Make a relative ``sqlite:///runs/mlflow.db`` absolute: trials run in other working directories."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix) :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


def client(uri: str):
    """An ``MlflowClient`` on ``uri``, never MLflow's global state (trials share worker processes)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def preflight(uri: str) -> None:
    """Fail in one line, before any trial starts, when the tracking store cannot be reached.

    Trials keep MLflow's patient retry policy; this one check answers within seconds instead.
    """
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update({k: v for k, v in quick.items() if saved[k] is None})
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "MLflow unusable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise TskdError(mask_secrets(f"tracking.uri: cannot use MLflow at {uri}: {first[:200]}")) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def experiment_id(uri: str, name: str) -> str:
    """The id of the experiment ``name``, created if it does not exist yet, with its artifacts beside a SQLite
    store (:func:`~tskd_tune.tracking.artifacts.artifact_location`) and shown by MLflow's UI as model training."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, artifact_location=artifact_location(uri, name), tags=KIND)
    if KIND_TAG not in exp.tags:  # an experiment made elsewhere: MLflow's UI would open it as GenAI traces
        c.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND[KIND_TAG])
    return exp.experiment_id


def parent_run(uri: str, experiment: str, search_path: str, run_name: str, tags: dict) -> str:
    """The search's parent run: reused when the same search (its storage folder) is resumed."""
    c = client(uri)
    exp_id = experiment_id(uri, experiment)
    found = c.search_runs([exp_id], filter_string=f"tags.`{SEARCH_TAG}` = '{search_path}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(exp_id, run_name=run_name, tags={SEARCH_TAG: search_path, **tags})
    return run.info.run_id


def child_run(uri: str, parent_run_id: str, trial_id: str, run_name: str) -> tuple[str, bool]:
    """The trial's child run under ``parent_run_id``; (run id, whether it already existed)."""
    c = client(uri)
    parent = c.get_run(parent_run_id)
    exp_id = parent.info.experiment_id
    flt = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
    found = c.search_runs([exp_id], filter_string=flt, max_results=1)
    if found:
        c.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, True
    run = c.create_run(
        exp_id, run_name=run_name, tags={"mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id}
    )
    return run.info.run_id, False


def find_child(uri: str, parent_run_id: str, trial_id: str) -> str | None:
    """The id of the trial's child run under ``parent_run_id``, or None if it has none yet."""
    c = client(uri)
    exp_id = c.get_run(parent_run_id).info.experiment_id
    flt = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
    found = c.search_runs([exp_id], filter_string=flt, max_results=1)
    return found[0].info.run_id if found else None


def close_lost_children(uri: str, parent_run_id: str, known) -> list[str]:
    """End the RUNNING child runs of trials the search does not know (``known(trial_id)`` is False).

    A driver killed right after a trial opened its run, before Ray saved the trial in its experiment
    state, leaves that run behind; the resumed search proposes a new trial instead. The run is ended
    KILLED with ``tskd.status=lost``, so that none is left RUNNING. Returns the trial ids.
    """
    c = client(uri)
    exp_id = c.get_run(parent_run_id).info.experiment_id
    flt = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    lost = []
    for run in c.search_runs([exp_id], filter_string=flt, max_results=10000):
        trial_id = run.data.tags.get(TRIAL_TAG)
        if trial_id is not None and not known(trial_id):
            c.set_tag(run.info.run_id, "tskd.status", LOST)
            c.set_terminated(run.info.run_id, status=MLFLOW_STATUS[LOST])
            lost.append(trial_id)
    return lost


def numeric(metrics: dict) -> dict[str, float]:
    """The finite numeric entries of a metrics dict (MLflow stores floats only)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or isinstance(v, int | float) and math.isfinite(v):
            out[k] = float(v)
    return out
