"""The encoder-feature cache: the frozen part of the teacher's encoder runs once per image, ever.

The teacher's encoder never changes (only its head, and LoRA in its last blocks, train), so its frozen
prefix (:meth:`Segmenter.prefix`) is a pure function of the image. Its output, the *state*, is computed
once for every preprocessed image (labelled, unlabelled, val and test alike) and once for every image of
a synthetic pool, stored as float16 ``.npy`` files in the trial cache (memory-mapped, atomic, locked and
checksummed like every entry), and keyed by exactly what determines it: the encoder's weights identity,
the frozen depth, the feature taps, and the preprocessed data (or the pool). The split, the seed, N and
every teacher knob (head, LoRA rank, lr, ...) are not in the key: every seed and N of a benchmark and
every teacher config of a search share one entry. Teacher fine-tuning, teacher outputs on the transfer
set and teacher evaluation then run only the trainable part (:meth:`Segmenter.from_state`).

Filling is fast: the backend (PyTorch, or ONNX Runtime on the CPU) and the batch size are chosen by
timing the first images, whose outputs are kept. In a search, the images are spread over the cluster's
workers before the trials start (``search.fill_features``), using :class:`Filler` on each.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tskd_tune.cache import Store, digest
from tskd_tune.config.schema import Config
from tskd_tune.data.lateral import flip_plan
from tskd_tune.data.prepare import Prepared, take_rows
from tskd_tune.heartbeat import beat
from tskd_tune.models.teacher import weights_identity
from tskd_tune.models.vit import Segmenter

ONNX_WORTH_S = 30.0
"""Try ONNX Runtime (an export of some seconds, cached) only when PyTorch would need longer than this."""
KIND = "encoder_features"


def feature_key(cfg: Config, model: Segmenter, source: dict) -> dict:
    """What determines the cached states: weights, frozen depth, taps, the images (``source``) and precision."""
    return {
        "kind": KIND,
        "weights": weights_identity(cfg.teacher, cfg.seed),
        "frozen": model.frozen,
        "taps": sorted(model.encoder._taps),
        **source,
    } | ({"mixed_precision": True} if cfg.resources.mixed_precision else {})


def data_source(prepared: Prepared) -> dict:
    return {"data": prepared.path.name}


def pool_source(pool_key: str) -> dict:
    return {"pool": pool_key}


# ------------------------------------------------------------------------------------------- filling
class _Prefix(nn.Module):
    """The frozen prefix as a module with tuple outputs (what ONNX export wants)."""

    def __init__(self, model: Segmenter):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.prefix(x))


@dataclass
class Filler:
    """Runs a teacher's frozen prefix over images, choosing the backend and batch size by measurement.

    The first images are the measurement: PyTorch at batch 1 (one warm-up image, one timed), then, on
    the CPU when the rest would take over ``ONNX_WORTH_S``, ONNX Runtime at batch 1 (the export is cached
    under ``onnx_key``), else PyTorch at batch 4; the fastest per image runs the rest. Nothing measured is
    thrown away.
    """

    model: Segmenter
    device: torch.device
    threads: int = 1
    store: Store | None = None
    onnx_key: dict | None = None
    amp: bool = False
    expected: int | None = None
    """Images this filler will see over all its calls (a worker sees chunks): what ONNX export is weighed against."""
    plan: dict = field(default_factory=dict)
    _ort: object | None = None

    def _torch(self, x: torch.Tensor) -> list[np.ndarray]:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            return [s.float().cpu().numpy() for s in self.model.prefix(x.to(self.device))]

    def _onnx(self, x: torch.Tensor) -> list[np.ndarray]:
        return [
            np.concatenate(parts)
            for parts in zip(
                *(self._ort.run(None, {"image": x[i : i + 1].numpy()}) for i in range(len(x))), strict=True
            )
        ]

    def _load_onnx(self, example: torch.Tensor) -> bool:
        """The cached ONNX export of the prefix in an ONNX Runtime session; False where it cannot be had."""
        try:
            import onnxruntime as ort
        except ImportError:
            return False

        def export(tmp: Path) -> None:
            # the exporter and onnxscript's optimiser narrate every pass (prints and INFO logs): not for users
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
                _quiet(),
            ):
                torch.onnx.export(
                    _Prefix(self.model).eval(),
                    (example[:1],),
                    str(tmp / "prefix.onnx"),
                    input_names=["image"],
                    dynamo=True,
                    verbose=False,
                )

        try:
            key = (self.onnx_key or {}) | {"kind": "encoder_onnx", "input": list(example.shape[1:])}
            hit = (self.store or Store(Path("."), enabled=False)).get_or_build("onnx", key, export)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = self.threads, 1
            self._ort = ort.InferenceSession(
                str(hit.path / "prefix.onnx"), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # noqa: BLE001 - an encoder the exporter cannot handle runs in PyTorch
            self.plan["onnx_error"] = (
                f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            )
            return False
        return True

    def run(
        self,
        images: Sequence,
        write: Callable[[int, list[np.ndarray]], None],
        progress: Callable[[int, int], None] | None = None,
    ) -> dict:
        """Compute the state of every image (N, C, S, S; float16 arrays are fine) and hand each batch to
        ``write(start, arrays)``; returns the plan (backend, batch size, seconds per image)."""
        n, done = len(images), 0
        # a copy: images from Ray's object store are read-only, which torch warns about
        read = lambda a, b: torch.from_numpy(np.array(images[a:b], dtype=np.float32))  # noqa: E731

        def timed(fn, count: int) -> float:
            nonlocal done
            count = min(count, n - done)
            t0 = time.perf_counter()
            write(done, fn(read(done, done + count)))
            done += count
            if progress:
                progress(done, n)
            beat()
            return (time.perf_counter() - t0) / count

        with _threads(self.threads):
            self.model.train(False)
            cuda = self.device.type == "cuda"
            candidates: dict[tuple[str, int], float] = {}
            if "backend" in self.plan:  # chosen on an earlier call (a worker filling chunk after chunk)
                candidates[self.plan["backend"], self.plan["batch_size"]] = self.plan["s_per_image"]
            elif n:
                timed(self._torch, 8 if cuda else 1)  # warm-up (allocations, kernels); kept
            if done < n and not candidates:
                candidates["torch", 8 if cuda else 1] = timed(self._torch, 8 if cuda else 1)
                per_image = min(candidates.values())
                if (
                    done < n
                    and not cuda
                    and per_image * (self.expected or n - done) > ONNX_WORTH_S
                    and self._load_onnx(read(0, 1))
                ):
                    candidates["onnxruntime", 1] = timed(self._onnx, 1)
                big = 32 if cuda else 4
                if n - done >= big:  # a batch is only measured whole
                    candidates["torch", big] = timed(self._torch, big)
            backend, batch = min(candidates, key=candidates.get) if candidates else ("torch", 1)
            fn = self._onnx if backend == "onnxruntime" else self._torch
            t0, start = time.perf_counter(), done
            while done < n:
                timed(fn, batch)
            rest = (time.perf_counter() - t0) / max(1, done - start)
        if "backend" not in self.plan:
            self.plan |= {
                "backend": backend,
                "batch_size": batch,
                "threads": self.threads,
                "s_per_image": rest if done > start else candidates.get((backend, batch), 0.0),
                "measured": {f"{b}/{s}": round(v, 4) for (b, s), v in candidates.items()},
            }
        return self.plan


@contextlib.contextmanager
def _quiet():
    import logging

    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "onnx_ir", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Arrays:
    """The state arrays of one cache entry being written: created at the first batch (shapes known then)."""

    def __init__(self, folder: Path, n: int):
        self.folder, self.n, self.arrays = folder, n, []

    def write(self, start: int, parts: list[np.ndarray]) -> None:
        if not self.arrays:
            self.arrays = [
                np.lib.format.open_memmap(
                    self.folder / f"state_{i}.npy", mode="w+", dtype=np.float16, shape=(self.n, *p.shape[1:])
                )
                for i, p in enumerate(parts)
            ]
        for array, part in zip(self.arrays, parts, strict=True):
            array[start : start + len(part)] = part

    def close(self) -> None:
        for array in self.arrays:
            array.flush()
        self.arrays = []


def load_states(folder: Path) -> list[np.ndarray]:
    """The memory-mapped state arrays of a filled entry, in order."""
    paths = sorted(folder.glob("state_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
    return [np.load(p, mmap_mode="r") for p in paths]


# -------------------------------------------------------------------------------------------- reading
@dataclass
class Features:
    """Cached prefix states of the prepared images (``data``) and of the synthetic pool (``pool``)."""

    data: list[np.ndarray]
    pool: list[np.ndarray] | None = None
    cached: bool = True
    seconds: float = 0.0
    plan: dict = field(default_factory=dict)

    def rows(self, indices: np.ndarray) -> list[torch.Tensor]:
        """States of prepared images ``indices`` (any order, repeats allowed) as float32 tensors."""
        return [torch.from_numpy(take_rows(a, np.asarray(indices, np.int64))) for a in self.data]

    def transfer_rows(
        self, real: np.ndarray, synthetic: np.ndarray, positions: np.ndarray
    ) -> list[torch.Tensor]:
        """States of transfer-set ``positions``: the first ``len(real)`` are prepared images, the rest pool images."""
        positions = np.asarray(positions, np.int64)
        is_real = positions < len(real)
        if is_real.all():
            return self.rows(real[positions])
        out = []
        for i, array in enumerate(self.data):
            rows = np.empty((len(positions), *array.shape[1:]), np.float32)
            rows[is_real] = take_rows(array, real[positions[is_real]])
            rows[~is_real] = take_rows(self.pool[i], synthetic[positions[~is_real] - len(real)])
            out.append(torch.from_numpy(rows))
        return out


class StateRows:
    """A sliceable view of states for ``metrics.evaluate``: ``view[a:b]`` is the list of state tensors."""

    def __init__(self, features: Features, indices: np.ndarray):
        self.features, self.indices = features, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, s: slice) -> list[torch.Tensor]:
        return self.features.rows(self.indices[s])


class FromState(nn.Module):
    """A teacher seen through its trainable part: ``forward(state)`` gives logits (for evaluation)."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, state: list[torch.Tensor]) -> torch.Tensor:
        return self.teacher.from_state(state)


@dataclass
class Views:
    """Cached states and masks of augmented views, ``views`` per image; row ``f`` is view ``f % views`` of
    image ``f // views`` (memory-mapped per image, gathered per batch)."""

    states: list[list[np.ndarray]]
    masks: list[np.ndarray]
    views: int
    cached: bool = True

    def __len__(self) -> int:
        return len(self.masks) * self.views

    def rows(self, flat: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(states, masks) of rows ``flat`` as float32 / int64 tensors."""
        pairs = [(int(f) // self.views, int(f) % self.views) for f in flat]
        states = [
            torch.from_numpy(np.stack([np.asarray(self.states[i][k][v], np.float32) for i, v in pairs]))
            for k in range(len(self.states[0]))
        ]
        return states, torch.from_numpy(np.stack([self.masks[i][v] for i, v in pairs]).astype(np.int64))


def views_source(cfg: Config, prepared: Prepared, i: int) -> dict:
    """What names the augmented views of prepared image ``i`` in their cache key."""
    # the flips in effect (off, or swapping left and right) decide the views as much as data.augment does
    return {
        "data": prepared.path.name,
        "image": prepared.ids[i],
        "views": cfg.teacher.augment_views,
        **flip_plan(cfg.data, prepared.classes).cache_key(),
    }


def view_inputs(cfg: Config, prepared: Prepared, i: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``teacher.augment_views`` augmented copies of prepared image ``i`` (float32 images, uint8 masks),
    drawn with a seed of the image itself: the same wherever and whenever they are made."""
    from tskd_tune.data.transforms import train_transforms

    flips = flip_plan(cfg.data, prepared.classes)
    tf = train_transforms(
        flips.augment, seed=int(digest([prepared.ids[i], "views"])[:8], 16), label_swap=flips.label_swap
    )
    pairs = [
        tf(
            {
                "image": torch.from_numpy(np.asarray(prepared.images[i], np.float32)),
                "label": torch.from_numpy(np.asarray(prepared.masks[i], np.float32))[None],
            }
        )
        for _ in range(cfg.teacher.augment_views)
    ]
    return (
        np.stack([np.asarray(p["image"], np.float32) for p in pairs]),
        np.stack([np.asarray(p["label"])[0].round().astype(np.uint8) for p in pairs]),
    )


def augmented_views(
    cfg: Config,
    model: Segmenter,
    prepared: Prepared,
    indices: np.ndarray,
    store: Store,
    device: torch.device,
    *,
    threads: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
) -> Views:
    """States and masks of ``teacher.augment_views`` augmented copies (``data.augment``) of each image in
    ``indices`` (the labelled ones), computed where missing.

    Each image's views are one cache entry, drawn with a seed of the image itself (not the trial's seed or
    N), so the views of the N=10 images are reused at N=20 and by every seed that labels the same image.
    """
    views = cfg.teacher.augment_views
    amp = cfg.resources.mixed_precision and device.type == "cuda"
    filler = Filler(
        model, device, threads, store, feature_key(cfg, model, {}), amp, expected=views * len(indices)
    )
    out = Views([], [], views)
    for j, i in enumerate(np.asarray(indices, np.int64).tolist()):

        def build(tmp: Path, i=i) -> None:
            images, masks = view_inputs(cfg, prepared, i)
            np.save(tmp / "masks.npy", masks)
            arrays = Arrays(tmp, views)
            filler.run(images, arrays.write)
            arrays.close()

        source = views_source(cfg, prepared, i)
        hit = store.get_or_build("features", feature_key(cfg, model, source), build)
        out.cached &= hit.cached
        out.states.append(load_states(hit.path))
        out.masks.append(np.load(hit.path / "masks.npy", mmap_mode="r"))
        if progress:
            progress("teacher features (augmented views)", (j + 1) * views, len(indices) * views)
    return out


def encoder_features(
    cfg: Config,
    model: Segmenter,
    prepared: Prepared,
    store: Store,
    device: torch.device,
    *,
    pool: tuple[str, np.ndarray] | None = None,
    threads: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
) -> Features:
    """The cached states of ``model``'s prefix for every prepared image (and every ``pool`` image: its key
    and images), computing what is missing now with a :class:`Filler`."""
    t0 = time.perf_counter()
    plan: dict = {}
    amp = cfg.resources.mixed_precision and device.type == "cuda"
    onnx_key = feature_key(cfg, model, {})
    found = True

    def entry(source: dict, images: np.ndarray, what: str) -> list[np.ndarray]:
        nonlocal found

        def build(tmp: Path) -> None:
            arrays = Arrays(tmp, len(images))
            filler = Filler(model, device, threads, store, onnx_key, amp)
            plan.update(filler.run(images, arrays.write, progress and (lambda d, n: progress(what, d, n))))
            arrays.close()

        hit = store.get_or_build("features", feature_key(cfg, model, source), build)
        found &= hit.cached
        return load_states(hit.path)

    data = entry(data_source(prepared), prepared.images, "teacher features")
    pool_states = entry(pool_source(pool[0]), pool[1], "teacher features (synthetic)") if pool else None
    return Features(data, pool_states, found, time.perf_counter() - t0, plan)
