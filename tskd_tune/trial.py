"""``run_trial(cfg, report, tracker)``: the one entry point a search calls. No Ray import here.

A trial loads (or receives) the prepared data, loads (or builds, once) the synthetic pool when its
transfer set draws from it, runs the configured method, measures the models and
writes its outputs to ``out_dir``: ``config.yaml`` (the resolved config, so the result can be re-run),
``metrics.json``, ``student.safetensors`` and ``checkpoint/`` (resumable state). It orchestrates only: the
method reports through its :class:`~tskd_tune.methods.Record`, the student's weights are saved by
:func:`tskd_tune.export.save_student` and its overlays drawn by :func:`tskd_tune.data.inspect.val_overlays`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tskd_tune.cache import Store, atomic_write, writable_dir, write_json
from tskd_tune.config import Config, to_yaml
from tskd_tune.data.inspect import val_overlays
from tskd_tune.data.prepare import Prepared, Splits, load
from tskd_tune.errors import StorageError
from tskd_tune.export import save_student
from tskd_tune.methods import Record, TeacherSource, TrialContext, get_method
from tskd_tune.methods.checks import uses_pool
from tskd_tune.metrics import count_params, evaluate, latency_ms
from tskd_tune.models.teacher import is_pretrained
from tskd_tune.runtime import keep_freed_memory, resolve_device, set_threads
from tskd_tune.synth import build_pool, pool_semantics
from tskd_tune.synth.semantic import K as SEMANTIC_MIN_POOL
from tskd_tune.train import Hooks, Report, load_checkpoint, seed_all

log = logging.getLogger(__name__)


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
    data: tuple[Prepared, Splits] | None = None,
    fill_threads: int | None = None,
    hooks: Hooks | None = None,
) -> TrialResult:
    """Run one trial of ``cfg.distill.method``; returns what it measured and wrote.

    ``report(epoch, metrics, checkpoint_dir)`` is called after every reported epoch. With ``out_dir`` the
    trial writes all its outputs there: ``config.yaml``, ``metrics.json``, ``student.safetensors`` and
    ``val_overlays.png`` (methods that train a student) and ``checkpoint/``. ``resume_from`` is a
    checkpoint folder of an interrupted run of the same config. The test split is evaluated only with
    ``test=True``, never during a search. ``data``: the prepared data and splits, when the caller has
    them (a search passes them through Ray's object store). ``fill_threads``: threads for teacher features
    missing from the cache (default: the trial's threads; a standalone trial has the whole machine).
    ``hooks``: what the caller hooks into the training loops (a search: heartbeat and fault injection).
    """
    t_start = time.perf_counter()
    threads = set_threads(cfg)
    keep_freed_memory(cfg)
    fill = fill_threads or threads
    seed_all(cfg.seed)
    device = resolve_device(cfg)
    record = Record()  # what the trial measures before the method; the method's stages fill in the rest
    with record.timed("data"):
        prepared, splits = data if data is not None else load(cfg)
    if out_dir is not None:
        out_dir = writable_dir(Path(out_dir), "trial output folder")
        atomic_write(out_dir / "config.yaml", to_yaml(cfg))
    resume = load_checkpoint(resume_from) if resume_from is not None else None

    def on_epoch(epoch: int, metrics: dict, ckpt: Path | None) -> None:
        if tracker is not None:
            tracker.log_metrics(metrics, step=epoch)
        if report is not None:
            report(epoch, metrics, ckpt)

    store = Store(cfg.cache.dir, cfg.cache.enabled)
    pool = None
    if uses_pool(cfg):
        # built once and cached (file-locked), so concurrent trials of a search share one pool
        with record.timed("synth"):
            pool = build_pool(cfg, prepared, splits, store, device)
            if pool is not None and len(pool) > SEMANTIC_MIN_POOL:
                # the pool seen through the teacher's frozen encoder: once per pool and encoder, cached
                pool.semantic = pool_semantics(cfg, prepared, splits, pool, store, device, fill)
                if not pool.semantic["passed"]:
                    log.warning(
                        "synthetic pool %s FAILED the semantic gate (%s)",
                        pool.path,
                        "; ".join(pool.semantic["reasons"]),
                    )
    if pool is not None:
        record.pool = pool.metrics()
    spec = get_method(cfg.distill.method)
    st = TrialContext(
        cfg,
        prepared,
        splits,
        store,
        device,
        out_dir,
        resume,
        record,
        pool=pool,
        fill_threads=fill,
        hooks=hooks or Hooks(),
    )
    outcome = spec.run(st, on_epoch)

    image_size, chans = cfg.data.image_size, cfg.data.channels
    result = dict(outcome.metrics)
    result.pop("epoch_s", None)
    result |= {
        "method": cfg.distill.method,
        "student_params": count_params(outcome.model),
        "student_latency_ms": outcome.metrics["teacher_latency_ms"]
        if outcome.model is outcome.teacher
        else latency_ms(outcome.model, chans, image_size, device=device, repeats=5),
        "teacher_params": count_params(outcome.teacher) if outcome.teacher is not None else None,
        "teacher_latency_ms": outcome.metrics.get("teacher_latency_ms"),
        "teacher_pretrained": is_pretrained(cfg.teacher) if spec.teacher else None,
        **outcome.record.metrics(),
        **{"labeled": len(splits.labeled), "unlabeled": len(splits.unlabeled)},
    }
    if test:
        result |= (
            outcome.evaluate("test")
            if outcome.evaluate
            else evaluate(
                outcome.model,
                prepared.images[splits.test],
                prepared.masks[splits.test],
                prepared.classes,
                32,
                device,
                prefix="test_",
            )
        )
    result |= outcome.record.seconds() | {"total_s": time.perf_counter() - t_start, "threads": threads}
    files = []
    if out_dir is not None:
        files.append(out_dir / "config.yaml")
        if spec.student:
            files.append(save_student(outcome.model, out_dir, cfg.distill.method, cfg.student.model))
            files.append(val_overlays(outcome.model, prepared, splits, out_dir, device))
        write_json(out_dir / "metrics.json", result)
        files.append(out_dir / "metrics.json")
    teacher = outcome.record.teacher or TeacherSource(cached=None)
    return TrialResult(result, files, teacher_cached=teacher.cached, teacher_entry=teacher.adapter)


@dataclass
class TrialResult(Mapping):
    """What a trial measured and wrote. Reads like its metrics (``result["val_dice"]``), which are also
    what ``metrics.json`` holds."""

    metrics: dict
    files: list[Path] = field(default_factory=list)
    """The outputs written to ``out_dir``, in the order they were written (what a tracker logs)."""
    teacher_cached: bool | None = None
    """Whether the fine-tuned teacher came from the cache (None: the method has none)."""
    teacher_entry: str | None = None
    """The cache folder of the fine-tuned teacher (its head or LoRA adapter): a reference, not a copy."""

    def __getitem__(self, key: str):
        return self.metrics[key]

    def __iter__(self):
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def tags(self) -> dict[str, str]:
        """What identifies the trial's reused parts, as run tags."""
        return {
            "tskd.teacher_cached": str(self.teacher_cached),
            "tskd.teacher_adapter": str(self.teacher_entry),
        }
