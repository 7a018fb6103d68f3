"""MLflow records: one parent run per search, one nested child run per trial.

Runs are created with ``MlflowClient`` and an explicit ``mlflow.parentRunId`` tag rather than Ray's
MLflowLoggerCallback (which cannot nest runs and whose artifact logging is broken, ray#46569), and
without MLflow's global "active run", so trials in one worker process never mix up their runs.
A retried trial finds and continues its own child run (tag ``ray.trial_id``) instead of opening a
second one.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

from tskd_tune.errors import TskdError

SEARCH_TAG = "tskd.search"
TRIAL_TAG = "ray.trial_id"
# where secrets come from: never from a config file, only from these environment variables
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_AUTH_ADMIN_PASSWORD",
              "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY", "PGPASSWORD", "RAY_AUTH_TOKEN")  # fmt: skip
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/:@\s]*):[^/@\s]*@")


def mask_secrets(text: str) -> str:
    """``text`` with URI passwords (``scheme://user:***@host``) and secret environment values as ``***``."""
    text = _URI_PASSWORD.sub(r"\g<head>:***@", text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:  # a one-letter "secret" would mask half the text
            text = text.replace(value, "***")
    return text


def absolute_uri(uri: str) -> str:
    """Make a relative ``sqlite:///runs/mlflow.db`` absolute: trials run in other working directories."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix) :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


def client(uri: str):
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
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else c.create_experiment(name)


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
    c = client(uri)
    exp_id = c.get_run(parent_run_id).info.experiment_id
    flt = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
    found = c.search_runs([exp_id], filter_string=flt, max_results=1)
    return found[0].info.run_id if found else None


def numeric(metrics: dict) -> dict[str, float]:
    """The finite numeric entries of a metrics dict (MLflow stores floats only)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or isinstance(v, int | float) and math.isfinite(v):
            out[k] = float(v)
    return out


class RunTracker:
    """Logs to one MLflow run; implements the trial's Tracker protocol."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.client = client(uri)

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, v, ts, step) for k, v in numeric(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        # a resumed trial logs the same params again; MLflow refuses changed values, equal ones are skipped
        new = [Param(k, mask_secrets(str(v))[:6000]) for k, v in params.items() if k not in existing]
        if new:
            self.client.log_batch(self.run_id, params=new)

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, mask_secrets(str(v)))  # error texts may quote a URI

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def system_monitor(tracking_cfg, uri: str, run_id: str, resumed: bool):
    """MLflow's own system-metrics sampler on ``run_id`` (``system/cpu_utilization_percentage``,
    ``system/gpu_0_utilization_percentage`` with pynvml, ...), or None when switched off."""
    if not tracking_cfg.system_metrics:
        return None
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # its per-start "Started monitoring" info lines would fill every trial's log
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=tracking_cfg.system_metrics_interval_s,
                                   resume_logging=resumed, tracking_uri=uri)  # fmt: skip
    monitor.start()
    return monitor


def stop_monitor(monitor) -> None:
    """Stop sampling and flush what was sampled (before the run is marked finished)."""
    if monitor is not None:
        monitor.finish()


def register_export(uri: str, export_dir: Path, card: dict, name: str) -> str:
    """Log an exported student as an MLflow model and register it as ``name``; returns the version."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(card["config"]["tracking"]["experiment"])
    with mlflow.start_run(run_name=f"register-{name}") as run:
        mlflow.log_dict(card, "model_card.json")
        mlflow.log_metrics(numeric(card.get("metrics", {})))
        import onnx

        model = onnx.load(str(Path(export_dir) / card["file"]))
        info = mlflow.onnx.log_model(model, name="student", registered_model_name=name)
    client(uri).set_tag(run.info.run_id, "tskd.registered_model", name)
    return str(info.registered_model_version)
