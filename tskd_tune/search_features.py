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

import numpy as np

from tskd_tune.cache import Store, digest, verify
from tskd_tune.config import Config, apply_values
from tskd_tune.data.prepare import Prepared
from tskd_tune.features import KIND, Arrays, data_source, feature_key, pool_source
from tskd_tune.models.teacher import ALL_FROZEN, build_teacher

CHUNK = 4
"""Images per task: small enough for an even spread and a live progress bar."""
ON_DRIVER_S = 20.0
"""Below this estimated fill time the driver computes the features itself (workers take seconds to start)."""


def needed_variants(cfg: Config) -> list[tuple[str, int | None]]:
    """The teacher variants, (adapt, lora.last_blocks), whose features the search's trials can read: from
    the methods (and reference trials), adaptation modes and ``last_blocks`` values the space can propose."""
    space = cfg.search.space
    methods = set(space["distill.method"].boundary_values()) if "distill.method" in space else {cfg.distill.method}
    methods |= set(cfg.search.baselines)
    out: list[int | None] = []
    if methods & {"ts_kd", "teacher"}:
        adapts = space["teacher.adapt"].boundary_values() if "teacher.adapt" in space else [cfg.teacher.adapt]
        blocks = (_all_values(space["teacher.lora.last_blocks"]) if "teacher.lora.last_blocks" in space
                  else [cfg.teacher.lora.last_blocks])  # fmt: skip
        for adapt in adapts:
            for k in blocks if adapt == "lora" else [None]:
                out.append((adapt, k))
    if "ta_kd" in methods:
        out.append(("head", None))
    return sorted(set(out), key=str)


def _all_values(dist) -> list:
    values = dist.boundary_values()
    if all(isinstance(v, int) for v in values) and len(values) == 2:
        return list(range(min(values), max(values) + 1))
    return values


def fill(cfg: Config, prepared: Prepared, data_ref, pool, console, workers: int | None = None) -> dict:
    """Compute every missing feature entry the search needs on Ray actors; returns timings and counts."""
    import ray

    store = Store(cfg.cache.dir)
    jobs = []
    for adapt, k in needed_variants(cfg):
        variant = apply_values(cfg, {"teacher.adapt": adapt, "teacher.lora.last_blocks": k})
        model = _base(variant, len(prepared.classes), ALL_FROZEN if adapt == "head" else None)
        if model.frozen == 0:
            continue  # LoRA in every block: nothing frozen to cache
        sources = [(data_source(prepared), data_ref, len(prepared), "teacher features")]
        if pool is not None and len(pool):
            sources.append((pool_source(pool.key), ray.put(np.ascontiguousarray(pool.images)), len(pool),
                            "teacher features (synthetic)"))  # fmt: skip
        for source, ref, n, what in sources:
            key = feature_key(variant, model, source)
            if not verify(store.path("features", digest(key))):
                jobs.append((variant, model.frozen, key, ref, n, what))
    if not jobs:
        return {"teacher_features_filled": 0}
    total = sum(n for *_, n, _ in jobs)
    t0 = time.perf_counter()
    if _seconds_per_image(jobs[0][0], len(prepared.classes), jobs[0][1], prepared) * total < ON_DRIVER_S:
        # a small encoder: starting workers would cost more than the work; the driver does it on every core
        for variant, frozen, key, _, _, what in jobs:
            model = _base(variant, len(prepared.classes), frozen)
            images = prepared.images if "data" in key else pool.images
            encoder_features_entry(variant, model, store, key, images, console, what)
        return {"teacher_features_filled": total, "teacher_features_fill_s": time.perf_counter() - t0,
                "teacher_features_workers": 0}  # fmt: skip
    cpus = int(ray.available_resources().get("CPU", 1))
    workers = max(1, min(workers or cpus, -(-total // CHUNK)))
    actor = ray.remote(num_cpus=1)(FeatureWorker)
    pool_of = [actor.remote(cfg.model_dump(mode="json"), len(prepared.classes), total // workers + 1)
               for _ in range(workers)]  # fmt: skip
    try:
        with _progress(console) as bar:
            for variant, frozen, key, ref, n, what in jobs:
                task = bar.add_task(f"{what} (frozen {frozen} blocks) on {workers} worker(s)", total=n)

                def build(tmp, frozen=frozen, ref=ref, n=n, task=task, variant=variant):
                    arrays = Arrays(tmp, n)
                    chunks = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
                    pending = {}
                    free = list(pool_of) * 2  # two chunks queued per worker: no idle gap between chunks
                    while chunks or pending:
                        while chunks and free:
                            w = free.pop(0)
                            a, b = chunks.pop(0)
                            pending[w.run.remote(variant.model_dump(mode="json"), frozen, ref, a, b)] = (w, a, b)
                        done, _ = ray.wait(list(pending), num_returns=1)
                        w, a, b = pending.pop(done[0])
                        arrays.write(a, ray.get(done[0]))
                        free.append(w)
                        bar.update(task, advance=b - a)
                    arrays.close()

                store.get_or_build("features", key, build)
    finally:
        for a in pool_of:
            ray.kill(a)
    return {"teacher_features_filled": total, "teacher_features_fill_s": time.perf_counter() - t0,
            "teacher_features_workers": workers}  # fmt: skip


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


def encoder_features_entry(cfg: Config, model, store: Store, key: dict, images, console, what: str) -> None:
    """Fill one entry on this process, every core, with a progress bar."""
    import os

    import torch

    from tskd_tune.features import Filler

    def build(tmp):
        arrays = Arrays(tmp, len(images))
        with _progress(console) as bar:
            task = bar.add_task(f"{what} (frozen {model.frozen} blocks) on the driver", total=len(images))
            Filler(model, torch.device("cpu"), os.cpu_count() or 1, store, feature_key(cfg, model, {})).run(
                images, arrays.write, lambda done, n: bar.update(task, completed=done))
        arrays.close()

    store.get_or_build("features", key, build)


def _base(cfg: Config, num_classes: int, frozen: int | None):
    return build_teacher(cfg.teacher, in_chans=cfg.data.channels, num_classes=num_classes,
                         image_size=cfg.data.image_size, seed=cfg.seed, frozen=frozen)  # fmt: skip


class FeatureWorker:
    """A Ray actor: one teacher prefix per frozen depth, one thread, chunk after chunk of images."""

    def __init__(self, base: dict, num_classes: int, expected: int):
        from tskd_tune.config import validate

        self.cfg, self.num_classes, self.expected = validate(base, check_search_space=False), num_classes, expected
        self.fillers: dict = {}

    def run(self, variant: dict, frozen: int, images, start: int, end: int) -> list[np.ndarray]:
        import torch

        from tskd_tune.config import validate
        from tskd_tune.features import Filler

        if frozen not in self.fillers:
            cfg = validate(variant, check_search_space=False)
            model = _base(cfg, self.num_classes, frozen)
            onnx_key = feature_key(cfg, model, {})
            self.fillers[frozen] = Filler(model, torch.device("cpu"), 1, Store(cfg.cache.dir), onnx_key,
                                          expected=self.expected)  # fmt: skip
        out: list = []

        def write(at: int, parts: list[np.ndarray]) -> None:
            if not out:
                out.extend(np.empty((end - start, *p.shape[1:]), np.float16) for p in parts)
            for o, p in zip(out, parts, strict=True):
                o[at : at + len(p)] = p

        self.fillers[frozen].run(images[start:end] if not isinstance(images, dict) else images["images"][start:end],
                                 write)  # fmt: skip
        return out


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=False)  # fmt: skip


__all__ = ["KIND", "fill", "needed_variants"]
