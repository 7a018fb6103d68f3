"""Filling the encoder-feature cache across the cluster before a search's trials start.

Every trial of a search reads the same teacher features (see :mod:`tskd_tune.features`): the driver
works out which entries the search will need (one per frozen depth the space can reach, for the
prepared images and for the synthetic pool), and the missing ones are computed by one Ray actor per
CPU of the cluster (each a :class:`~tskd_tune.features.Filler` on one thread, which measured fastest
per core), in chunks of images handed out as workers free up, with a progress bar. A 2-node cluster
fills an entry in about half the time of one node; trials then find every entry in the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tskd_tune.cache import Store, digest, verify
from tskd_tune.config import Config, apply_values
from tskd_tune.data.prepare import Prepared
from tskd_tune.features import KIND, Arrays, data_source, feature_key, pool_source, view_inputs, views_source
from tskd_tune.methods.checks import search_methods
from tskd_tune.methods.registry import METHODS
from tskd_tune.models.teacher import ALL_FROZEN, build_teacher

if TYPE_CHECKING:
    from rich.console import Console

    from tskd_tune.reporter import Reporter

CHUNK = 4
"""Images per task: small enough for an even spread and a live progress bar."""
ON_DRIVER_S = 20.0
"""Below this estimated fill time the driver computes the features itself (workers take seconds to start)."""


def needed_variants(cfg: Config) -> list[tuple[str, int | None]]:
    """The teacher variants, (adapt, lora.last_blocks), whose features the search's trials can read: from
    the methods (and reference trials), adaptation modes and ``last_blocks`` values the space can propose."""
    space, teachers = cfg.search.space, _teachers(cfg)
    out: list[tuple[str, int | None]] = []
    if "fine_tuned" in teachers:
        adapts = space["teacher.adapt"].boundary_values() if "teacher.adapt" in space else [cfg.teacher.adapt]
        blocks = (
            _all_values(space["teacher.lora.last_blocks"])
            if "teacher.lora.last_blocks" in space
            else [cfg.teacher.lora.last_blocks]
        )
        for adapt in adapts:
            for k in blocks if adapt == "lora" else [None]:
                out.append((adapt, k))
    if "frozen" in teachers:  # the whole frozen encoder's output is what such a method distils
        out.append(("head", None))
    return sorted(set(out), key=str)


def teacher_notice(cfg: Config, prepared: Prepared, splits) -> str | None:
    """One line when the search's trials will fine-tune their teacher first (it is not in the trial cache):
    on 2 CPU cores, ``adapt: lora`` takes 40 min to hours, and a first trial silent that long looks hung."""
    from tskd_tune.transfer import teacher_key

    if "fine_tuned" not in _teachers(cfg):
        return None
    t = cfg.teacher
    where = f"the last {t.lora.last_blocks} blocks" if t.lora.last_blocks else "every block"
    what = f"LoRA rank {t.lora.rank} in {where}" if t.adapt == "lora" else "its head"
    if any(k.startswith("teacher.") for k in cfg.search.space):
        return (
            f"teacher: {t.model} is fine-tuned in the first trial of each teacher.* "
            "configuration the search proposes, then read from the trial cache; trials that need it wait"
        )
    if cfg.cache.enabled and verify(
        Store(cfg.cache.dir).path("teacher", digest(teacher_key(cfg, prepared, splits)))
    ):
        return None
    return (
        f"teacher: {t.model} is not fine-tuned for this split yet ({what}, {t.epochs} "
        f"epoch{'s' * (t.epochs != 1)} on "
        f"{len(splits.labeled)} labelled images): the first trial does it, the others wait for it and then read "
        "it from the trial cache (on 2 CPU cores, adapt: lora takes 40 min to hours; adapt: head minutes)"
    )


def _teachers(cfg: Config) -> set[str]:
    """The kinds of teacher the search's trials and reference trials use (fine_tuned, frozen)."""
    return {METHODS[m].teacher for m in search_methods(cfg) | set(cfg.search.baselines)} - {None}


def _all_values(dist) -> list:
    values = dist.boundary_values()
    if all(isinstance(v, int) for v in values) and len(values) == 2:
        return list(range(min(values), max(values) + 1))
    return values


@dataclass
class Job:
    """Missing cache entries of one teacher variant: ``n`` images to run through its prefix, written to
    one entry (the prepared data, the pool) or split into one entry per image (augmented views)."""

    variant: Config
    frozen: int
    what: str
    images: object  # an array, or an object ref of one (or of the search's data payload)
    n: int
    keys: list[dict]  # one key: one entry of n rows; several: n / len(keys) rows each
    masks: np.ndarray | None = None  # augmented views' masks, stored beside their states


def _jobs(cfg: Config, prepared: Prepared, splits, data_ref, pool, store: Store) -> list[Job]:
    import ray

    jobs = []
    for adapt, k in needed_variants(cfg):
        variant = apply_values(cfg, {"teacher.adapt": adapt, "teacher.lora.last_blocks": k})
        model = _base(variant, len(prepared.classes), ALL_FROZEN if adapt == "head" else None)
        if model.frozen == 0:
            continue  # LoRA in every block: nothing frozen to cache

        def missing(src, v=variant, m=model) -> bool:
            return not verify(store.path("features", digest(feature_key(v, m, src))))

        if missing(data_source(prepared)):
            jobs.append(
                Job(
                    variant,
                    model.frozen,
                    "images",
                    data_ref,
                    len(prepared),
                    [feature_key(variant, model, data_source(prepared))],
                )
            )
        if pool is not None and len(pool) and missing(pool_source(pool.key)):
            jobs.append(
                Job(
                    variant,
                    model.frozen,
                    "synthetic images",
                    ray.put(np.ascontiguousarray(pool.images)),
                    len(pool),
                    [feature_key(variant, model, pool_source(pool.key))],
                )
            )
        views = variant.teacher.augment_views
        todo = [int(i) for i in splits.labeled if missing(views_source(variant, prepared, int(i)))]
        if views and todo and "fine_tuned" in _teachers(cfg):  # views train a teacher
            made = [view_inputs(variant, prepared, i) for i in todo]
            jobs.append(
                Job(
                    variant,
                    model.frozen,
                    "augmented views",
                    ray.put(np.concatenate([m[0] for m in made])),
                    views * len(todo),
                    [feature_key(variant, model, views_source(variant, prepared, i)) for i in todo],
                    np.stack([m[1] for m in made]),
                )
            )
    return jobs


def fill_features(
    cfg: Config, prepared: Prepared, splits, data_ref, pool, say: Reporter, workers: int | None = None
) -> dict:
    """Compute every missing feature entry the search needs (the prepared images, the synthetic pool, the
    labelled images' augmented views) on Ray actors, or on the driver for a small encoder."""
    import ray

    store = Store(cfg.cache.dir)
    jobs = _jobs(cfg, prepared, splits, data_ref, pool, store)
    if not jobs:
        return {"teacher_features_filled": 0}
    total = sum(j.n for j in jobs)
    t0 = time.perf_counter()
    workers = 0
    if (
        _seconds_per_image(jobs[0].variant, len(prepared.classes), jobs[0].frozen, prepared) * total
        < ON_DRIVER_S
    ):
        # a small encoder: starting workers would cost more than the work; the driver does it on every core
        for job in jobs:
            _write(store, job, _on_driver(job, len(prepared.classes), say.console))
    else:
        cpus = int(ray.available_resources().get("CPU", 1))
        workers = max(1, min(workers or cpus, -(-total // CHUNK)))
        actor = ray.remote(num_cpus=1)(FeatureWorker)
        pool_of = [actor.remote(len(prepared.classes), total // workers + 1) for _ in range(workers)]
        depths = sorted({j.frozen for j in jobs})  # one per teacher variant the space can propose
        say.line(
            f"teacher features: {total} inputs through the encoder's {'/'.join(map(str, depths))} frozen blocks, once, on "
            f"{workers} worker(s); cached for every trial"
        )
        try:
            with _progress(say.console) as bar:
                for job in jobs:
                    task = bar.add_task(
                        job.what if len(depths) == 1 else f"{job.what} ({job.frozen})", total=job.n
                    )
                    _write(
                        store,
                        job,
                        lambda write, job=job, task=task: _distribute(
                            pool_of, job, write, lambda k: bar.update(task, advance=k)
                        ),
                    )
        finally:
            for a in pool_of:
                ray.kill(a)
    return {
        "teacher_features_filled": total,
        "teacher_features_fill_s": time.perf_counter() - t0,
        "teacher_features_workers": workers,
    }


def _write(store: Store, job: Job, compute) -> None:
    """``compute(write)`` produces the job's rows; one entry takes them as they come (memory-mapped), several
    (views) are written from memory once all rows are there."""
    if len(job.keys) == 1:

        def build(tmp):
            arrays = Arrays(tmp, job.n)
            compute(arrays.write)
            arrays.close()

        store.get_or_build("features", job.keys[0], build)
        return
    rows: list = []

    def collect(start: int, parts: list[np.ndarray]) -> None:
        if not rows:
            rows.extend(np.empty((job.n, *p.shape[1:]), np.float16) for p in parts)
        for r, p in zip(rows, parts, strict=True):
            r[start : start + len(p)] = p

    compute(collect)
    per = job.n // len(job.keys)
    for j, key in enumerate(job.keys):

        def build(tmp, j=j):
            np.save(tmp / "masks.npy", job.masks[j])
            arrays = Arrays(tmp, per)
            arrays.write(0, [r[j * per : (j + 1) * per] for r in rows])
            arrays.close()

        store.get_or_build("features", key, build)


def _distribute(pool_of: list, job: Job, write, advance) -> None:
    """Chunks of CHUNK images handed to whichever worker is free, two queued per worker (no idle gap)."""
    import ray

    chunks = [(a, min(a + CHUNK, job.n)) for a in range(0, job.n, CHUNK)]
    pending, free = {}, list(pool_of) * 2
    variant = job.variant.model_dump(mode="json")
    while chunks or pending:
        while chunks and free:
            w, (a, b) = free.pop(0), chunks.pop(0)
            pending[w.run.remote(variant, job.frozen, job.images, a, b)] = (w, a, b)
        done, _ = ray.wait(list(pending), num_returns=1)
        w, a, b = pending.pop(done[0])
        write(a, ray.get(done[0]))
        free.append(w)
        advance(b - a)


def _on_driver(job: Job, num_classes: int, console: Console):
    import os

    import ray
    import torch

    from tskd_tune.features import Filler

    def compute(write):
        images = ray.get(job.images) if isinstance(job.images, ray.ObjectRef) else job.images
        images = images[0].images if isinstance(images, tuple) else images  # the search's (prepared, splits)
        model = _base(job.variant, num_classes, job.frozen)
        with _progress(console) as bar:
            task = bar.add_task(f"teacher features of {job.what} ({job.frozen} frozen blocks)", total=job.n)
            Filler(
                model,
                torch.device("cpu"),
                os.cpu_count() or 1,
                Store(job.variant.cache.dir),
                feature_key(job.variant, model, {}),
            ).run(images, write, lambda d, n: bar.update(task, completed=d))

    return compute


def _seconds_per_image(cfg: Config, num_classes: int, frozen: int, prepared: Prepared) -> float:
    """One image through the prefix on the driver (after a warm-up image): what the fill will cost."""
    import torch

    model = _base(cfg, num_classes, frozen)
    x = torch.from_numpy(np.asarray(prepared.images[:1], np.float32))
    with torch.inference_mode():
        model.prefix(x)
        t0 = time.perf_counter()
        model.prefix(x)
    return time.perf_counter() - t0


def _base(cfg: Config, num_classes: int, frozen: int | None):
    return build_teacher(
        cfg.teacher,
        in_chans=cfg.data.channels,
        num_classes=num_classes,
        image_size=cfg.data.image_size,
        seed=cfg.seed,
        frozen=frozen,
    )


class FeatureWorker:
    """A Ray actor: one teacher prefix per frozen depth, one thread, chunk after chunk of images."""

    def __init__(self, num_classes: int, expected: int):
        self.num_classes, self.expected = num_classes, expected
        self.fillers: dict = {}

    def run(self, variant: dict, frozen: int, images, start: int, end: int) -> list[np.ndarray]:
        import torch

        from tskd_tune.config import validate
        from tskd_tune.features import Filler

        if frozen not in self.fillers:
            cfg = validate(variant, check_search_space=False)
            model = _base(cfg, self.num_classes, frozen)
            onnx_key = feature_key(cfg, model, {})
            self.fillers[frozen] = Filler(
                model, torch.device("cpu"), 1, Store(cfg.cache.dir), onnx_key, expected=self.expected
            )
        out: list = []

        def write(at: int, parts: list[np.ndarray]) -> None:
            if not out:
                out.extend(np.empty((end - start, *p.shape[1:]), np.float16) for p in parts)
            for o, p in zip(out, parts, strict=True):
                o[at : at + len(p)] = p

        images = images[0].images if isinstance(images, tuple) else images  # the search's (prepared, splits)
        self.fillers[frozen].run(images[start:end], write)
        return out


def _progress(console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


__all__ = ["KIND", "fill_features", "needed_variants"]
