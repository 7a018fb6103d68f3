"""Launching (or resuming) a search: checks, Ray, the data in the object store, the teacher features,
the MLflow parent run, the reference trials, the Tuner, and the summary at the end."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tskd_tune import cluster, config, faults, tracking
from tskd_tune.cache import writable_dir, write_json
from tskd_tune.cluster import mask_uri, mlflow_env
from tskd_tune.config import Config, to_yaml
from tskd_tune.data.prepare import scan
from tskd_tune.errors import TskdError
from tskd_tune.methods.checks import premise_warning, search_uses_transfer
from tskd_tune.models.teacher import is_pretrained
from tskd_tune.search import staged
from tskd_tune.search.folder import SEARCH_FILE, SearchOptions, SearchRun, git_commit, state_path, trial_id_of
from tskd_tune.search.restore import reconcile
from tskd_tune.search.summary import TEACHER_BELOW_SCRATCH_TAG, summarize, teacher_below_scratch
from tskd_tune.search.tuner import build_tuner, keep_cache
from tskd_tune.search.warm import warm_trials

if TYPE_CHECKING:
    from rich.console import Console


def absolutize(cfg: Config) -> Config:
    """Every path field resolved against the driver's working directory (trials run elsewhere, on other
    nodes), and the tracking URI made absolute."""
    cfg = config.absolutize(cfg)
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": tracking.absolute_uri(cfg.tracking.uri)})})


def launch(cfg: Config, opts: SearchOptions, console: Console, *, resume: bool = False) -> dict:
    """Run (or resume) a search; returns the summary also written to the search folder."""
    import ray

    _quiet_libraries()
    cfg, opts = _check(cfg, opts, resume)
    warm: list = []
    if opts.warm_start and not resume:  # a resumed study already holds them
        warm, lines, found = warm_trials(cfg, opts.warm_start)
        opts = dataclasses.replace(opts, warm_start=found)
        for line in lines:
            console.print(line, markup=False)
    t0, started = time.perf_counter(), time.time()
    console.print(f"preparing data ({cfg.data.dataset}) ...", markup=False)
    if opts.address is None:
        # a local Ray starts (about 5 s, in its own processes) while MLflow and the dataset are checked and the
        # data is prepared; bad input stops it again before its one error line
        with ThreadPoolExecutor(1) as pool_of_one:
            prepared = pool_of_one.submit(_reach_and_prepare, cfg, opts)
            dashboard = init_ray(opts.address)
            try:
                pool, data = prepared.result()
            except BaseException:
                ray.shutdown()
                raise
    else:
        _reach(cfg, opts)
        dashboard = init_ray(opts.address)
        # before the data: on a cluster the trial cache (and the synthetic pool built next) moves to shared storage
        cfg = cluster.prepare(cfg, opts, console)
        pool, data = _data(cfg)
    _ready(cfg, opts, resume, console)
    if cfg.cache.enabled and cfg.cache.max_gb and (line := keep_cache(cfg, started)):
        console.print(line, markup=False)
    if dashboard:
        console.print(dashboard, markup=False)
    parent = _parent_run(cfg, opts, resume, console)
    data_ref = ray.put(data)
    fill: dict = {}
    if cfg.cache.enabled:  # every trial reads the teacher features: computed once, on every worker, first
        from tskd_tune.search.features import fill_features

        fill = fill_features(cfg, *data, data_ref, pool, console)
    # after the fill, which imports MONAI's transforms on this thread for augmented views: importing MONAI
    # from two threads at once fails in its transforms ("applying transform RandFlipd")
    _preload_in_background()
    run = run_info(opts, parent, started)
    references = _start_references(cfg, data_ref, run)
    _warn_when_teacher_below_scratch(references, console, opts.tracking_uri, parent, state_path(opts))
    parent_client = tracking.BufferedClient(opts.tracking_uri, tracking.journal_path(state_path(opts), "parent"))
    try:
        if cfg.search.strategy == "staged":
            results, staged_summary = _staged(cfg, opts, run, data_ref, resume, console)
        else:
            results, staged_summary = _fit(cfg, opts, run, data_ref, resume, console, warm=warm), {}
    finally:
        parent_client.update_run(parent, status="RUNNING")
    _finish_references(references, console)
    if cluster.is_uri(opts.storage):  # trial results and outputs went to the URI: fetch them to summarize
        cluster.pull(opts.location, opts.path)
    if resume:
        _close_lost_children(opts, parent, results, console)
    summary = summarize(cfg, opts, results, parent, data, console)
    summary |= fill | staged_summary | {"wall_s": time.perf_counter() - t0}
    write_json(opts.path / "summary.json", summary)
    if cluster.is_uri(opts.storage):
        cluster.push(opts.path, opts.location, ["summary.json", "leaderboard.csv", "pareto.csv", "best.yaml"])
    parent_client.set_terminated(parent, status="FINISHED")
    # writes queued during an MLflow outage that has ended go now; the rest wait for `tskd-tune sync`
    _, _, queued = tracking.sync_journals(state_path(opts))
    if queued:
        console.print(f"MLflow is unreachable: {queued} write(s) are kept in {state_path(opts) / tracking.JOURNAL_DIR}; "
                      f"`tskd-tune sync {opts.path}` delivers them", markup=False)  # fmt: skip
    return summary


def _fit(cfg: Config, opts: SearchOptions, run: SearchRun, data_ref, resume: bool, console: Console, study: str | None = None,
         warm: list = ()):  # fmt: skip
    """Run (or, when it was interrupted, restore and continue) one Ray Tune experiment to its end."""
    restore = resume and (opts.path / "tuner.pkl").exists()
    if restore and not cluster.is_uri(opts.storage) and (lost := reconcile(opts.path)):
        console.print(f"resume: {len(lost)} trial(s) proposed just before the driver stopped were never recorded; "
                      f"they are proposed again", markup=False)  # fmt: skip
    from tskd_tune.search import ray_log

    log = ray_log.route(state_path(opts))  # Ray's own lines and retried trials' tracebacks: a file, not the console
    return build_tuner(cfg, opts, run, data_ref, restore=restore, resume=resume, study=study, warm=warm,
                       console=console, driver_log=log).fit()  # fmt: skip


def _staged(cfg: Config, opts: SearchOptions, run: SearchRun, data_ref, resume: bool, console: Console):
    """Both stages of a staged search (see :mod:`.staged`); returns the student stage's results."""
    teachers = staged.chosen_teachers(opts) if resume else None
    if teachers is None:
        console.print(f"teacher stage: {cfg.search.teacher_trials} teacher(s) over {', '.join(staged.teacher_knobs(cfg))}",
                      markup=False)  # fmt: skip
        _fit(staged.teacher_stage(cfg), staged.stage_options(opts, "teacher"), dataclasses.replace(run, stage="teacher"), data_ref,
             resume, console, study=f"{opts.name}-teacher")  # fmt: skip
        teachers = staged.choose_teachers(cfg, opts)
    console.print(f"student stage: distilling the best {len(teachers)} teacher(s): {'; '.join(teachers)}", markup=False)
    if note := staged.fewer_teachers(cfg, teachers):
        console.print(note, markup=False)
    student_cfg = staged.student_stage(cfg, teachers)
    results = _fit(student_cfg, opts, dataclasses.replace(run, stage="student", teachers=teachers), data_ref, resume, console,
                   study=f"{opts.name}-student")  # fmt: skip
    return results, {"teachers": list(teachers)}


def _quiet_libraries() -> None:
    """No library INFO lines in a search's output (MLflow creating its tables, Optuna creating a study)."""
    import logging

    # MLflow sets its loggers to MLFLOW_LOGGING_LEVEL (INFO by default) when it is first imported, after
    # which a level set here would be undone; the trials' processes inherit it too
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import mlflow  # noqa: F401
    import optuna

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _check(cfg: Config, opts: SearchOptions, resume: bool) -> tuple[Config, SearchOptions]:
    """The cheap checks, before anything starts: the tracking URI's form, storage, the search folder. Returns
    the config and options with their paths and URIs made absolute (trials run elsewhere)."""
    cluster.check_tracking_uri(opts.tracking_uri)
    cluster.refuse_embedded_password(cfg.search.study_storage, "search.study_storage",
                                     "let the driver read it from the environment (e.g. PGPASSWORD or ~/.pgpass)")  # fmt: skip
    cfg = absolutize(cfg)
    opts = dataclasses.replace(opts, tracking_uri=tracking.absolute_uri(opts.tracking_uri))
    cluster.check_storage(str(opts.storage))
    if cluster.is_uri(opts.storage):
        # the checks below and Tuner.restore read these; the rest of the folder is fetched after the search
        cluster.pull(opts.location, opts.path, only=(SEARCH_FILE, "tuner.pkl"))
    else:
        opts = dataclasses.replace(opts, storage=Path(opts.storage).resolve())
    if resume and not (opts.path / SEARCH_FILE).is_file():
        raise TskdError(f"{opts.path}: no search to resume here (no {SEARCH_FILE})")
    if not resume and (opts.path / SEARCH_FILE).is_file():
        raise TskdError(
            f"{opts.path}: a search named {opts.name!r} exists; `tskd-tune resume {opts.path}` or pick --name"
        )
    return cfg, opts


def _reach(cfg: Config, opts: SearchOptions) -> None:
    """The checks that read: MLflow answers (on a fresh SQLite store this creates its tables, about 2.5 s) and
    the dataset's root and layout are what the adapter expects."""
    tracking.preflight(opts.tracking_uri)
    scan(cfg.data)


def _reach_and_prepare(cfg: Config, opts: SearchOptions):
    """:func:`_reach`, then :func:`_data`: what a local search does while its Ray starts."""
    _reach(cfg, opts)
    return _data(cfg)


def _ready(cfg: Config, opts: SearchOptions, resume: bool, console: Console) -> None:
    """Once the input is known to be good: the search folder, the premise warning, a resume's fresh start."""
    writable_dir(opts.path, "--storage")
    warning = premise_warning(cfg)  # after the checks: bad input gets its one error line, not a warning first
    if warning:
        console.print(warning, style="yellow", markup=False)
    if resume:  # a resumed search gives its failed trials one more attempt (see faults.py)
        shutil.rmtree(state_path(opts) / faults.FAILED_DIR, ignore_errors=True)


def _parent_run(cfg: Config, opts: SearchOptions, resume: bool, console: Console) -> str:
    """The search's MLflow parent run (reused on resume), with search.json written beside it."""
    parent = tracking.parent_run(
        opts.tracking_uri, cfg.tracking.experiment, opts.location, opts.name,
        {"search.name": opts.name, "search.space_file": opts.space_file, "git.commit": git_commit(),
         "ray.address": opts.address or "local", "teacher.pretrained": str(is_pretrained(cfg.teacher)).lower()}
        | ({"tskd.warm_start": ", ".join(opts.warm_start)} if opts.warm_start else {}),
    )  # fmt: skip
    if not resume:
        write_json(opts.path / SEARCH_FILE, {"config": cfg.model_dump(mode="json"), "options": opts.to_json(),
                                             "parent_run_id": parent})  # fmt: skip
        if cluster.is_uri(opts.storage):
            cluster.push(opts.path, opts.location, [SEARCH_FILE])
        tracking.client(opts.tracking_uri).log_text(parent, to_yaml(cfg), "search_config.yaml")
    console.print(f"MLflow: {tracking.mask_secrets(opts.tracking_uri)} (experiment {cfg.tracking.experiment!r}, "
                  f"parent run {parent})", markup=False)  # fmt: skip
    if cfg.search.study_storage:
        console.print(f"Optuna study {opts.name!r} in {mask_uri(cfg.search.study_storage)} "
                      f"(optuna-dashboard {mask_uri(cfg.search.study_storage)})", markup=False)  # fmt: skip
    if opts.tracking_uri.startswith("sqlite:///"):
        console.print(f"  open it with: tskd-tune ui --uri {opts.tracking_uri}", markup=False)
    return parent


def _data(cfg: Config):
    """(the synthetic pool or None, (prepared data, splits)): preprocessed once, for the object store."""
    from tskd_tune.data.prepare import load
    from tskd_tune.synth import pool_for_search

    prepared, splits = load(cfg)
    # the synthetic pool is built here, once, before trials start; trials then find it in the cache
    pool = pool_for_search(cfg, prepared, splits) if search_uses_transfer(cfg) else None
    # plain arrays: Ray's object store shares them read-only, zero-copy, with every trial on the node
    prepared = dataclasses.replace(prepared, images=np.ascontiguousarray(prepared.images),
                                   masks=np.ascontiguousarray(prepared.masks))  # fmt: skip
    return pool, (prepared, splits)


def _preload_in_background() -> None:
    """Import MONAI's metrics while the trials run: the summary needs them to test the best trial, and MONAI
    loads all its subpackages on import (about 8 s on 2 cores) while the driver mostly waits on its workers."""
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=("monai.metrics",), daemon=True, name="preload").start()


def run_info(opts: SearchOptions, parent_run_id: str, started: float) -> SearchRun:
    """What every trial needs to know of the search (see :class:`SearchRun`)."""
    return SearchRun(opts.tracking_uri, parent_run_id, state_path(opts), started, mlflow_env())


def init_ray(address: str | None) -> str | None:
    """Start a local Ray or join a cluster (``auto``, ``HOST:PORT``, ``ray://HOST:10001``); the line that gives
    the dashboard's URL, for the caller to print once the input is known to be good."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table reporter shows our columns
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if ray.is_initialized():
        return None
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
    return f"Ray dashboard: http://{url}  (it asks for a token: paste what `ray get-auth-token` prints)" if url else None


def _start_references(cfg: Config, data_ref, run: SearchRun) -> dict:
    """Start the reference trials as Ray tasks with a trial's resources; method -> object ref."""
    import ray

    from tskd_tune.search.trainable import reference_trial

    task = ray.remote(reference_trial).options(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu, max_retries=1)
    return {m: task.remote(m, data_ref, cfg, run) for m in cfg.search.baselines}


def _warn_when_teacher_below_scratch(refs: dict, console: Console, uri: str, parent: str, state: Path) -> None:
    """As soon as both the teacher and the scratch reference have finished (the search still running), say in
    one line when the teacher is below scratch and tag the parent run; the summary says it again at the end."""
    if not {"teacher", "scratch"} <= refs.keys():
        return
    import threading

    import ray

    def watch() -> None:
        try:
            got = {m: ray.get(refs[m]) for m in ("teacher", "scratch")}
        except Exception:  # noqa: BLE001 - a failed reference is reported by _finish_references
            return
        line = teacher_below_scratch({f"reference_{m}_val_dice": r["val_dice"] for m, r in got.items() if "val_dice" in r})
        if line:
            console.print(line, markup=False)
            # its own journal: the driver's thread writes the parent's
            client = tracking.BufferedClient(uri, tracking.journal_path(state, "teacher-vs-scratch"))
            client.set_tag(parent, TEACHER_BELOW_SCRATCH_TAG, "true")

    threading.Thread(target=watch, name="teacher-vs-scratch", daemon=True).start()


def _finish_references(refs: dict, console: Console) -> dict:
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


def _close_lost_children(opts: SearchOptions, parent: str, results, console: Console) -> None:
    """After a resume: end the child runs of trials the killed driver started but Ray never recorded."""
    known = {trial_id_of(Path(r.path).name) for r in results if r.path}
    try:
        lost = tracking.close_lost_children(opts.tracking_uri, parent, lambda t: t in known)
    except Exception as exc:  # noqa: BLE001 - MLflow down now: they stay RUNNING until the next resume
        if not tracking.unreachable(exc):
            raise
        return
    if lost:
        console.print(f"MLflow: {len(lost)} run(s) of trials lost with the killed driver ended as KILLED "
                      f"(tskd.status=lost): {', '.join(lost)}", markup=False)  # fmt: skip
