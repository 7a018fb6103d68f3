"""The parts a search's session (:mod:`.session`) is made of: the input checks, Ray, the data for the object
store, the MLflow parent run, the reference trials."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tskd_tune import cluster, config, faults, tracking
from tskd_tune.cache import writable_dir, write_json
from tskd_tune.cluster import mask_uri
from tskd_tune.config import Config, to_yaml
from tskd_tune.errors import TskdError
from tskd_tune.search.folder import SEARCH_FILE, SearchOptions, SearchRun, git_commit, state_path, trial_id_of

# The methods (torch), the data adapters and the summary (pandas) are imported where they are used: a local
# search's main thread starts Ray while another imports them (:func:`check_teacher`), instead of before it

if TYPE_CHECKING:
    from tskd_tune.reporter import Reporter


def absolutize(cfg: Config) -> Config:
    """Every path field resolved against the driver's working directory (trials run elsewhere, on other
    nodes), and the tracking URI made absolute."""
    cfg = config.absolutize(cfg)
    return cfg.model_copy(
        update={"tracking": cfg.tracking.model_copy(update={"uri": tracking.absolute_uri(cfg.tracking.uri)})}
    )


def quiet_env() -> None:
    """Before MLflow's first import: it sets its loggers to MLFLOW_LOGGING_LEVEL (INFO by default) when
    imported, after which a level set later would be undone; the trials' processes inherit it too."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def quiet_libraries() -> None:
    """No library INFO lines in a search's output (MLflow creating its tables, Optuna creating a study)."""
    import logging

    quiet_env()
    import mlflow  # noqa: F401
    import optuna

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def check_input(cfg: Config, opts: SearchOptions, resume: bool) -> tuple[Config, SearchOptions]:
    """The cheap checks, before anything starts: the tracking URI's form, storage, the search folder. Returns
    the config and options with their paths and URIs made absolute (trials run elsewhere)."""
    cluster.check_tracking_uri(opts.tracking_uri)
    cluster.refuse_embedded_password(
        cfg.search.study_storage,
        "search.study_storage",
        "let the driver read it from the environment (e.g. PGPASSWORD or ~/.pgpass)",
    )
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


def check_teacher(cfg: Config) -> None:
    """The teacher builds (its model, checkpoint and LoRA targets); on the driver, since otherwise every trial
    would fail on it, each after a retry (a Ray Job checks it on the cluster). The first step to import the
    driver's heavy modules (torch through the methods, MLflow and Optuna): a local search runs it on the thread
    that works while Ray starts."""
    from tskd_tune.methods.checks import check_teacher as build_and_drop

    quiet_libraries()
    build_and_drop(cfg)


def reach(cfg: Config, opts: SearchOptions) -> None:
    """The checks that read: MLflow answers (on a fresh SQLite store this creates its tables, about 2 s) and
    the dataset's root and layout are what the adapter expects."""
    from tskd_tune.data.prepare import scan

    tracking.preflight(opts.tracking_uri)
    scan(cfg.data)


def ready(cfg: Config, opts: SearchOptions, resume: bool, say: Reporter) -> None:
    """Once the input is known to be good: the search folder, the premise warning, a resume's fresh start."""
    from tskd_tune.methods.checks import premise_warning

    writable_dir(opts.path, "--storage")
    warning = premise_warning(cfg)  # after the checks: bad input gets its one error line, not a warning first
    if warning:
        say.warn(warning)
    if resume:  # a resumed search gives its failed trials one more attempt (see faults.py)
        shutil.rmtree(state_path(opts) / faults.FAILED_DIR, ignore_errors=True)


def parent_run(cfg: Config, opts: SearchOptions, resume: bool, say: Reporter) -> str:
    """The search's MLflow parent run (reused on resume), with search.json written beside it."""
    from mlflow.entities import Param

    from tskd_tune.models.teacher import is_pretrained
    from tskd_tune.space import space_params

    parent = tracking.parent_run(
        opts.tracking_uri,
        cfg.tracking.experiment,
        opts.location,
        opts.name,
        {
            "search.name": opts.name,
            "search.space_file": opts.space_file,
            "git.commit": git_commit(),
            "ray.address": opts.address or "local",
            "teacher.pretrained": str(is_pretrained(cfg.teacher)).lower(),
        }
        | ({"tskd.warm_start": ", ".join(opts.warm_start)} if opts.warm_start else {}),
    )
    # the searched ranges as params (space.student.lr = loguniform(...)), which MLflow's UI lists and compares
    # while the search runs; a resumed search logs the same values again (the journal skips those the run has)
    client = tracking.BufferedClient(opts.tracking_uri, tracking.journal_path(state_path(opts), "parent"))
    client.log_batch(parent, params=[Param(k, v) for k, v in space_params(cfg.search.space).items()])
    if not resume:
        write_json(
            opts.path / SEARCH_FILE,
            {"config": cfg.model_dump(mode="json"), "options": opts.to_json(), "parent_run_id": parent},
        )
        if cluster.is_uri(opts.storage):
            cluster.push(opts.path, opts.location, [SEARCH_FILE])
        tracking.client(opts.tracking_uri).log_text(parent, to_yaml(cfg), "search_config.yaml")
    say.line(
        f"MLflow: {tracking.mask_secrets(opts.tracking_uri)} (experiment {cfg.tracking.experiment!r}, parent run {parent})"
    )
    if cfg.search.study_storage:
        where = mask_uri(cfg.search.study_storage)
        say.line(f"Optuna study {opts.name!r} in {where} (optuna-dashboard {where})")
    if opts.tracking_uri.startswith("sqlite:///"):
        say.line(f"  open it with: tskd-tune ui --uri {opts.tracking_uri}")
    return parent


def load_data(cfg: Config):
    """(the synthetic pool or None, (prepared data, splits)): preprocessed once, for the object store."""
    from tskd_tune.data.prepare import load
    from tskd_tune.methods.checks import search_uses_transfer
    from tskd_tune.synth import pool_for_search

    prepared, splits = load(cfg)
    # the synthetic pool is built here, once, before trials start; trials then find it in the cache
    pool = pool_for_search(cfg, prepared, splits) if search_uses_transfer(cfg) else None
    # plain arrays: Ray's object store shares them read-only, zero-copy, with every trial on the node
    prepared = dataclasses.replace(
        prepared, images=np.ascontiguousarray(prepared.images), masks=np.ascontiguousarray(prepared.masks)
    )
    return pool, (prepared, splits)


def preload_in_background() -> None:
    """Import MONAI's metrics while the trials run: the summary needs them to test the best trial, and MONAI
    loads all its subpackages on import (about 8 s on 2 cores) while the driver mostly waits on its workers."""
    import importlib
    import threading

    threading.Thread(
        target=importlib.import_module, args=("monai.metrics",), daemon=True, name="preload"
    ).start()


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
            ctx = ray.init(
                address=address or "local",
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                logging_level="ERROR",
                log_to_driver=True,
            )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        if not address:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise TskdError(f"--address: cannot join the Ray cluster at {address}: {first[:200]}") from None
    url = getattr(ctx, "dashboard_url", None)
    return (
        f"Ray dashboard: http://{url}  (it asks for a token: paste what `ray get-auth-token` prints)"
        if url
        else None
    )


def start_references(cfg: Config, data_ref, run: SearchRun) -> dict:
    """Start the reference trials as Ray tasks with a trial's resources; method -> object ref."""
    import ray

    from tskd_tune.search.trainable import reference_trial

    task = ray.remote(reference_trial).options(
        num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu, max_retries=1
    )
    return {m: task.remote(m, data_ref, cfg, run) for m in cfg.search.baselines}


def warn_when_teacher_below_scratch(refs: dict, say: Reporter, run: SearchRun) -> None:
    """As soon as both the teacher and the scratch reference have finished (the search still running), say in
    one line when the teacher is below scratch and tag the parent run; the summary says it again at the end."""
    if not {"teacher", "scratch"} <= refs.keys():
        return
    import threading

    import ray

    from tskd_tune.search.summary import TEACHER_BELOW_SCRATCH_TAG, teacher_below_scratch

    def watch() -> None:
        try:
            got = {m: ray.get(refs[m]) for m in ("teacher", "scratch")}
        except Exception:  # noqa: BLE001 - a failed reference is reported by finish_references
            return
        line = teacher_below_scratch(
            {f"reference_{m}_val_dice": r["val_dice"] for m, r in got.items() if "val_dice" in r}
        )
        if line:
            say.warn(line)
            # its own journal: the driver's thread writes the parent's
            client = tracking.BufferedClient(
                run.tracking_uri, tracking.journal_path(run.state_path, "teacher-vs-scratch")
            )
            client.set_tag(run.parent_run_id, TEACHER_BELOW_SCRATCH_TAG, "true")

    threading.Thread(target=watch, name="teacher-vs-scratch", daemon=True).start()


def finish_references(refs: dict, say: Reporter) -> dict:
    """Wait for the reference trials; a failed one is reported in one line, the search still ends."""
    import ray

    out = {}
    for method, ref in refs.items():
        try:
            out[method] = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a reference is context, not the search's result
            cause = getattr(exc, "cause", exc)
            say.line(f"reference trial {method} failed: {cause.__class__.__name__}: {str(cause)[:300]}")
    return out


def close_lost_children(opts: SearchOptions, parent: str, results, say: Reporter) -> None:
    """After a resume: end the child runs of trials the killed driver started but Ray never recorded."""
    known = {trial_id_of(Path(r.path).name) for r in results if r.path}
    try:
        lost = tracking.close_lost_children(opts.tracking_uri, parent, lambda t: t in known)
    except Exception as exc:  # noqa: BLE001 - MLflow down now: they stay RUNNING until the next resume
        if not tracking.unreachable(exc):
            raise
        return
    if lost:
        say.line(
            f"MLflow: {len(lost)} run(s) of trials lost with the killed driver ended as KILLED "
            f"(tskd.status=lost): {', '.join(lost)}"
        )
