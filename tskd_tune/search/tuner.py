"""The Ray Tune side of a search: samplers and schedulers by name, the Optuna study's storage, readable
trial names, the callback that gives every child run its final status, and the Tuner itself."""

from __future__ import annotations

import time
from pathlib import Path

from tskd_tune import tracking
from tskd_tune.cluster import mask_uri
from tskd_tune.config import Config
from tskd_tune.errors import TskdError
from tskd_tune.faults import FAILED_DIR
from tskd_tune.methods import get_method
from tskd_tune.search.folder import SearchOptions, SearchRun
from tskd_tune.search.names import short_name, trial_number
from tskd_tune.states import FAILED, MLFLOW_STATUS, STOPPED_EARLY


def _sampler(s):
    """The Optuna sampler of ``search``: Optuna's own start-up default unless ``startup_trials`` is set."""
    return SAMPLERS[s.algorithm](
        s.seed, **({} if s.startup_trials is None else {"n_startup_trials": s.startup_trials})
    )


def _optuna():
    import optuna

    return optuna


SAMPLERS = {
    "tpe": lambda seed, **kw: _optuna().samplers.TPESampler(seed=seed, **kw),
    "random": lambda seed, **kw: _optuna().samplers.RandomSampler(seed=seed),
    "cmaes": lambda seed, **kw: _optuna().samplers.CmaEsSampler(
        seed=seed, warn_independent_sampling=False, **kw
    ),
    "gp": lambda seed, **kw: _optuna().samplers.GPSampler(seed=seed, **kw),
}
"""``search.algorithm`` -> the Optuna sampler, seeded by ``search.seed``, with ``search.startup_trials``
random start-up trials when set (Optuna's defaults otherwise: 10 for tpe and gp, 1 for cmaes)."""


SCHEDULERS = ("asha", "hyperband", "fifo")
"""``search.scheduler``'s names (built by :func:`schedulers.make_scheduler`)."""


def trial_name(trial) -> str:
    """``t007 T=3.7 kd=1.6 lr=0.0026``: the trial's number and its sampled values, readable and unique
    within the search (Tune's display name, the MLflow run name)."""
    values = [f"{short_name(k)}={_short(v)}" for k, v in (trial.evaluated_params or {}).items()]
    return " ".join([trial_number(trial), *values])


def trial_dirname(trial) -> str:
    """``t007_<trial id>``: the trial's folder in the search folder."""
    number = str(trial.experiment_tag).split("_", 1)[0]
    return f"t{int(number):03d}_{trial.trial_id}" if number.isdigit() else f"t_{trial.trial_id}"


def _short(value) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def study_storage(cfg: Config, name: str, fresh: bool):
    """The Optuna storage of ``search.study_storage`` (None: in memory); a fresh search must not reuse a study."""
    value = cfg.search.study_storage
    if not value:
        return None
    optuna = _optuna()
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


def finalizer(tracking_uri: str, parent_run_id: str, search_path: Path):
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
            return tracking.RunTracker(
                tracking_uri,
                journal=tracking.journal_path(search_path, trial.trial_id),
                run_id=(trial.last_result or {}).get("mlflow_run_id"),
                parent_run_id=parent_run_id,
                trial_id=trial.trial_id,
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            # only a run the trial did not finish itself is changed: the scheduler stopped that trial, a normal
            # outcome of the search, so its run ends FINISHED (MLflow's KILLED reads as a failure)
            epoch = (trial.last_result or {}).get("epoch", 0)
            self._tracker(trial).finalize(
                MLFLOW_STATUS[STOPPED_EARLY], {"tskd.status": STOPPED_EARLY, "tskd.stopped_at_epoch": epoch}
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            self._tracker(trial).finalize(MLFLOW_STATUS[FAILED], {"tskd.status": FAILED})

    return MlflowFinalizer()


def retry_notice(log: Path | None, resume_hint: str, search_path: Path):
    """A Tune callback that says in one line what became of a trial whose worker died: ``node 10.0.1.7 lost;
    t002 retried from epoch 3`` (or that its worker process died), and, when Ray gives up on it, how to
    finish it (``resume_hint``). The tracebacks are in ``log`` (:mod:`.ray_log`)."""
    from ray import tune

    where = f" (details: {log})" if log is not None else ""
    failed_dir = Path(search_path) / FAILED_DIR

    def restart_point(trial) -> str:
        kept = trial.latest_checkpoint_result
        epoch = (kept.metrics or {}).get("epoch") if kept is not None else None
        return f"from epoch {epoch}" if epoch else "from the start"

    class RetryNotice(tune.Callback):
        def __init__(self):
            self.pending: list[tuple] = []  # (trial, node id, node ip, restart point, when)

        def on_trial_recover(self, iteration, trials, trial, **info):
            if not _worker_died(trial) or (failed_dir / f"{trial.trial_id}.json").is_file():
                return  # the trial raised or hung (faults.py recorded it): its retry fails at once, and says so
            last = trial.last_result or {}
            self.pending.append(
                (trial, last.get("node_id"), last.get("node_ip", "?"), restart_point(trial), time.monotonic())
            )

        def on_step_end(self, iteration, trials, **info):
            if self.pending:
                self._say(final=False)

        def on_experiment_end(self, trials, **info):
            # a search may end before Ray has marked a lost node dead (seconds after its raylet stopped
            # answering): ask until 30 s after the last retry at most, then say what is known
            deadline = max((since for *_, since in self.pending), default=0.0) + 30
            while self.pending and time.monotonic() < deadline:
                self._say(final=False)
                if self.pending:
                    time.sleep(1)
            self._say(final=True)

        def _say(self, final: bool) -> None:
            # Ray marks a node dead some seconds after its raylet stops answering: wait for that, up to a minute
            nodes, waiting = _nodes(), []
            for trial, node, ip, point, since in self.pending:
                alive, address = (nodes or {}).get(node, (True, ip))
                if nodes is not None and not alive:
                    print(f"node {address} lost; {trial_number(trial)} retried {point}", flush=True)
                elif final or node is None or nodes is None or time.monotonic() - since > 60:
                    print(
                        f"{trial_number(trial)}: its worker process on {address} died; retried {point}{where}",
                        flush=True,
                    )
                else:
                    waiting.append((trial, node, ip, point, since))
            self.pending = waiting

        def on_trial_error(self, iteration, trials, trial, **info):
            if _worker_died(trial):
                print(
                    f"{trial_number(trial)}: its worker died {trial.run_metadata.num_failures} times, more than Ray "
                    f"retries; `{resume_hint}` runs it again {restart_point(trial)}{where}",
                    flush=True,
                )

        def get_state(self):  # nothing to keep across a restore: a pending trial is retried either way
            return None

    return RetryNotice()


def _nodes() -> dict[str, tuple[bool, str]] | None:
    """Every node the cluster has known: id -> (alive, address); None when Ray cannot say."""
    import ray

    try:
        return {n["NodeID"]: (bool(n.get("Alive")), n.get("NodeManagerAddress", "?")) for n in ray.nodes()}
    except Exception:  # noqa: BLE001 - the GCS may be busy; the notice then waits for the next step
        return None


def _worker_died(trial) -> bool:
    """Whether the trial's last error was its worker dying (node lost, process killed), not the trial raising:
    Ray's actor errors all read "The actor ..."."""
    from tskd_tune.report import last_failure

    failure = last_failure(trial.error_file) if trial.error_file else None
    return (
        failure is not None
        and "The actor " in failure[1]
        and ("died" in failure[1] or "unavailable" in failure[1])
    )


def keep_cache(cfg: Config, since: float) -> str | None:
    """Trim the cache to ``cache.max_gb``, least recently used first, sparing what this search has used since
    ``since`` (its start); one line when something was removed."""
    from tskd_tune.cache import GB, prune

    removed = prune(cfg.cache.dir, max_gb=cfg.cache.max_gb, keep_since=since)
    if not removed:
        return None
    kinds = ", ".join(sorted({e.kind for e in removed}))
    return (
        f"cache: removed {len(removed)} least recently used entr{'y' if len(removed) == 1 else 'ies'} "
        f"({sum(e.size for e in removed) / GB:.2f} GB: {kinds}) to stay under cache.max_gb={cfg.cache.max_gb}"
    )


def cache_keeper(cfg: Config, since: float):
    """A Tune callback that keeps the cache under ``cache.max_gb`` after each trial (see :func:`keep_cache`)."""
    from ray import tune

    class CacheKeeper(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            line = keep_cache(cfg, since)
            if line:
                print(line, flush=True)

    return CacheKeeper()


def make_searcher(
    cfg: Config,
    opts: SearchOptions,
    *,
    resume: bool = False,
    study: str | None = None,
    warm: list[tuple[dict, float]] = (),
):
    """OptunaSearch over the space (the sampler by name, seeded), its study named ``study`` (default: the
    search) in ``search.study_storage``, with the ``warm`` trials added as completed before any proposal.
    Trials the scheduler stops reach the study as PRUNED (:class:`study_search.StudySearch`)."""
    from tskd_tune.search.study_search import StudySearch
    from tskd_tune.space import to_optuna

    s = cfg.search
    # metric and mode go to searcher and scheduler themselves: ConcurrencyLimiter does not pass them on
    objectives = s.objective_items()
    metric, mode = objectives[0]
    if len(objectives) > 1:  # Optuna's multi-objective study: every trial's final result carries all of them
        metric, mode = [m for m, _ in objectives], [d for _, d in objectives]
    searcher = StudySearch(
        space=to_optuna(s.space),
        metric=metric,
        mode=mode,
        sampler=_sampler(s),
        points_to_evaluate=s.points_to_evaluate or None,
        study_name=study or opts.name,
        storage=study_storage(cfg, study or opts.name, fresh=not resume),
    )
    for params, value in warm:
        searcher.add_evaluated_point(params, value)
    return searcher


def _scheduler(cfg: Config, opts: SearchOptions, run: SearchRun, max_t: int):
    """The stage's scheduler: a staged search's teacher stage lets ``top_teachers`` teachers run to the end,
    so the student stage always has that many finished teachers to distil."""
    from tskd_tune.search.schedulers import make_scheduler  # imports Ray

    stage = run.stage or "search"
    protect = cfg.search.top_teachers if stage == "teacher" else 0
    return make_scheduler(cfg, max_t, folder=opts.path, protect=protect, stage=stage)


def build_tuner(
    cfg: Config,
    opts: SearchOptions,
    run: SearchRun,
    data_ref,
    *,
    restore: bool = False,
    resume: bool = False,
    study: str | None = None,
    warm: list[tuple[dict, float]] = (),
    console=None,
    driver_log: Path | None = None,
):
    """The Tuner of the search, or of one stage of it (or, with ``restore``, the interrupted one restored from
    its folder). ``study``: the Optuna study's name (default: the search's); ``warm``: (params, value) of
    earlier trials that join the study as completed before any proposal; ``driver_log``: where Ray's own
    lines went (:mod:`.ray_log`), named in the retry notices."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.search import ConcurrencyLimiter

    from tskd_tune.search.trainable import trial

    trainable = tune.with_parameters(trial, data=data_ref, base=cfg, run=run)
    trainable = tune.with_resources(trainable, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    if restore:
        return tune.Tuner.restore(
            opts.location, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    s = cfg.search
    searcher = make_searcher(cfg, opts, resume=resume, study=study, warm=warm)
    objectives = s.objective_items()
    max_t = get_method(cfg.distill.method).reported_epochs(cfg)
    if opts.verbose:  # Ray's own status block, every 15 s
        reporter = tune.CLIReporter(
            metric_columns={"epoch": "epoch", s.metric: s.metric, "val_hd95": "hd95"}
            | {m: m for m, _ in objectives},
            parameter_columns={p: p.split(".")[-1] if len(p) > 24 else p for p in s.space},
            max_report_frequency=15,
            sort_by_metric=True,
            metric=s.metric,
            mode=s.mode,
        )
    else:
        from tskd_tune.search.progress import SearchProgress

        reporter = SearchProgress(
            console, s.metric, s.mode, list(s.space), max_t, s.num_samples, s.max_concurrent, run.state_path
        )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent),
            scheduler=_scheduler(cfg, opts, run, max_t),
            num_samples=s.num_samples,
            time_budget_s=s.time_budget_s,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
            # a worker process (torch, MONAI, timm imported) serves trial after trial
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=opts.name,
            storage_path=str(opts.storage),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            # each trial uploads its outputs (config, metrics, student) from its own node
            sync_config=tune.SyncConfig(sync_artifacts=True),
            # JSON only (not CSV/TensorBoard): result.json and params.json are what `status` and `report` read
            callbacks=[
                finalizer(opts.tracking_uri, run.parent_run_id, run.state_path),
                retry_notice(driver_log, f"tskd-tune resume {opts.path}", run.state_path),
                JsonLoggerCallback(),
                *([cache_keeper(cfg, run.started)] if cfg.cache.enabled and cfg.cache.max_gb else []),
            ],
            progress_reporter=reporter,
            verbose=1,
        ),
    )
