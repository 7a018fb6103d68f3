"""The search service: Ray Tune runs ``run_trial`` under OptunaSearch and ASHA, recording to MLflow.

Data flow: the driver validates the config, preprocesses the data once and puts the arrays in Ray's
object store (``tune.with_parameters``), opens the MLflow parent run, then Ray Tune starts trials.
Each trial applies its sampled values to the config by dotted path, opens its child run, and calls
``run_trial``; every student epoch goes out with ``tune.report`` plus a checkpoint, so ASHA can stop a
weak trial and a retried trial resumes from its last epoch. The driver marks every child run's final
status (finished, stopped by ASHA, failed) and writes the leaderboard and the best config.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tskd_tune import cluster, faults, tracking
from tskd_tune.cache import writable_dir
from tskd_tune.cluster import mask_uri, mlflow_env
from tskd_tune.config import END_OF_TRIAL_METRICS, Config, apply_values, to_yaml
from tskd_tune.errors import TskdError
from tskd_tune.methods import get_method
from tskd_tune.methods.checks import premise_warning
from tskd_tune.models.teacher import is_pretrained

SEARCH_FILE = "search.json"


@dataclass
class SearchOptions:
    """How a search runs (CLI flags), as opposed to what it searches (the config)."""

    name: str
    storage: Path | str  # a folder, or a URI (s3://, gs://, file://) that Ray Tune writes through pyarrow
    tracking_uri: str
    address: str | None = None
    use_cache: bool = True
    space_file: str = ""

    @property
    def path(self) -> Path:
        """The search folder on this machine; for a storage URI, this machine's copy of it."""
        if cluster.is_uri(self.storage):
            return cluster.local_copy(self.location)
        return Path(self.storage) / self.name

    @property
    def location(self) -> str:
        """Where the search lives for Ray Tune and every node: the folder, or its URI."""
        if cluster.is_uri(self.storage):
            return f"{str(self.storage).rstrip('/')}/{self.name}"
        return str(Path(self.storage) / self.name)


def absolutize(cfg: Config) -> Config:
    """Relative paths resolved against the driver's working directory (trials run elsewhere)."""
    upd = {
        "cache": cfg.cache.model_copy(update={"dir": cfg.cache.dir.resolve()}),
        "tracking": cfg.tracking.model_copy(update={"uri": tracking.absolute_uri(cfg.tracking.uri)}),
    }
    if cfg.data.root is not None:
        upd["data"] = cfg.data.model_copy(update={"root": cfg.data.root.resolve()})
    if cfg.search.study_storage and "://" not in cfg.search.study_storage:  # a journal file
        upd["search"] = cfg.search.model_copy(
            update={"study_storage": str(Path(cfg.search.study_storage).resolve())}
        )
    if cfg.teacher.checkpoint is not None:
        upd["teacher"] = cfg.teacher.model_copy(update={"checkpoint": cfg.teacher.checkpoint.resolve()})
    return cfg.model_copy(update=upd)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------ the trainable
def _trainable(config: dict, data: dict, base: dict, run: dict) -> None:
    """One Ray Tune trial: sampled values -> config -> child MLflow run -> run_trial with reports."""
    import logging

    import numpy as np
    import ray
    from ray import tune

    from tskd_tune.config import validate
    from tskd_tune.trial import resolve_device, run_trial

    for name in ("ray.tune", "ray.train"):  # one "checkpoint created" line per epoch is noise
        logging.getLogger(name).setLevel(logging.WARNING)
    # before the first MLflow call: a remote server may need credentials this worker did not inherit
    os.environ.update(run.get("mlflow_env", {}))
    cfg = apply_values(validate(base, check_search_space=False), config)
    if cfg.resources.gpu and 0 < cfg.resources.gpu < 1 and resolve_device(cfg).type == "cuda":
        import torch

        # Ray's fractional GPUs are bookkeeping only: cap this trial's share of the memory ourselves
        torch.cuda.set_per_process_memory_fraction(cfg.resources.gpu)
    ctx = tune.get_context()
    trial_id, trial_dir = ctx.get_trial_id(), _working_dir()
    state = Path(run["state_path"])
    marker = faults.marker_path(state, trial_id)
    faults.fail_if_failed_before(marker)  # a trial that raised would fail the same way again: no retry
    # writes that fail while MLflow is unreachable wait in the search's journal (see tracking.RunTracker)
    tracker = tracking.RunTracker(run["tracking_uri"], journal=tracking.journal_path(state, trial_id),
                                  parent_run_id=run["parent_run_id"], trial_id=trial_id, run_name=ctx.get_trial_name())  # fmt: skip
    resumed = tracker.start()
    # MLflow's sampler writes to the run directly: a trial that started while MLflow was down goes without
    monitor = (
        tracking.system_monitor(cfg.tracking, run["tracking_uri"], tracker.run_id, resumed)
        if tracker.run_id
        else None
    )
    watchdog = None
    if cfg.search.trial_timeout_s:
        limit = cfg.search.trial_timeout_s
        watchdog = faults.Watchdog(limit, partial(_timed_out, marker, tracker, limit)).start()
    tracker.log_params(config | {"distill.method": cfg.distill.method, "student.model": cfg.student.model})
    tracker.set_tags({"ray.node_id": ray.get_runtime_context().get_node_id(), "ray.node_ip": ray.util.get_node_ip_address(),
                      "device": str(resolve_device(cfg)), "resumed": resumed,
                      "teacher.pretrained": str(is_pretrained(cfg.teacher)).lower()})  # fmt: skip
    out_dir = trial_dir / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    tracker.log_artifact(out_dir / "config.yaml")

    prepared, splits = _prepared(data)

    last_epoch = get_method(cfg.distill.method).reported_epochs(cfg)
    at_end = [m for m, _ in cfg.search.objective_items() if m in END_OF_TRIAL_METRICS]
    held: dict = {}

    def report(epoch: int, metrics: dict, ckpt: Path | None) -> None:
        faults.beat()
        out = {
            k: v
            for k, v in metrics.items()
            if isinstance(v, int | float | bool) and not isinstance(v, np.generic) and math.isfinite(v)
        }
        _check_score([m for m, _ in cfg.search.objective_items()], metrics, out, epoch)
        out |= {"epoch": epoch} | ({"mlflow_run_id": tracker.run_id} if tracker.run_id else {})
        # Tune wants every objective in every result; end-of-trial ones (latency, size) are not known yet.
        # A multi-objective OptunaSearch ignores intermediate results, so these NaNs never reach Optuna.
        out |= {m: float("nan") for m in at_end if m not in out}
        if epoch == last_epoch:
            # held back until run_trial has saved the outputs: the scheduler may stop a trial at any report
            held.update(metrics=out, ckpt=ckpt)
            return
        tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None)

    checkpoint = tune.get_checkpoint()
    resume_from = None
    if checkpoint is not None:  # a retried or restored trial continues from its last epoch
        # outside the working dir, which is uploaded to storage: a restored copy need not go back there
        resume_from = Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="tskd-restored-")))
    try:
        result = run_trial(cfg, report, tracker, out_dir=out_dir, resume_from=resume_from, use_cache=run["use_cache"],
                           data=(prepared, splits))  # fmt: skip
    except Exception as exc:
        tracking.stop_monitor(monitor)
        if watchdog is not None:
            watchdog.stop()
        reason = f"{exc.__class__.__name__}: {str(exc)[:480]}"
        faults.mark_failed(marker, "failed", reason)
        tracker.set_tags({"tskd.status": "failed", "tskd.error": reason})
        tracker.finish("FAILED")
        tracker.flush()
        raise
    tracking.stop_monitor(monitor)
    tracker.log_metrics(
        {f"final_{k}": v for k, v in tracking.numeric(result).items()}, step=cfg.student.epochs
    )
    if (out_dir / "student.safetensors").is_file():
        _overlays(out_dir, prepared, splits)
    for name in ("metrics.json", "student.safetensors", "val_overlays.png"):
        if (out_dir / name).is_file():
            tracker.log_artifact(out_dir / name)
    tracker.set_tags(
        {
            "tskd.status": "finished",
            "tskd.teacher_cached": str(result.get("teacher_cached")),
            "tskd.teacher_adapter": str(
                result.get("teacher_adapter")
            ),  # a reference to the cached LoRA adapter
        }
    )
    tracker.finish("FINISHED")
    tracker.flush()
    if watchdog is not None:
        watchdog.stop()
    final = held.get(
        "metrics", {"epoch": last_epoch} | ({"mlflow_run_id": tracker.run_id} if tracker.run_id else {})
    )
    final |= {f"final_{k}": v for k, v in tracking.numeric(result).items()}
    # end-of-trial objectives (latency, size) under their own names, as the searcher expects them
    final |= {k: v for k, v in tracking.numeric(result).items() if k in END_OF_TRIAL_METRICS}
    ckpt = held.get("ckpt")
    tune.report(final, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None)


def _prepared(data: dict):
    """The Prepared dataset and its splits from the data payload in the object store."""
    from tskd_tune.data.prepare import Prepared

    prepared = Prepared(
        data["images"], data["masks"], data["ids"], data["groups"], data["classes"], Path(data["path"]), True
    )
    return prepared, data["splits"]


REFERENCES = "baselines"
"""Folder of the search that holds the reference trials (``baselines/<method>/outputs``)."""


def _reference_trial(method: str, data: dict, base: dict, run: dict) -> dict:
    """One reference trial (a Ray task beside the search, outside the Optuna study): ``method`` on the
    search's base config, evaluated on val and test, recorded as a child run tagged ``tskd.baseline``."""
    import ray

    from tskd_tune.config import validate
    from tskd_tune.trial import run_trial

    os.environ.update(run.get("mlflow_env", {}))
    cfg = apply_values(validate(base, check_search_space=False), {"distill.method": method})
    out_dir = Path(run["state_path"]) / REFERENCES / method / "outputs"
    if (out_dir / "metrics.json").is_file():  # finished before the search was interrupted
        return json.loads((out_dir / "metrics.json").read_text())
    tracker = tracking.RunTracker(run["tracking_uri"], journal=tracking.journal_path(Path(run["state_path"]), f"baseline-{method}"),
                                  parent_run_id=run["parent_run_id"], trial_id=f"baseline-{method}",
                                  run_name=f"reference {method}")  # fmt: skip
    tracker.start()
    tracker.log_params({"distill.method": method, "student.model": cfg.student.model, "teacher.model": cfg.teacher.model})
    tracker.set_tags({"tskd.baseline": method, "ray.node_ip": ray.util.get_node_ip_address(),
                      "teacher.pretrained": str(is_pretrained(cfg.teacher)).lower()})  # fmt: skip
    try:
        result = run_trial(cfg, None, tracker, out_dir=out_dir, test=True, data=_prepared(data),
                           use_cache=run["use_cache"])  # fmt: skip
    except Exception as exc:
        tracker.set_tags({"tskd.status": "failed", "tskd.error": f"{exc.__class__.__name__}: {str(exc)[:480]}"})
        tracker.finish("FAILED")
        tracker.flush()
        raise
    tracker.log_metrics({f"final_{k}": v for k, v in tracking.numeric(result).items()}, step=0)
    for name in ("config.yaml", "metrics.json", "student.safetensors"):
        if (out_dir / name).is_file():
            tracker.log_artifact(out_dir / name)
    tracker.set_tags({"tskd.status": "finished"})
    tracker.finish("FINISHED")
    tracker.flush()
    return result


def _start_references(cfg: Config, opts: SearchOptions, data_ref, run: dict) -> dict:
    """Start the reference trials as Ray tasks with a trial's resources; method -> object ref."""
    import ray

    task = ray.remote(_reference_trial).options(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu,
                                                max_retries=1)  # fmt: skip
    return {m: task.remote(m, data_ref, cfg.model_dump(mode="json"), run) for m in cfg.search.baselines}


def _finish_references(refs: dict, console) -> dict:
    """Wait for the reference trials; a failed one is reported in one line, the search still ends."""
    import ray

    out = {}
    for method, ref in refs.items():
        try:
            out[method] = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a reference is context, not the search's result
            cause = getattr(exc, "cause", exc)
            console.print(f"reference trial {method} failed: {cause.__class__.__name__}: {str(cause)[:300]}",
                          markup=False)  # fmt: skip
    return out


def _check_score(objectives: list[str], metrics: dict, out: dict, epoch: int) -> None:
    """A non-finite score fails the trial: reported, it would reach ASHA and Optuna as a result."""
    for name in objectives:
        if name in metrics and name not in out:
            raise faults.TrialFailed(
                f"{name} is {metrics[name]} at epoch {epoch}; not reported to the searcher"
            )


def _timed_out(marker: Path, tracker, limit: float, idle: float) -> None:
    """The watchdog fired: record the hang, then end this worker process (a hung step cannot be interrupted).

    Ray sees the worker die and retries the trial; the retry finds the record and fails at once.
    """
    import signal
    import sys

    msg = f"no progress for {idle:.0f} s (search.trial_timeout_s: {limit:g}): stopped as hung"
    print(f"tskd-tune: {msg}", file=sys.stderr, flush=True)
    faults.mark_failed(marker, "timeout", msg)
    try:
        tracker.set_tags({"tskd.status": "timeout", "tskd.error": msg})
        tracker.finish("KILLED")
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def _working_dir() -> Path:
    """The trial's working folder on the node where it runs, which Ray uploads to the trial's folder in storage.

    Uploaded at every checkpoint and when the trial ends (``SyncConfig(sync_artifacts=True)``), from
    whichever node runs the trial. ``get_trial_dir()`` names a staging folder on the driver's node
    instead, which files written on another node never reach.
    """
    from ray.train._internal.session import get_session

    return Path(get_session().storage.trial_working_directory)


def _overlays(out_dir: Path, prepared, splits, n: int = 6) -> None:
    """val_overlays.png: for a few validation images, the truth (top) and the trial's prediction (bottom)."""
    import numpy as np
    from PIL import Image

    from tskd_tune.data.inspect import overlay
    from tskd_tune.export import load_trial_student

    model, _, _ = load_trial_student(out_dir)
    idx = np.sort(splits.val[:n])
    images = np.asarray(prepared.images[idx], dtype=np.float32)
    import torch

    with torch.inference_mode():
        pred = model(torch.from_numpy(images)).argmax(1).numpy().astype(np.uint8)
    top = np.concatenate(
        [overlay(im, np.asarray(m)) for im, m in zip(images, prepared.masks[idx], strict=True)], axis=1
    )
    bottom = np.concatenate([overlay(im, p) for im, p in zip(images, pred, strict=True)], axis=1)
    Image.fromarray(np.concatenate([top, bottom], axis=0)).save(out_dir / "val_overlays.png")


def _finalizer(tracking_uri: str, parent_run_id: str, max_epochs: int, search_path: Path):
    """A Tune callback that gives every child run a final MLflow status: none is left RUNNING.

    Its writes go through the trial's journal, behind any the trial queued while MLflow was down.
    """
    from ray import tune

    class MlflowFinalizer(tune.Callback):
        next_sync = 0.0

        def on_step_end(self, iteration, trials, **info):
            # journals of trials that ended while MLflow was down are delivered soon after it is back
            if time.monotonic() >= self.next_sync:
                self.next_sync = time.monotonic() + 15
                if (search_path / tracking.JOURNAL_DIR).is_dir():
                    tracking.sync_journals(search_path, probe=True)

        def _tracker(self, trial) -> tracking.RunTracker:
            return tracking.RunTracker(tracking_uri, journal=tracking.journal_path(search_path, trial.trial_id),
                                       run_id=(trial.last_result or {}).get("mlflow_run_id"),
                                       parent_run_id=parent_run_id, trial_id=trial.trial_id)  # fmt: skip

        def on_trial_complete(self, iteration, trials, trial, **info):
            # only a run the trial did not finish itself is changed: the scheduler stopped that trial
            epoch = (trial.last_result or {}).get("epoch", 0)
            self._tracker(trial).finalize(
                "KILLED", {"tskd.status": "stopped_early", "tskd.stopped_at_epoch": epoch}
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            self._tracker(trial).finalize("FAILED", {"tskd.status": "failed"})

    return MlflowFinalizer()


# ---------------------------------------------------------------------------------------- launching
def _sampler(cfg: Config):
    import optuna

    s = cfg.search
    if s.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.algorithm == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed, warn_independent_sampling=False)
    if s.algorithm == "gp":
        return optuna.samplers.GPSampler(seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed)


def _data_payload(cfg: Config, use_cache: bool):
    """(the synthetic pool or None, the data for the object store)."""
    import numpy as np

    from tskd_tune.data.prepare import load

    prepared, splits = load(cfg, use_cache=use_cache)
    from tskd_tune.synth import pool_for_search

    # the synthetic pool is built here, once, before trials start; trials then find it in the cache
    pool = pool_for_search(cfg, prepared, splits, use_cache=use_cache)
    # plain arrays: Ray's object store shares them read-only, zero-copy, with every trial on the node
    return pool, {
        "images": np.ascontiguousarray(prepared.images),
        "masks": np.ascontiguousarray(prepared.masks),
        "ids": prepared.ids,
        "groups": prepared.groups,
        "classes": prepared.classes,
        "path": str(prepared.path),
        "splits": splits,
    }


def init_ray(address: str | None, console) -> None:
    """Start a local Ray or join a cluster (``auto``, ``HOST:PORT``, ``ray://HOST:10001``); print the dashboard URL."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table reporter shows our columns
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if ray.is_initialized():
        return
    try:
        if address and address.startswith("ray://"):
            # Ray Client takes no dashboard options: the cluster has its own dashboard
            ctx = ray.init(address=address, logging_level="ERROR")
        else:
            # "local" rather than None: None would silently join the last `ray start` cluster on this machine
            ctx = ray.init(address=address or "local", include_dashboard=True, dashboard_host="127.0.0.1",
                           logging_level="ERROR", log_to_driver=True)  # fmt: skip
    except (ConnectionError, ValueError, RuntimeError) as exc:
        if not address:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise TskdError(f"--address: cannot join the Ray cluster at {address}: {first[:200]}") from None
    url = getattr(ctx, "dashboard_url", None)
    if url:
        console.print(
            f"Ray dashboard: http://{url}  (token auth: the token is in ~/.ray/auth_token)", markup=False
        )


def _study_storage(cfg: Config, name: str, fresh: bool):
    """The Optuna storage of ``search.study_storage`` (None: in memory); a fresh search must not reuse a study."""
    value = cfg.search.study_storage
    if not value:
        return None
    import optuna

    try:
        if "://" in value:
            storage = optuna.storages.RDBStorage(value)
        else:
            from optuna.storages.journal import JournalFileBackend

            Path(value).parent.mkdir(parents=True, exist_ok=True)
            storage = optuna.storages.JournalStorage(JournalFileBackend(str(value)))
        exists = name in optuna.study.get_all_study_names(storage)
    except Exception as exc:  # noqa: BLE001 - any failure here means "storage unusable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise TskdError(f"search.study_storage: cannot use {mask_uri(value)}: {first[:200]}") from None
    if fresh and exists:
        raise TskdError(
            f"search.study_storage: {mask_uri(value)} already holds a study named {name!r}; pick another --name"
        )
    return storage


def _run_info(opts: SearchOptions, parent_run_id: str) -> dict:
    # MLflow credentials ride in the object store with the trainable: no runtime_env, dashboard or log shows them
    return {"tracking_uri": opts.tracking_uri, "parent_run_id": parent_run_id, "use_cache": opts.use_cache,
            "mlflow_env": mlflow_env(), "state_path": str(state_path(opts))}  # fmt: skip


def _tuner(cfg: Config, opts: SearchOptions, parent_run_id: str, data_ref: dict, restore: bool = False,
           resume: bool = False):  # fmt: skip
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from tskd_tune.space import to_optuna

    run = _run_info(opts, parent_run_id)
    trainable = tune.with_parameters(_trainable, data=data_ref, base=cfg.model_dump(mode="json"), run=run)
    trainable = tune.with_resources(trainable, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    max_epochs = get_method(cfg.distill.method).reported_epochs(cfg)
    finalizer = _finalizer(opts.tracking_uri, parent_run_id, max_epochs, state_path(opts))
    if restore:
        return tune.Tuner.restore(
            opts.location, trainable=trainable, resume_unfinished=True, resume_errored=True
        ), finalizer
    s = cfg.search
    # metric and mode go to searcher and scheduler themselves: ConcurrencyLimiter does not pass them on
    objectives = s.objective_items()
    metric, mode = objectives[0]
    if len(objectives) > 1:  # Optuna's multi-objective study: every trial's final result carries all of them
        metric, mode = [m for m, _ in objectives], [d for _, d in objectives]
    searcher = OptunaSearch(space=to_optuna(s.space), metric=metric, mode=mode, sampler=_sampler(cfg),
                            points_to_evaluate=s.points_to_evaluate or None, study_name=opts.name,
                            storage=_study_storage(cfg, opts.name, fresh=not resume))  # fmt: skip
    searcher = ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent)
    if s.scheduler == "asha":  # config validation refuses ASHA with several objectives
        scheduler = ASHAScheduler(metric=s.metric, mode=s.mode, max_t=max_epochs, grace_period=min(s.grace_period, max_epochs),
                                  reduction_factor=s.reduction_factor)  # fmt: skip
    else:
        scheduler = FIFOScheduler()
    reporter = tune.CLIReporter(
        metric_columns={"epoch": "epoch", s.metric: s.metric, "val_hd95": "hd95"}
        | {m: m for m, _ in objectives},
        parameter_columns={p: p.split(".")[-1] if len(p) > 24 else p for p in s.space},
        max_report_frequency=15,
        sort_by_metric=True,
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=s.num_samples),
        run_config=tune.RunConfig(
            name=opts.name,
            storage_path=str(opts.storage),
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            # each trial uploads its outputs (config, metrics, student) from its own node
            sync_config=tune.SyncConfig(sync_artifacts=True),
            # JSON only (not CSV/TensorBoard): result.json and params.json are what `status` and `report` read
            callbacks=[finalizer, JsonLoggerCallback()],
            progress_reporter=reporter,
            verbose=1,
        ),
    )
    return tuner, finalizer


def launch(cfg: Config, opts: SearchOptions, console, *, resume: bool = False) -> dict:
    """Run (or resume) a search; returns the summary also written to the search folder."""
    import ray

    cluster.check_tracking_uri(opts.tracking_uri)
    cluster.refuse_embedded_password(cfg.search.study_storage, "search.study_storage",
                                     "let the driver read it from the environment (e.g. PGPASSWORD or ~/.pgpass)")  # fmt: skip
    cfg = absolutize(cfg)
    opts.tracking_uri = tracking.absolute_uri(opts.tracking_uri)
    cluster.check_storage(str(opts.storage))
    if cluster.is_uri(opts.storage):
        # the checks below and Tuner.restore read these; the rest of the folder is fetched after the search
        cluster.pull(opts.location, opts.path, only=(SEARCH_FILE, "tuner.pkl"))
    else:
        opts.storage = Path(opts.storage).resolve()
    tracking.preflight(opts.tracking_uri)
    if resume and not (opts.path / SEARCH_FILE).is_file():
        raise TskdError(f"{opts.path}: no search to resume here (no {SEARCH_FILE})")
    if not resume and (opts.path / SEARCH_FILE).is_file():
        raise TskdError(
            f"{opts.path}: a search named {opts.name!r} exists; `tskd-tune resume {opts.path}` or pick --name"
        )
    writable_dir(opts.path, "--storage")
    warning = premise_warning(cfg)  # once the input is known to be good: bad input gets its one error line
    if warning:
        console.print(warning, style="yellow", markup=False)
    if resume:  # a resumed search gives its failed trials one more attempt (see faults.py)
        shutil.rmtree(state_path(opts) / faults.FAILED_DIR, ignore_errors=True)
    t0 = time.perf_counter()
    init_ray(opts.address, console)
    # before the data: on a cluster the trial cache (and the synthetic pool built next) moves to shared storage
    cfg = cluster.prepare(cfg, opts, console)
    console.print(f"preparing data ({cfg.data.dataset}) ...", markup=False)
    pool, payload = _data_payload(cfg, opts.use_cache)
    parent = tracking.parent_run(
        opts.tracking_uri, cfg.tracking.experiment, opts.location, opts.name,
        {"search.name": opts.name, "search.space_file": opts.space_file, "git.commit": _git_commit(),
         "ray.address": opts.address or "local", "teacher.pretrained": str(is_pretrained(cfg.teacher)).lower()},
    )  # fmt: skip
    if not resume:
        _write_json(opts.path / SEARCH_FILE, {"config": cfg.model_dump(mode="json"), "options": {
            "name": opts.name, "storage": str(opts.storage), "tracking_uri": opts.tracking_uri, "address": opts.address,
            "use_cache": opts.use_cache, "space_file": opts.space_file}, "parent_run_id": parent})  # fmt: skip
        if cluster.is_uri(opts.storage):
            cluster.push(opts.path, opts.location, [SEARCH_FILE])
        client = tracking.client(opts.tracking_uri)
        client.log_text(parent, to_yaml(cfg), "search_config.yaml")
    console.print(
        f"MLflow: {tracking.mask_secrets(opts.tracking_uri)} (experiment {cfg.tracking.experiment!r}, parent run {parent})",
        markup=False,
    )
    if cfg.search.study_storage:
        console.print(f"Optuna study {opts.name!r} in {mask_uri(cfg.search.study_storage)} "
                      f"(optuna-dashboard {mask_uri(cfg.search.study_storage)})", markup=False)  # fmt: skip
    if opts.tracking_uri.startswith("sqlite:///"):
        console.print(
            f"  open it with: mlflow ui --backend-store-uri {opts.tracking_uri} --host 127.0.0.1",
            markup=False,
        )
    data_ref = ray.put(payload)
    fill: dict = {}
    if opts.use_cache:  # every trial reads the teacher features: computed once, on every worker, first
        from tskd_tune import search_features

        fill = search_features.fill(cfg, *_prepared(payload), data_ref, pool, console)
    references = _start_references(cfg, opts, data_ref, _run_info(opts, parent))
    tuner, _ = _tuner(cfg, opts, parent, data_ref, restore=resume and (opts.path / "tuner.pkl").exists(),
                      resume=resume)  # fmt: skip
    parent_client = tracking.BufferedClient(
        opts.tracking_uri, tracking.journal_path(state_path(opts), "parent")
    )
    try:
        results = tuner.fit()
    finally:
        parent_client.update_run(parent, status="RUNNING")
    _finish_references(references, console)
    if cluster.is_uri(opts.storage):  # trial results and outputs went to the URI: fetch them to summarize
        cluster.pull(opts.location, opts.path)
    if resume:
        _close_lost_children(opts, parent, results, console)
    summary = summarize(cfg, opts, results, parent, payload, console)
    summary |= fill | {"wall_s": time.perf_counter() - t0}
    _write_json(opts.path / "summary.json", summary)
    if cluster.is_uri(opts.storage):
        cluster.push(opts.path, opts.location, ["summary.json", "leaderboard.csv", "pareto.csv", "best.yaml"])
    parent_client.set_terminated(parent, status="FINISHED")
    # writes queued during an MLflow outage that has ended go now; the rest wait for `tskd-tune sync`
    _, _, queued = tracking.sync_journals(state_path(opts))
    if queued:
        console.print(f"MLflow is unreachable: {queued} write(s) are kept in {state_path(opts) / tracking.JOURNAL_DIR}; "
                      f"`tskd-tune sync {opts.path}` delivers them", markup=False)  # fmt: skip
    return summary


def state_path(opts: SearchOptions) -> Path:
    """Where trials keep their MLflow journals and failure records: the search folder, which every node
    sees with a folder (or file://) storage. With a bucket, the same path on each node: journals then
    stay on the node a trial ran on, and `tskd-tune sync` delivers those on the machine it runs on."""
    local = cluster.storage_dir(opts.storage)
    return local / opts.name if local is not None else opts.path


def _close_lost_children(opts: SearchOptions, parent: str, results, console) -> None:
    """After a resume: end the child runs of trials the killed driver started but Ray never recorded."""
    names = [Path(r.path).name for r in results if r.path]
    try:
        lost = tracking.close_lost_children(
            opts.tracking_uri, parent, lambda t: any(f"_{t}_" in n for n in names)
        )
    except Exception as exc:  # noqa: BLE001 - MLflow down now: they stay RUNNING until the next resume
        if not tracking.unreachable(exc):
            raise
        return
    if lost:
        console.print(f"MLflow: {len(lost)} run(s) of trials lost with the killed driver ended as KILLED "
                      f"(tskd.status=lost): {', '.join(lost)}", markup=False)  # fmt: skip


def summarize(cfg: Config, opts: SearchOptions, results, parent: str, payload: dict, console) -> dict:
    """Leaderboard, best config and the best trial evaluated once on the test split; logged to the parent."""
    from tskd_tune.report import objective_board

    c = tracking.BufferedClient(opts.tracking_uri, tracking.journal_path(state_path(opts), "parent"))
    objectives = cfg.search.objective_items()
    metric, _ = objectives[0]
    board = objective_board(opts.path, objectives)
    board_path = opts.path / "leaderboard.csv"
    board.to_csv(board_path, index=False)
    c.log_artifact(parent, str(board_path))
    errors = sum(1 for r in results if r.error is not None)
    summary = {"trials": len(board), "errored": errors, "leaderboard": str(board_path)}
    if board.empty or board[metric].isna().all():
        console.print("no trial produced a result", markup=False)
        return summary
    if len(objectives) > 1:
        front = board[board["pareto"]]
        front_path = opts.path / "pareto.csv"
        front.to_csv(front_path, index=False)
        c.log_artifact(parent, str(front_path))
        summary["pareto_front"] = front["trial_id"].tolist()
        console.print(f"Pareto front ({', '.join(f'{m} {d}' for m, d in objectives)}): "
                      f"{len(front)} of {len(board)} trials, in {front_path}", markup=False)  # fmt: skip
        print(front[["trial_id", *[m for m, _ in objectives]]].to_string(index=False))
    # the best trial that ran to the end: an ASHA-stopped trial's score is from fewer epochs and it has no
    # student to test (with several objectives every trial ends, and the best in the first is on the front)
    done = board[board["state"] == "finished"]
    best = done.iloc[0] if not done.empty else board.iloc[0]
    trial_dir = Path(best["trial_dir"])
    best_cfg_path = opts.path / "best.yaml"
    best_cfg_path.write_text((trial_dir / "outputs" / "config.yaml").read_text())
    c.log_artifact(parent, str(best_cfg_path))
    test = evaluate_on_test(trial_dir / "outputs", payload)
    summary |= {"best_trial": best["trial_id"], "best_" + metric: float(best[metric]),
                "best_config": str(best_cfg_path), **test}  # fmt: skip
    refs = reference_metrics(opts.path)
    summary |= refs
    if "reference_scratch_val_dice" in refs:
        summary["best_gain_vs_scratch"] = float(best["gain_vs_scratch"])
        if "test_dice" in test and "reference_scratch_test_dice" in refs:
            summary["best_test_gain_vs_scratch"] = test["test_dice"] - refs["reference_scratch_test_dice"]
        for _, row in board.dropna(subset=["gain_vs_scratch", "mlflow_run_id"]).iterrows():
            c.log_batch(row["mlflow_run_id"], metrics=[_metric("gain_vs_scratch", row["gain_vs_scratch"])])
    c.log_batch(parent, metrics=[_metric(k, v) for k, v in tracking.numeric(
        {k: v for k, v in summary.items() if k.startswith(("best_", "reference_"))} | test).items()])  # fmt: skip
    print(board.drop(columns=["trial_dir", "mlflow_run_id"]).head(10).to_string(index=False))
    for line in reference_lines(refs):
        console.print(line, markup=False)
    gain = f"; {summary['best_gain_vs_scratch']:+.4f} val Dice over scratch" if "best_gain_vs_scratch" in summary else ""
    console.print(f"best trial {best['trial_id']}: {metric} {best[metric]:.4f}{gain}; "
                  f"test_dice {test.get('test_dice', float('nan')):.4f}; config {best_cfg_path}", markup=False)  # fmt: skip
    return summary


def _metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def reference_metrics(search_path: Path) -> dict:
    """``reference_<method>_<metric>`` for the finished reference trials (val and test Dice, HD95)."""
    from tskd_tune.report import references

    return {f"reference_{method}_{k}": float(m[k]) for method, m in references(search_path).items()
            for k in ("val_dice", "val_hd95", "test_dice", "test_hd95") if m.get(k) is not None}  # fmt: skip


def reference_lines(refs: dict) -> list[str]:
    """One line per reference trial: its val and test Dice."""
    methods = dict.fromkeys(k.split("_")[1] for k in refs)
    return [f"reference {m}: val_dice {refs.get(f'reference_{m}_val_dice', float('nan')):.4f}, "
            f"test_dice {refs.get(f'reference_{m}_test_dice', float('nan')):.4f}" for m in methods]  # fmt: skip


def evaluate_on_test(outputs: Path, payload: dict) -> dict:
    """The best trial's student on the test split, once, after the search."""
    from tskd_tune.export import load_trial_student
    from tskd_tune.metrics import evaluate

    if not (outputs / "student.safetensors").is_file():
        return {}
    model, cfg, _ = load_trial_student(outputs)
    idx = payload["splits"].test
    return evaluate(model, payload["images"][idx], payload["masks"][idx], payload["classes"], prefix="test_")


def load_search(path: Path) -> tuple[Config, SearchOptions, str]:
    """The config, options and parent run of an existing search folder."""
    from tskd_tune.config import validate

    f = Path(path) / SEARCH_FILE
    if not f.is_file():
        raise TskdError(f"{path}: not a search folder (no {SEARCH_FILE})")
    saved = json.loads(f.read_text())
    o = saved["options"]
    opts = SearchOptions(
        o["name"],
        o["storage"] if cluster.is_uri(o["storage"]) else Path(o["storage"]),
        o["tracking_uri"],
        o["address"],
        o["use_cache"],
        o["space_file"],
    )
    return validate(saved["config"]), opts, saved["parent_run_id"]


def resolve_search_path(name_or_path: str, storage: Path = Path("runs")) -> Path:
    """A search folder by name (under ``storage``), folder, or URI (fetched to this machine's copy)."""
    if cluster.is_uri(name_or_path):
        local = cluster.local_copy(name_or_path.rstrip("/"))
        if cluster.pull(name_or_path.rstrip("/"), local) and (local / SEARCH_FILE).is_file():
            return local
        raise TskdError(f"{name_or_path}: no search found (no {SEARCH_FILE} there)")
    p = Path(name_or_path)
    if (p / SEARCH_FILE).is_file():
        return p
    if (storage / name_or_path / SEARCH_FILE).is_file():
        return storage / name_or_path
    raise TskdError(
        f"{name_or_path}: no search found (looked for {SEARCH_FILE} in {p} and {storage / name_or_path})"
    )


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
