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
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tskd_tune import tracking
from tskd_tune.config import END_OF_TRIAL_METRICS, Config, apply_values, to_yaml
from tskd_tune.errors import TskdError

SEARCH_FILE = "search.json"


@dataclass
class SearchOptions:
    """How a search runs (CLI flags), as opposed to what it searches (the config)."""

    name: str
    storage: Path
    tracking_uri: str
    address: str | None = None
    use_cache: bool = True
    space_file: str = ""

    @property
    def path(self) -> Path:
        return self.storage / self.name


def absolutize(cfg: Config) -> Config:
    """Relative paths resolved against the driver's working directory (trials run elsewhere)."""
    upd = {
        "cache": cfg.cache.model_copy(update={"dir": cfg.cache.dir.resolve()}),
        "tracking": cfg.tracking.model_copy(update={"uri": tracking.absolute_uri(cfg.tracking.uri)}),
    }
    if cfg.data.root is not None:
        upd["data"] = cfg.data.model_copy(update={"root": cfg.data.root.resolve()})
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
    import socket

    import numpy as np
    import ray
    from ray import tune

    from tskd_tune.config import validate
    from tskd_tune.data.prepare import Prepared
    from tskd_tune.trial import resolve_device, run_trial

    for name in ("ray.tune", "ray.train"):  # one "checkpoint created" line per epoch is noise
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = apply_values(validate(base, check_search_space=False), config)
    if cfg.resources.gpu and 0 < cfg.resources.gpu < 1 and resolve_device(cfg).type == "cuda":
        import torch

        # Ray's fractional GPUs are bookkeeping only: cap this trial's share of the memory ourselves
        torch.cuda.set_per_process_memory_fraction(cfg.resources.gpu)
    ctx = tune.get_context()
    trial_id, trial_dir = ctx.get_trial_id(), Path(ctx.get_trial_dir())
    run_id, resumed = tracking.child_run(
        run["tracking_uri"], run["parent_run_id"], trial_id, ctx.get_trial_name()
    )
    tracker = tracking.RunTracker(run["tracking_uri"], run_id)
    monitor = tracking.system_monitor(cfg.tracking, run["tracking_uri"], run_id, resumed)
    tracker.log_params(config | {"distill.method": cfg.distill.method, "student.model": cfg.student.model})
    tracker.set_tags({"ray.node_id": ray.get_runtime_context().get_node_id(), "ray.node_ip": socket.gethostbyname(socket.gethostname()),
                      "device": str(resolve_device(cfg)), "resumed": resumed})  # fmt: skip
    out_dir = trial_dir / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    tracker.log_artifact(out_dir / "config.yaml")

    prepared = Prepared(
        data["images"], data["masks"], data["ids"], data["groups"], data["classes"], Path(data["path"]), True
    )
    splits = data["splits"]

    last_epoch = 1 if cfg.distill.method == "teacher" else cfg.student.epochs
    at_end = [m for m, _ in cfg.search.objective_items() if m in END_OF_TRIAL_METRICS]
    held: dict = {}

    def report(epoch: int, metrics: dict, ckpt: Path | None) -> None:
        out = {
            k: v
            for k, v in metrics.items()
            if isinstance(v, int | float | bool) and not isinstance(v, np.generic)
        }
        out |= {"epoch": epoch, "mlflow_run_id": run_id}
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
        resume_from = Path(checkpoint.to_directory(str(trial_dir / "restored_checkpoint")))
    try:
        result = run_trial(cfg, report, tracker, out_dir=out_dir, resume_from=resume_from, use_cache=run["use_cache"],
                           data=(prepared, splits))  # fmt: skip
    except Exception as exc:
        tracking.stop_monitor(monitor)
        tracker.set_tags(
            {"tskd.status": "failed", "tskd.error": f"{exc.__class__.__name__}: {str(exc)[:480]}"}
        )
        tracker.finish("FAILED")
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
    final = held.get("metrics", {"epoch": last_epoch, "mlflow_run_id": run_id})
    final |= {f"final_{k}": v for k, v in tracking.numeric(result).items()}
    # end-of-trial objectives (latency, size) under their own names, as the searcher expects them
    final |= {k: v for k, v in tracking.numeric(result).items() if k in END_OF_TRIAL_METRICS}
    ckpt = held.get("ckpt")
    tune.report(final, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt is not None else None)


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


def _finalizer(tracking_uri: str, parent_run_id: str, max_epochs: int):
    """A Tune callback that gives every child run a final MLflow status: none is left RUNNING."""
    from ray import tune

    class MlflowFinalizer(tune.Callback):
        def _run_id(self, trial) -> str | None:
            return (trial.last_result or {}).get("mlflow_run_id") or tracking.find_child(
                tracking_uri, parent_run_id, trial.trial_id
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            run_id = self._run_id(trial)
            if run_id is None:
                return
            epoch = (trial.last_result or {}).get("epoch", 0)
            c = tracking.client(tracking_uri)
            if (
                c.get_run(run_id).info.status == "RUNNING"
            ):  # the trial did not finish it: the scheduler stopped it
                c.set_tag(run_id, "tskd.status", "stopped_early")
                c.set_tag(run_id, "tskd.stopped_at_epoch", str(epoch))
                c.set_terminated(run_id, status="KILLED")

        def on_trial_error(self, iteration, trials, trial, **info):
            run_id = self._run_id(trial)
            if run_id is None:
                return
            c = tracking.client(tracking_uri)
            if c.get_run(run_id).info.status == "RUNNING":
                c.set_tag(run_id, "tskd.status", "failed")
                c.set_terminated(run_id, status="FAILED")

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


def _data_payload(cfg: Config, use_cache: bool) -> dict:
    import numpy as np

    from tskd_tune.data.prepare import load

    prepared, splits = load(cfg, use_cache=use_cache)
    from tskd_tune.synth import pool_for_search

    # the synthetic pool is built here, once, before trials start; trials then find it in the cache
    pool_for_search(cfg, prepared, splits, use_cache=use_cache)
    # plain arrays: Ray's object store shares them read-only, zero-copy, with every trial on the node
    return {
        "images": np.ascontiguousarray(prepared.images),
        "masks": np.ascontiguousarray(prepared.masks),
        "ids": prepared.ids,
        "groups": prepared.groups,
        "classes": prepared.classes,
        "path": str(prepared.path),
        "splits": splits,
    }


def init_ray(address: str | None, console) -> None:
    """Start (or join) Ray; the dashboard binds to 127.0.0.1 and its URL is printed."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic table reporter shows our columns
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if ray.is_initialized():
        return
    # "local" rather than None: None would silently join the last `ray start` cluster on this machine
    ctx = ray.init(address=address or "local", include_dashboard=True, dashboard_host="127.0.0.1", logging_level="ERROR",
                   log_to_driver=True)  # fmt: skip
    url = getattr(ctx, "dashboard_url", None)
    if url:
        console.print(
            f"Ray dashboard: http://{url}  (token auth: the token is in ~/.ray/auth_token)", markup=False
        )


def _tuner(cfg: Config, opts: SearchOptions, parent_run_id: str, data_ref: dict, restore: bool = False):
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from tskd_tune.space import to_optuna

    run = {"tracking_uri": opts.tracking_uri, "parent_run_id": parent_run_id, "use_cache": opts.use_cache}
    trainable = tune.with_parameters(_trainable, data=data_ref, base=cfg.model_dump(mode="json"), run=run)
    trainable = tune.with_resources(trainable, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    max_epochs = 1 if cfg.distill.method == "teacher" else cfg.student.epochs
    finalizer = _finalizer(opts.tracking_uri, parent_run_id, max_epochs)
    if restore:
        return tune.Tuner.restore(
            str(opts.path), trainable=trainable, resume_unfinished=True, resume_errored=True
        ), finalizer
    s = cfg.search
    # metric and mode go to searcher and scheduler themselves: ConcurrencyLimiter does not pass them on
    objectives = s.objective_items()
    metric, mode = objectives[0]
    if len(objectives) > 1:  # Optuna's multi-objective study: every trial's final result carries all of them
        metric, mode = [m for m, _ in objectives], [d for _, d in objectives]
    searcher = OptunaSearch(space=to_optuna(s.space), metric=metric, mode=mode, sampler=_sampler(cfg),
                            points_to_evaluate=s.points_to_evaluate or None)  # fmt: skip
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

    cfg = absolutize(cfg)
    opts.tracking_uri = tracking.absolute_uri(opts.tracking_uri)
    opts.storage = opts.storage.resolve()
    tracking.preflight(opts.tracking_uri)
    if resume and not (opts.path / SEARCH_FILE).is_file():
        raise TskdError(f"{opts.path}: no search to resume here (no {SEARCH_FILE})")
    if not resume and (opts.path / SEARCH_FILE).is_file():
        raise TskdError(
            f"{opts.path}: a search named {opts.name!r} exists; `tskd-tune resume {opts.path}` or pick --name"
        )
    opts.path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    console.print(f"preparing data ({cfg.data.dataset}) ...", markup=False)
    payload = _data_payload(cfg, opts.use_cache)
    init_ray(opts.address, console)
    parent = tracking.parent_run(
        opts.tracking_uri, cfg.tracking.experiment, str(opts.path), opts.name,
        {"search.name": opts.name, "search.space_file": opts.space_file, "git.commit": _git_commit(),
         "ray.address": opts.address or "local"},
    )  # fmt: skip
    if not resume:
        _write_json(opts.path / SEARCH_FILE, {"config": cfg.model_dump(mode="json"), "options": {
            "name": opts.name, "storage": str(opts.storage), "tracking_uri": opts.tracking_uri, "address": opts.address,
            "use_cache": opts.use_cache, "space_file": opts.space_file}, "parent_run_id": parent})  # fmt: skip
        client = tracking.client(opts.tracking_uri)
        client.log_text(parent, to_yaml(cfg), "search_config.yaml")
    console.print(
        f"MLflow: {tracking.mask_secrets(opts.tracking_uri)} (experiment {cfg.tracking.experiment!r}, parent run {parent})",
        markup=False,
    )
    if opts.tracking_uri.startswith("sqlite:///"):
        console.print(
            f"  open it with: mlflow ui --backend-store-uri {opts.tracking_uri} --host 127.0.0.1",
            markup=False,
        )
    data_ref = ray.put(payload)
    tuner, _ = _tuner(cfg, opts, parent, data_ref, restore=resume and (opts.path / "tuner.pkl").exists())
    try:
        results = tuner.fit()
    finally:
        tracking.client(opts.tracking_uri).update_run(parent, status="RUNNING")
    summary = summarize(cfg, opts, results, parent, payload, console)
    summary["wall_s"] = time.perf_counter() - t0
    _write_json(opts.path / "summary.json", summary)
    tracking.client(opts.tracking_uri).set_terminated(parent, status="FINISHED")
    return summary


def summarize(cfg: Config, opts: SearchOptions, results, parent: str, payload: dict, console) -> dict:
    """Leaderboard, best config and the best trial evaluated once on the test split; logged to the parent."""
    from tskd_tune.report import leaderboard, pareto_front

    c = tracking.client(opts.tracking_uri)
    objectives = cfg.search.objective_items()
    metric, _ = objectives[0]
    board = leaderboard(opts.path, *objectives[0], extra=[m for m, _ in objectives[1:]])
    if len(objectives) > 1:
        board.insert(board.columns.get_loc("epoch") + 1, "pareto", pareto_front(board, objectives))
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
    best = board.iloc[0]  # the best in the first objective, which is always on the Pareto front
    trial_dir = Path(best["trial_dir"])
    best_cfg_path = opts.path / "best.yaml"
    best_cfg_path.write_text((trial_dir / "outputs" / "config.yaml").read_text())
    c.log_artifact(parent, str(best_cfg_path))
    test = evaluate_on_test(trial_dir / "outputs", payload)
    summary |= {"best_trial": best["trial_id"], "best_" + metric: float(best[metric]),
                "best_config": str(best_cfg_path), **test}  # fmt: skip
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    c.log_batch(parent, metrics=[Metric(k, v, ts, 0) for k, v in tracking.numeric(
        {"best_" + metric: summary["best_" + metric], **test}).items()])  # fmt: skip
    print(board.drop(columns=["trial_dir"]).head(10).to_string(index=False))
    console.print(f"best trial {best['trial_id']}: {metric} {best[metric]:.4f}; "
                  f"test_dice {test.get('test_dice', float('nan')):.4f}; config {best_cfg_path}", markup=False)  # fmt: skip
    return summary


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
        o["name"], Path(o["storage"]), o["tracking_uri"], o["address"], o["use_cache"], o["space_file"]
    )
    return validate(saved["config"]), opts, saved["parent_run_id"]


def resolve_search_path(name_or_path: str, storage: Path = Path("runs")) -> Path:
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
