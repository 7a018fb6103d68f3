"""The outage journal: MLflow writes that wait in a file while the store is unreachable, then replay.

A trial's writes (and the driver's, to the parent run) go through a :class:`RunTracker`. When MLflow is
down they are appended to ``<search>/mlflow_journal/<name>.jsonl`` (a header line naming the store and
the run, then one JSON line per write) and delivered, in order, once it is back: by the tracker itself,
by the driver's periodic :func:`sync_journals`, or by ``tskd-tune sync`` after the search has ended.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

from filelock import FileLock

from tskd_tune.errors import TskdError
from tskd_tune.secrets import mask_secrets
from tskd_tune.tracking.compare import curves
from tskd_tune.tracking.runs import child_run, client, find_child, numeric

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

# the tracking layer's one logger, under the name it had before it was split into modules
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

    def __init__(
        self,
        uri: str,
        run_id: str | None = None,
        *,
        journal: Path | None = None,
        parent_run_id: str | None = None,
        trial_id: str | None = None,
        run_name: str | None = None,
    ):
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
        return cls(
            uri or header["uri"],
            header.get("run_id"),
            journal=journal,
            parent_run_id=header.get("parent_run_id"),
            trial_id=header.get("trial_id"),
            run_name=header.get("run_name"),
        )

    # ----------------------------------------------------------------------------- the writes
    def start(self) -> bool:
        """Find (a retried or resumed trial) or create the child run; whether it existed already."""
        self._submit({"op": "start"})
        return self.resumed

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log the finite numeric ``metrics`` at ``step``.

        A batch with an ``epoch`` entry is one epoch of a trial: the epoch is the step, and of the batch only
        the curves runs are compared on are logged (:func:`~tskd_tune.tracking.compare.curves`), once.
        """
        values = numeric(metrics)
        op = {"op": "metrics", "step": int(step), "ts": int(time.time() * 1000)}
        if "epoch" in values:
            values, op["epoch"] = curves(values), True
        if values:
            self._submit(op | {"metrics": values})

    def log_params(self, params: dict) -> None:
        """Log ``params`` (values as text, secrets masked); those the run has already are skipped."""
        # masked: a param or tag (an error text) may quote a URI with its password
        self._submit({"op": "params", "params": {k: mask_secrets(str(v))[:6000] for k, v in params.items()}})

    def set_tags(self, tags: dict) -> None:
        """Set ``tags`` (values as text, secrets masked)."""
        self._submit({"op": "tags", "tags": {k: mask_secrets(str(v)) for k, v in tags.items()}})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """Log the file ``path`` (under ``folder`` in the run's artifacts)."""
        self._submit({"op": "artifact", "path": str(Path(path).resolve()), "folder": folder})

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` as the artifact ``artifact_file``."""
        self._submit({"op": "text", "text": text, "file": artifact_file})

    def set_status(self, status: str) -> None:
        """Set the run's status (e.g. RUNNING) without ending it."""
        self._submit({"op": "status", "status": status})

    def finish(self, status: str = "FINISHED") -> None:
        """End the run as ``status`` (FINISHED, FAILED, KILLED)."""
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
                f.write(
                    json.dumps(
                        {
                            "uri": self.uri,
                            "run_id": self.run_id,
                            "parent_run_id": self.parent_run_id,
                            "trial_id": self.trial_id,
                            "run_name": self.run_name,
                        }
                    )
                    + "\n"
                )
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
            epoch = op.get("epoch") or "epoch" in values  # an "epoch" value: a journal of an older version
            if epoch and step <= self._logged_epochs(run_id, min(values)):
                return
            c.log_batch(run_id, metrics=[Metric(k, v, op["ts"], step) for k, v in values.items()])
            if epoch:
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

    def _logged_epochs(self, run_id: str, key: str) -> float:
        """The last epoch the run has: the last step of ``key``, a metric of every epoch batch."""
        if self._epochs_logged is None:
            history = self.client.get_metric_history(run_id, key)
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
