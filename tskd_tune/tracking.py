"""MLflow records: one parent run per search, one nested child run per trial.

Runs are created with ``MlflowClient`` and an explicit ``mlflow.parentRunId`` tag rather than Ray's
MLflowLoggerCallback (which cannot nest runs and whose artifact logging is broken, ray#46569), and
without MLflow's global "active run", so trials in one worker process never mix up their runs.
A retried trial finds and continues its own child run (tag ``ray.trial_id``) instead of opening a
second one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

from filelock import FileLock

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
            c.set_tag(run.info.run_id, "tskd.status", "lost")
            c.set_terminated(run.info.run_id, status="KILLED")
            lost.append(trial_id)
    return lost


def numeric(metrics: dict) -> dict[str, float]:
    """The finite numeric entries of a metrics dict (MLflow stores floats only)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or isinstance(v, int | float) and math.isfinite(v):
            out[k] = float(v)
    return out


JOURNAL_DIR = "mlflow_journal"  # <search>/mlflow_journal/<trial_id>.jsonl and parent.jsonl
# MLflow's default HTTP policy retries a request for minutes; in a search a down server must not stall
# training: a write fails within seconds and is journaled instead (see RunTracker)
QUICK_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # nor print a "View run ... at: URL" line on stdout for every run it ends
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
# MLflow error codes that mean "not now" rather than "never": the write is kept and retried
_TRANSIENT = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}

log = logging.getLogger("tskd_tune.tracking")


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` from an MLflow call means the store is unreachable or busy (retry later)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT
    if isinstance(exc, OSError):  # requests' connection errors are OSErrors
        return True
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - mlflow depends on sqlalchemy
        return False
    return isinstance(exc, OperationalError)  # e.g. "database is locked"


class RunTracker:
    """Writes to one MLflow run, and keeps every write when MLflow is unreachable.

    With a ``journal`` file, a write that fails because the store is unreachable is appended to the
    journal (JSON lines) instead, and so is every later write, so that their order is kept. The
    journal is replayed, in order, at most every ``retry_s`` seconds while the run is written to, by
    :meth:`flush`, and by ``tskd-tune sync`` for a run whose process has ended. Replays are idempotent:
    params already in the run are skipped, tags and statuses are overwritten, and a metrics batch of an
    epoch the run already has (logged by an attempt that died before its checkpoint was recorded, and
    re-run on resume) is not logged twice.

    A trial's tracker starts without a run id (:meth:`start` finds or creates its child run), so even a
    trial that starts while MLflow is down trains and records. Implements the trial's Tracker protocol.
    """

    retry_s = 10.0

    def __init__(self, uri: str, run_id: str | None = None, *, journal: Path | None = None,
                 parent_run_id: str | None = None, trial_id: str | None = None, run_name: str | None = None):  # fmt: skip
        for k, v in QUICK_HTTP.items():
            os.environ.setdefault(k, v)
        self.uri, self.run_id = uri, run_id
        self.parent_run_id, self.trial_id, self.run_name = parent_run_id, trial_id, run_name
        self.journal = Path(journal) if journal is not None else None
        if self.journal is not None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
        self.client = client(uri)
        self.resumed = False
        self._epochs_logged: float | None = None  # highest epoch the run has (see class docstring)
        self._lock = threading.RLock()
        self._next_try = 0.0

    @classmethod
    def from_journal(cls, journal: Path, uri: str | None = None) -> RunTracker:
        """The tracker that wrote ``journal`` (its header names the store and the run); ``uri``: another
        address of the same store."""
        header = json.loads(Path(journal).read_text().splitlines()[0])
        return cls(uri or header["uri"], header.get("run_id"), journal=journal, parent_run_id=header.get("parent_run_id"),
                   trial_id=header.get("trial_id"), run_name=header.get("run_name"))  # fmt: skip

    # ----------------------------------------------------------------------------- the writes
    def start(self) -> bool:
        """Find (a retried or resumed trial) or create the child run; whether it existed already."""
        self._submit({"op": "start"})
        return self.resumed

    def log_metrics(self, metrics: dict, step: int) -> None:
        values = numeric(metrics)
        if values:
            self._submit(
                {"op": "metrics", "metrics": values, "step": int(step), "ts": int(time.time() * 1000)}
            )

    def log_params(self, params: dict) -> None:
        # masked: a param or tag (an error text) may quote a URI with its password
        self._submit({"op": "params", "params": {k: mask_secrets(str(v))[:6000] for k, v in params.items()}})

    def set_tags(self, tags: dict) -> None:
        self._submit({"op": "tags", "tags": {k: mask_secrets(str(v)) for k, v in tags.items()}})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._submit({"op": "artifact", "path": str(Path(path).resolve()), "folder": folder})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit({"op": "text", "text": text, "file": artifact_file})

    def set_status(self, status: str) -> None:
        self._submit({"op": "status", "status": status})

    def finish(self, status: str = "FINISHED") -> None:
        self._submit({"op": "finish", "status": status})

    def finalize(self, status: str, tags: dict) -> None:
        """Only if the run is still RUNNING (its trial did not end it): set ``tags`` and end it as ``status``."""
        tags = {k: mask_secrets(str(v)) for k, v in tags.items()}
        self._submit({"op": "finalize", "status": status, "tags": tags})

    def flush(self) -> int:
        """Deliver the journal now; returns how many writes are still queued (0: all delivered)."""
        if self.journal is None:
            return 0
        with self._lock, FileLock(str(self.journal) + ".lock"):
            return self._replay(force=True)

    def pending(self) -> int:
        """Writes queued in the journal."""
        return len(self._read()[1]) if self.journal is not None and self.journal.is_file() else 0

    # ---------------------------------------------------------------------------- machinery
    def _submit(self, op: dict) -> None:
        if self.run_id is not None:
            op.setdefault("run_id", self.run_id)
        with self._lock:
            if self.journal is None:
                self._apply(op)
                return
            # the driver (finalize) and the trial may write to one run's journal: a file lock orders them
            with FileLock(str(self.journal) + ".lock"):
                if self.journal.is_file():  # writes are queued already: this one goes behind them
                    self._append(op)
                    self._replay()
                    return
                try:
                    self._apply(op)
                except Exception as exc:
                    if not unreachable(exc):
                        raise
                    self._append(op)
                    self._next_try = time.monotonic() + self.retry_s
                    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                    log.warning(
                        "MLflow unreachable (%s); writes are kept in %s until it is back", first, self.journal
                    )

    def _append(self, op: dict) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        if op["op"] == "artifact" and Path(op["path"]).is_file():
            # a copy beside the journal: the original may live in a temporary folder (Ray's session
            # folder) that is gone by the time MLflow is back
            copy = self._files / uuid.uuid4().hex[:12] / Path(op["path"]).name
            copy.parent.mkdir(parents=True)
            shutil.copy2(op["path"], copy)
            op = op | {"path": str(copy)}
        new = not self.journal.is_file()
        with self.journal.open("a") as f:
            if new:
                f.write(json.dumps({"uri": self.uri, "run_id": self.run_id, "parent_run_id": self.parent_run_id,
                                    "trial_id": self.trial_id, "run_name": self.run_name}) + "\n")  # fmt: skip
            f.write(json.dumps(op) + "\n")

    def _read(self) -> tuple[dict, list[dict]]:
        lines = [ln for ln in self.journal.read_text().splitlines() if ln.strip()]
        if not lines:
            return {}, []
        ops = []
        for ln in lines[1:]:
            try:
                ops.append(json.loads(ln))
            except ValueError:  # a line cut short by a crash mid-write: nothing after it was written
                break
        return json.loads(lines[0]), ops

    def _replay(self, force: bool = False) -> int:
        if not self.journal.is_file():
            return 0
        if not force and time.monotonic() < self._next_try:
            return -1
        header, ops = self._read()
        for i, op in enumerate(ops):
            try:
                self._apply(op)
            except Exception as exc:
                if unreachable(exc):
                    tmp = self.journal.with_name(self.journal.name + ".tmp")
                    tmp.write_text("".join(json.dumps(x) + "\n" for x in [header, *ops[i:]]))
                    os.replace(tmp, self.journal)
                    self._next_try = time.monotonic() + self.retry_s
                    return len(ops) - i
                self._reject(op, exc)
        self.journal.unlink()
        shutil.rmtree(self._files, ignore_errors=True)
        log.warning("MLflow is back: %d queued write(s) delivered from %s", len(ops), self.journal)
        return 0

    @property
    def _files(self) -> Path:
        return self.journal.with_suffix(".files")

    def _reject(self, op: dict, exc: Exception) -> None:
        """A queued write MLflow refuses for good (not an outage) is set aside, never silently dropped."""
        rejected = self.journal.with_suffix(".rejected")
        log.warning("MLflow refused a queued write (%s): %s; kept in %s", op["op"], exc, rejected)
        with rejected.open("a") as f:
            f.write(json.dumps(op | {"error": str(exc)[:500]}) + "\n")

    def _run(self, op: dict) -> str | None:
        run_id = op.get("run_id") or self.run_id
        if run_id is None and self.trial_id is not None:
            run_id = self.run_id = find_child(self.uri, self.parent_run_id, self.trial_id)
        return run_id

    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric, Param

        kind, c = op["op"], self.client
        if kind == "start":
            self.run_id, self.resumed = child_run(self.uri, self.parent_run_id, self.trial_id, self.run_name)
            self._epochs_logged = None if self.resumed else 0
            return
        run_id = self._run(op)
        if run_id is None:
            if kind == "finalize":
                return  # the trial never opened a run: nothing to end
            raise TskdError(f"MLflow: no run for trial {self.trial_id} under parent {self.parent_run_id}")
        if kind == "metrics":
            values, step = op["metrics"], op["step"]
            if "epoch" in values and step <= self._logged_epochs(run_id):
                return
            c.log_batch(run_id, metrics=[Metric(k, v, op["ts"], step) for k, v in values.items()])
            if "epoch" in values:
                self._epochs_logged = step
        elif kind == "params":
            existing = c.get_run(run_id).data.params
            # a resumed trial logs its params again; MLflow refuses changed values, equal ones are skipped
            new = [Param(k, v) for k, v in op["params"].items() if k not in existing]
            if new:
                c.log_batch(run_id, params=new)
        elif kind == "tags":
            for k, v in op["tags"].items():
                c.set_tag(run_id, k, v)
        elif kind == "artifact":
            if not Path(op["path"]).exists():
                raise TskdError(f"{op['path']}: the artifact is gone")
            c.log_artifact(run_id, op["path"], op["folder"])
        elif kind == "text":
            c.log_text(run_id, op["text"], op["file"])
        elif kind == "status":
            c.update_run(run_id, status=op["status"])
        elif kind == "finish":
            c.set_terminated(run_id, status=op["status"])
        elif kind == "finalize":
            if c.get_run(run_id).info.status == "RUNNING":
                for k, v in op["tags"].items():
                    c.set_tag(run_id, k, v)
                c.set_terminated(run_id, status=op["status"])
        else:
            raise TskdError(f"{self.journal}: unknown MLflow write {kind!r}")

    def _logged_epochs(self, run_id: str) -> float:
        if self._epochs_logged is None:
            history = self.client.get_metric_history(run_id, "epoch")
            self._epochs_logged = max((m.step for m in history), default=0)
        return self._epochs_logged


class BufferedClient:
    """The MlflowClient writes the driver makes to a search's parent run, journaled as RunTracker's are.

    Writes take the MlflowClient signatures (so driver code reads like plain MLflow); reads pass through.
    """

    def __init__(self, uri: str, journal: Path):
        self._uri, self._journal = uri, Path(journal)
        self._trackers: dict[str, RunTracker] = {}

    def _t(self, run_id: str) -> RunTracker:
        if run_id not in self._trackers:
            self._trackers[run_id] = RunTracker(self._uri, run_id, journal=self._journal)
        return self._trackers[run_id]

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self._t(run_id).log_artifact(Path(local_path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._t(run_id).log_text(text, artifact_file)

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        steps: dict[int, dict] = {}
        for m in metrics:
            steps.setdefault(m.step, {})[m.key] = m.value
        for step, values in steps.items():
            self._t(run_id).log_metrics(values, step)
        if params:
            self._t(run_id).log_params({p.key: p.value for p in params})
        if tags:
            self._t(run_id).set_tags({t.key: t.value for t in tags})

    def set_tag(self, run_id: str, key: str, value) -> None:
        self._t(run_id).set_tags({key: value})

    def update_run(self, run_id: str, status: str | None = None, name: str | None = None) -> None:
        if status is not None:
            self._t(run_id).set_status(status)

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        self._t(run_id).finish(status)

    def __getattr__(self, name: str):
        return getattr(client(self._uri), name)


def journal_path(search_path: Path, name: str) -> Path:
    """The journal of a search's run ``name`` (a trial id, or ``parent``)."""
    return Path(search_path) / JOURNAL_DIR / f"{name}.jsonl"


def sync_journals(search_path: Path, uri: str | None = None, probe: bool = False) -> tuple[int, int, int]:
    """Replay every MLflow journal of a search (to ``uri`` if the store has moved):
    (journals, writes delivered, writes still queued). ``probe``: stop at the first journal that
    cannot be delivered (MLflow still down), so that a periodic attempt stays cheap."""
    journals = sorted((Path(search_path) / JOURNAL_DIR).glob("*.jsonl"))
    delivered = queued = 0
    for journal in journals:
        try:
            tracker = RunTracker.from_journal(journal, uri)
        except (OSError, ValueError, IndexError):
            continue  # delivered and removed meanwhile by its own trial
        before = tracker.pending()
        left = tracker.flush()
        delivered += before - left
        queued += left
        if left and probe:
            break
    return len(journals), delivered, queued


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
