"""``run_trial(cfg, report, tracker)``: the one entry point a search calls. No Ray import here.

A trial loads (or receives) the prepared data, loads (or builds, once) the synthetic pool when its
transfer set draws from it, runs the configured method, measures the models and
writes its outputs to ``out_dir``: ``config.yaml`` (the resolved config, so the result can be re-run),
``metrics.json``, ``student.safetensors`` and ``checkpoint/`` (resumable state).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

from tskd_tune.cache import Store, atomic_write, writable_dir
from tskd_tune.config import Config, to_yaml
from tskd_tune.data.prepare import Prepared, Splits, load
from tskd_tune.errors import StorageError
from tskd_tune.methods import METHODS, Stages
from tskd_tune.metrics import count_params, evaluate, latency_ms
from tskd_tune.models.teacher import is_pretrained
from tskd_tune.runtime import resolve_device, set_threads
from tskd_tune.synth import build_pool, uses_pool
from tskd_tune.train import Report, load_checkpoint, seed_all


class Tracker(Protocol):
    """Where a trial's per-epoch curves go (a JSON-lines file for `tskd-tune trial`; MLflow in a search)."""

    def log_metrics(self, metrics: dict, step: int) -> None: ...


class JsonlTracker:
    """Appends one JSON object per epoch to a file (``history.jsonl`` beside the trial's outputs)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        writable_dir(self.path.parent, "--out")

    def log_metrics(self, metrics: dict, step: int) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step} | metrics, default=float) + "\n")
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot append to it ({exc.strerror})") from None


def run_trial(
    cfg: Config,
    report: Report | None = None,
    tracker: Tracker | None = None,
    *,
    out_dir: Path | None = None,
    resume_from: Path | None = None,
    test: bool = False,
    use_cache: bool | None = None,
    data: tuple[Prepared, Splits] | None = None,
    fill_threads: int | None = None,
) -> dict:
    """Run one trial of ``cfg.distill.method``; returns the final metrics (also in ``out_dir/metrics.json``).

    ``report(epoch, metrics, checkpoint_dir)`` is called after every student epoch. ``resume_from`` is a
    checkpoint folder of an interrupted run of the same config. The test split is evaluated only with
    ``test=True``, never during a search. ``fill_threads``: threads for teacher features missing from the
    cache (default: the trial's threads; a standalone trial has the whole machine).
    """
    t_start = time.perf_counter()
    threads = set_threads(cfg)
    seed_all(cfg.seed)
    device = resolve_device(cfg)
    enabled = cfg.cache.enabled if use_cache is None else use_cache
    t0 = time.perf_counter()
    prepared, splits = data if data is not None else load(cfg, use_cache=enabled)
    timings = {"data_s": time.perf_counter() - t0}
    if out_dir is not None:
        out_dir = writable_dir(Path(out_dir), "trial output folder")
        atomic_write(out_dir / "config.yaml", to_yaml(cfg))
    resume = load_checkpoint(resume_from) if resume_from is not None else None

    def on_epoch(epoch: int, metrics: dict, ckpt: Path | None) -> None:
        if tracker is not None:
            tracker.log_metrics(metrics, step=epoch)
        if report is not None:
            report(epoch, metrics, ckpt)

    store = Store(cfg.cache.dir, enabled)
    pool = None
    if uses_pool(cfg):
        # built once and cached (file-locked), so concurrent trials of a search share one pool
        t0 = time.perf_counter()
        pool = build_pool(cfg, prepared, splits, store, device)
        timings["synth_s"] = time.perf_counter() - t0
    st = Stages(cfg, prepared, splits, store, device, out_dir, resume, timings, pool=pool,
                fill_threads=fill_threads or threads)  # fmt: skip
    if pool is not None:
        st.info |= pool.metrics()
    outcome = METHODS[cfg.distill.method](st, on_epoch)

    image_size, chans = cfg.data.image_size, cfg.data.channels
    result = dict(outcome.metrics)
    result.pop("epoch_s", None)
    result |= {
        "method": cfg.distill.method,
        "student_params": count_params(outcome.model),
        "student_latency_ms": outcome.metrics["teacher_latency_ms"] if outcome.model is outcome.teacher
        else latency_ms(outcome.model, chans, image_size, device=device, repeats=5),
        "teacher_params": count_params(outcome.teacher) if outcome.teacher is not None else None,
        "teacher_latency_ms": outcome.metrics.get("teacher_latency_ms"),
        "teacher_pretrained": is_pretrained(cfg.teacher) if cfg.distill.method != "scratch" else None,
        "teacher_features_cached": None,
        "teacher_features_s": None,
        **st.info,
        **{"labeled": len(splits.labeled), "unlabeled": len(splits.unlabeled)},
    }
    if test:
        result |= outcome.evaluate("test") if outcome.evaluate else evaluate(
            outcome.model, prepared.images[splits.test], prepared.masks[splits.test], prepared.classes, 32, device,
            prefix="test_")  # fmt: skip
    result |= timings | {"total_s": time.perf_counter() - t_start}
    if out_dir is not None:
        if cfg.distill.method != "teacher":
            from safetensors.torch import save

            state = {k: v.detach().cpu().contiguous() for k, v in outcome.model.state_dict().items()}
            meta = {"method": cfg.distill.method, "model": cfg.student.model}
            atomic_write(out_dir / "student.safetensors", save(state, metadata=meta))
        atomic_write(out_dir / "metrics.json", json.dumps(result, indent=2, default=float))
    return result
