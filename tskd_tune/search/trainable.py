"""The Ray Tune trainable: a thin adapter from a trial's sampled values to :func:`~tskd_tune.trial.run_trial`.

It builds the trial's config once, opens its MLflow child run, installs the watchdog and the loop hooks,
calls the engine, and reports to Tune; everything the trial measures and writes is ``run_trial``'s.
Reference trials (the scratch student, the teacher) run through :func:`reference_trial`, a Ray task
beside the search.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from tskd_tune import faults, tracking
from tskd_tune.config import END_OF_TRIAL_METRICS, Config, apply_values, to_yaml
from tskd_tune.methods import get_method
from tskd_tune.models.teacher import is_pretrained
from tskd_tune.search.folder import REFERENCES, SearchRun
from tskd_tune.search.staged import CHOICE
from tskd_tune.states import MLFLOW_STATUS, TIMED_OUT
from tskd_tune.trial import TrialResult, resolve_device, run_trial


def trial(config: dict, data: tuple, base: Config, run: SearchRun) -> None:
    """One Ray Tune trial: sampled values -> config -> child MLflow run -> ``run_trial``, reporting every epoch."""
    from ray import tune

    os.environ.update(run.mlflow_env)  # before the first MLflow call: credentials this worker lacks
    for name in ("ray.tune", "ray.train"):  # one "checkpoint created" line per epoch is noise
        logging.getLogger(name).setLevel(logging.WARNING)
    values = dict(config)
    if (
        CHOICE in values
    ):  # a staged search's student stage: the chosen teacher's values, a config of real paths
        values |= run.teachers[values.pop(CHOICE)]
        base = base.model_copy(
            update={
                "search": base.search.model_copy(
                    update={"space": {k: v for k, v in base.search.space.items() if k != CHOICE}}
                )
            }
        )
    cfg = apply_values(base, values)
    _cap_gpu_memory(cfg)
    ctx, state = tune.get_context(), run.state_path
    marker = faults.marker_path(state, ctx.get_trial_id())
    faults.fail_if_failed_before(marker)  # a trial that raised would fail the same way again: no retry
    report = TuneReport(cfg)
    with (
        faults.recorded(marker),
        tracking.trial_run(
            run.tracking_uri,
            run.parent_run_id,
            ctx.get_trial_id(),
            ctx.get_trial_name(),
            search_path=state,
            tracking_cfg=cfg.tracking,
        ) as mlflow_run,
        faults.watchdog(
            cfg.search.trial_timeout_s,
            partial(_timed_out, marker, mlflow_run.tracker, cfg.search.trial_timeout_s),
        ),
    ):
        tracker = report.tracker = mlflow_run.tracker
        tracker.log_params(
            config | {"distill.method": cfg.distill.method, "student.model": cfg.student.model}
        )
        stage = {"tskd.stage": run.stage} if run.stage else {}
        kind = {tracking.KIND_TAG: "teacher_trial" if run.stage == "teacher" else "trial"}
        tracker.set_tags(_run_tags(cfg) | {"resumed": mlflow_run.resumed} | stage | kind)
        # at the start: a trial stopped early never reaches its end
        tracker.log_text(to_yaml(cfg), "config.yaml")
        if not mlflow_run.resumed:  # likewise its student's size and speed, which its weights do not change
            report.with_first_epoch = student_measures(cfg, len(data[0].classes))
        result = run_trial(
            cfg,
            report,
            tracker,
            out_dir=_working_dir() / "outputs",
            resume_from=_restored(),
            data=data,
            hooks=faults.trial_hooks(),
        )
        mlflow_run.stop_monitor()
        tracking.record_result(tracker, result, step=report.last_epoch)
    report.final(result)  # after the run is ended: the scheduler may stop the trial at any report


class TuneReport:
    """``report(epoch, metrics, checkpoint)`` for ``run_trial``: finite numbers to Tune with a checkpoint; the
    last epoch's report is held back until the trial has written its outputs (:meth:`final`).

    Every report carries ``cpu_s``: the CPU-seconds the trial's process has spent since the trial started
    (a trial stopped early reports what it spent until then; a retried one counts from its retry)."""

    def __init__(self, cfg: Config):
        self.objectives = [m for m, _ in cfg.search.objective_items()]
        self.at_end = [m for m in self.objectives if m in END_OF_TRIAL_METRICS]
        self.last_epoch = get_method(cfg.distill.method).reported_epochs(cfg)
        self.tracker, self.held = None, {}
        self.with_first_epoch: dict = {}
        """Metrics known at the start, logged beside the first epoch's (after its score: MLflow's compare view
        plots the first metric every run has, which should be the score)."""
        self.cpu0 = time.process_time()  # the compute this trial spends: its process's CPU time, all threads

    def __call__(self, epoch: int, metrics: dict, ckpt: Path | None) -> None:
        faults.beat()
        if self.with_first_epoch and self.tracker is not None:
            self.tracker.log_metrics(self.with_first_epoch, step=epoch)
            self.with_first_epoch = {}
        out = {k: v for k, v in tracking.numeric(metrics).items() if math.isfinite(v)}
        for name in self.objectives:  # a non-finite score would reach ASHA and Optuna as a result
            if name in metrics and name not in out:
                raise faults.TrialFailed(
                    f"{name} is {metrics[name]} at epoch {epoch}; not reported to the searcher"
                )
        out |= {"epoch": epoch, "cpu_s": round(time.process_time() - self.cpu0, 2)} | self._ids()
        # Tune wants every objective in every result; end-of-trial ones (latency, size) are not known yet.
        # A multi-objective OptunaSearch ignores intermediate results, so these NaNs never reach Optuna.
        out |= {m: float("nan") for m in self.at_end if m not in out}
        if epoch == self.last_epoch:
            self.held = {"metrics": out, "ckpt": ckpt}
            return
        self._send(out, ckpt)

    def final(self, result: TrialResult) -> None:
        """The held-back last report, with the trial's final metrics (``final_*``, end-of-trial objectives)."""
        numbers = tracking.numeric(result)
        out = self.held.get("metrics", {"epoch": self.last_epoch} | self._ids())
        out |= {f"final_{k}": v for k, v in numbers.items()} | {
            k: v for k, v in numbers.items() if k in self.at_end
        }
        out |= process_stats()  # Tune's result only (result.json): what a long search's workers hold
        self._send(out, self.held.get("ckpt"))

    def _ids(self) -> dict:
        """The trial's MLflow run and the Ray node it runs on (the driver tells a lost node by it)."""
        import ray

        run = (
            {"mlflow_run_id": self.tracker.run_id} if self.tracker is not None and self.tracker.run_id else {}
        )
        return run | {"node_id": ray.get_runtime_context().get_node_id()}

    @staticmethod
    def _send(metrics: dict, ckpt: Path | None) -> None:
        from ray import tune

        tune.report(
            metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None
        )


def student_measures(cfg: Config, num_classes: int) -> dict:
    """``student_params`` and ``student_latency_ms`` of the trial's student, built afresh and timed as the trial's
    end times the trained one (same threads, device and repeats): an architecture's size and speed do not
    depend on its weights. Logged with the trial's first epoch, so that a trial the scheduler stops early has
    them in MLflow's compare view too; the end logs them again. Empty for a method that trains no student."""
    if not get_method(cfg.distill.method).student:
        return {}
    from tskd_tune.metrics import count_params, latency_ms
    from tskd_tune.models.students import build_student
    from tskd_tune.runtime import set_threads

    set_threads(cfg)  # run_trial sets the same; every random source is reseeded there too
    device = resolve_device(cfg)
    model = build_student(cfg.student, cfg.data.channels, num_classes, cfg.data.image_size).to(device)
    return {
        "student_params": count_params(model),
        "student_latency_ms": latency_ms(
            model, cfg.data.channels, cfg.data.image_size, device=device, repeats=5
        ),
    }


def process_stats() -> dict:
    """This worker process's resident memory (MB), open file descriptors and threads, at a trial's end: the
    soak test (``make test-soak``) compares the first trials a worker ran with its last."""
    import psutil

    proc = psutil.Process()
    stats = {"worker_rss_mb": round(proc.memory_info().rss / 2**20, 1), "worker_threads": proc.num_threads()}
    if hasattr(proc, "num_fds"):  # POSIX only
        stats["worker_fds"] = proc.num_fds()
    return stats


def reference_trial(method: str, data: tuple, base: Config, run: SearchRun) -> dict:
    """One reference trial (a Ray task beside the search, outside the Optuna study): ``method`` on the
    search's base config, evaluated on val and test, recorded as a child run tagged ``tskd.baseline``."""
    import json

    os.environ.update(run.mlflow_env)
    # a reference is one trial, not a search: the search's strategy does not apply to it
    cfg = apply_values(base, {"distill.method": method, "search.strategy": "joint"})
    out_dir = run.state_path / REFERENCES / method / "outputs"
    if (out_dir / "metrics.json").is_file():  # finished before the search was interrupted
        return json.loads((out_dir / "metrics.json").read_text())
    with tracking.trial_run(
        run.tracking_uri,
        run.parent_run_id,
        f"baseline-{method}",
        f"reference {method}",
        search_path=run.state_path,
    ) as mlflow_run:
        tracker = mlflow_run.tracker
        tracker.log_params(
            {"distill.method": method, "student.model": cfg.student.model, "teacher.model": cfg.teacher.model}
        )
        tracker.set_tags(_run_tags(cfg) | {"tskd.baseline": method, tracking.KIND_TAG: "reference"})
        result = run_trial(cfg, None, tracker, out_dir=out_dir, test=True, data=data)
        tracking.record_result(tracker, result, step=get_method(method).reported_epochs(cfg))
    return dict(result)


def _run_tags(cfg: Config) -> dict:
    import ray

    return {
        "ray.node_id": ray.get_runtime_context().get_node_id(),
        "ray.node_ip": ray.util.get_node_ip_address(),
        "device": str(resolve_device(cfg)),
        "teacher.pretrained": str(is_pretrained(cfg.teacher)).lower(),
    }


def _cap_gpu_memory(cfg: Config) -> None:
    """Ray's fractional GPUs are bookkeeping only: cap this trial's share of the memory ourselves."""
    if cfg.resources.gpu and 0 < cfg.resources.gpu < 1 and resolve_device(cfg).type == "cuda":
        import torch

        torch.cuda.set_per_process_memory_fraction(cfg.resources.gpu)


def _restored() -> Path | None:
    """The checkpoint a retried or restored trial continues from (outside the working dir, which is
    uploaded to storage: a restored copy need not go back there)."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    return Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="tskd-restored-"))) if checkpoint else None


def _timed_out(marker: Path, tracker, limit: float, idle: float) -> None:
    """The watchdog fired: record the hang, then end this worker process (a hung step cannot be interrupted).

    Ray sees the worker die and retries the trial; the retry finds the record and fails at once.
    """
    msg = f"no progress for {idle:.0f} s (search.trial_timeout_s: {limit:g}): stopped as hung"
    print(f"tskd-tune: {msg}", file=sys.stderr, flush=True)
    faults.mark_failed(marker, TIMED_OUT, msg)
    try:
        tracker.set_tags({"tskd.status": TIMED_OUT, "tskd.error": msg})
        tracker.finish(MLFLOW_STATUS[TIMED_OUT])
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def _working_dir() -> Path:
    """The trial's working folder on the node where it runs, which Ray uploads to the trial's folder in storage.

    Uploaded at every checkpoint and when the trial ends (``SyncConfig(sync_artifacts=True)``), from
    whichever node runs the trial. ``get_trial_dir()`` names a staging folder on the driver's node
    instead, which files written on another node never reach. (A private Ray API: Ray is pinned.)
    """
    from ray.train._internal.session import get_session

    return Path(get_session().storage.trial_working_directory)
