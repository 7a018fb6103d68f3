"""``run_trial(cfg, report, tracker)``: the one entry point a search calls. No Ray import here.

A trial loads (or receives) the prepared data, loads (or builds, once) the synthetic pool when its
transfer set draws from it, runs the configured method, measures the models and
writes its outputs to ``out_dir``: ``config.yaml`` (the resolved config, so the result can be re-run),
``metrics.json``, ``student.safetensors`` and ``checkpoint/`` (resumable state).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from tskd_tune.cache import Store, atomic_write, writable_dir
from tskd_tune.config import Config, to_yaml
from tskd_tune.data.prepare import Prepared, Splits, load
from tskd_tune.errors import StorageError
from tskd_tune.methods import TrialContext, get_method
from tskd_tune.methods.checks import uses_pool
from tskd_tune.metrics import count_params, evaluate, latency_ms
from tskd_tune.models.teacher import is_pretrained
from tskd_tune.runtime import resolve_device, set_threads
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
    seed_all(cfg.seed)
    device = resolve_device(cfg)
    t0 = time.perf_counter()
    prepared, splits = data if data is not None else load(cfg)
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

    store = Store(cfg.cache.dir, cfg.cache.enabled)
    pool = None
    if uses_pool(cfg):
        # built once and cached (file-locked), so concurrent trials of a search share one pool
        t0 = time.perf_counter()
        pool = build_pool(cfg, prepared, splits, store, device)
        if pool is not None and len(pool) > SEMANTIC_MIN_POOL:
            # the pool seen through the teacher's frozen encoder: once per pool and encoder, cached
            pool.semantic = pool_semantics(cfg, prepared, splits, pool, store, device, fill_threads or threads)
            if not pool.semantic["passed"]:
                log.warning("synthetic pool %s FAILED the semantic gate (%s)", pool.path,
                            "; ".join(pool.semantic["reasons"]))  # fmt: skip
        timings["synth_s"] = time.perf_counter() - t0
    spec = get_method(cfg.distill.method)
    st = TrialContext(cfg, prepared, splits, store, device, out_dir, resume, timings, pool=pool,
                      fill_threads=fill_threads or threads, hooks=hooks or Hooks())  # fmt: skip
    if pool is not None:
        st.info |= pool.metrics()
    outcome = spec.run(st, on_epoch)

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
        "teacher_pretrained": is_pretrained(cfg.teacher) if spec.teacher else None,
        "teacher_features_cached": None,
        "teacher_features_s": None,
        **st.info,
        **{"labeled": len(splits.labeled), "unlabeled": len(splits.unlabeled)},
    }
    if test:
        result |= outcome.evaluate("test") if outcome.evaluate else evaluate(
            outcome.model, prepared.images[splits.test], prepared.masks[splits.test], prepared.classes, 32, device,
            prefix="test_")  # fmt: skip
    result |= timings | {"total_s": time.perf_counter() - t_start, "threads": threads}
    files = []
    if out_dir is not None:
        files.append(out_dir / "config.yaml")
        if spec.student:
            from safetensors.torch import save

            state = {k: v.detach().cpu().contiguous() for k, v in outcome.model.state_dict().items()}
            meta = {"method": cfg.distill.method, "model": cfg.student.model}
            atomic_write(out_dir / "student.safetensors", save(state, metadata=meta))
            files += [out_dir / "student.safetensors", overlays(outcome.model, prepared, splits, out_dir, device)]
        atomic_write(out_dir / "metrics.json", json.dumps(result, indent=2, default=float))
        files.append(out_dir / "metrics.json")
    return TrialResult(result, files, teacher_cached=st.info.get("teacher_cached"),
                       teacher_entry=st.info.get("teacher_adapter"))  # fmt: skip


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
        return {"tskd.teacher_cached": str(self.teacher_cached), "tskd.teacher_adapter": str(self.teacher_entry)}


def overlays(model: torch.nn.Module, prepared: Prepared, splits: Splits, out_dir: Path, device, n: int = 6) -> Path:
    """``val_overlays.png``: for the first ``n`` validation images, a row of the image, its true mask and the
    model's prediction, with the class colours in a legend."""
    import io

    import numpy as np

    from tskd_tune.data.inspect import comparison_grid

    idx = np.sort(splits.val[:n])
    images = np.asarray(prepared.images[idx], dtype=np.float32)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        pred = model(torch.from_numpy(images).to(device)).argmax(1).cpu().numpy().astype(np.uint8)
    model.train(was_training)
    buf = io.BytesIO()
    comparison_grid(images, np.asarray(prepared.masks[idx]), pred, prepared.classes).save(buf, format="PNG")
    atomic_write(out_dir / "val_overlays.png", buf.getvalue())
    return out_dir / "val_overlays.png"
