"""The transfer set (the images the student is distilled on) and the teacher's cached outputs on it.

The real part of the transfer set is every training image: the N labelled ones first, then the
unlabelled pool (``data.unlabeled`` caps it). The synthetic part is ``synthetic.ratio`` synthetic
images per real one, ``min(pool_size, round(ratio * real))`` (rounded half up), drawn from the cached
synthetic pool with ``cfg.seed`` (a larger ratio's draw contains a smaller one's). Teacher outputs on
all of it (logits for TS-KD, encoder features for TA-KD) are computed once per teacher and cached
under a key that hashes exactly what determines them (incl. the pool and the drawn synthetic images),
so trials that differ only in student-side knobs never run the teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tskd_tune.cache import Hit, Store, digest
from tskd_tune.config.schema import Config
from tskd_tune.data.lateral import flip_plan
from tskd_tune.data.prepare import Prepared, Splits, take_rows
from tskd_tune.heartbeat import beat
from tskd_tune.models.teacher import weights_identity

if TYPE_CHECKING:
    from tskd_tune.synth import Pool


@dataclass(frozen=True)
class TransferSet:
    """The transfer images: positions ``0..len(real)-1`` are real (indices into the prepared images),
    the rest synthetic (indices into the synthetic pool's images)."""

    real: np.ndarray
    synthetic: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pool: np.ndarray | None = field(default=None, repr=False)
    pool_key: str | None = None

    def __len__(self) -> int:
        return len(self.real) + len(self.synthetic)

    @property
    def counts(self) -> dict[str, int]:
        return {"transfer_real": len(self.real), "transfer_synthetic": len(self.synthetic)}

    def read(self, images: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """Transfer images at ``positions`` (real ones from ``images``, synthetic ones from the pool) as float32."""
        positions = np.asarray(positions, dtype=np.int64)
        n = len(self.real)
        is_real = positions < n
        if is_real.all():
            return torch.from_numpy(take_rows(images, self.real[positions]))
        out = np.empty((len(positions), *images.shape[1:]), np.float32)
        out[is_real] = take_rows(images, self.real[positions[is_real]])
        out[~is_real] = take_rows(self.pool, self.synthetic[positions[~is_real] - n])
        return torch.from_numpy(out)

    def key(self) -> dict:
        """What names these images in cache keys (unchanged from real-only sets when there is no synthetic part)."""
        key = {"transfer": digest(self.real.tolist())}
        if len(self.synthetic):
            key |= {"pool": self.pool_key, "synthetic": digest(self.synthetic.tolist())}
        return key


def synthetic_count(n_real: int, ratio: float, pool_size: int) -> int:
    """Synthetic images for ``n_real`` real ones: ``min(pool_size, round(ratio * n_real))``, rounded half up."""
    return min(pool_size, math.floor(ratio * n_real + 0.5))


def draw_synthetic(pool_size: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct pool indices drawn with ``seed``, sorted; the draw for n is part of the draw for n' > n."""
    order = np.random.default_rng([seed, 0x5E7]).permutation(pool_size)
    return np.sort(order[:n]).astype(np.int64)


def build_transfer_set(splits: Splits, pool: Pool | None = None, cfg: Config | None = None) -> TransferSet:
    """Labelled images first, then the unlabelled pool: every training image, nothing from val/test; then
    ``synthetic.ratio`` synthetic images per real one from ``pool`` (none without a pool or config)."""
    real = np.concatenate([splits.labeled, splits.unlabeled]).astype(np.int64)
    if pool is None or cfg is None or len(pool) == 0:
        return TransferSet(real=real)
    n = synthetic_count(len(real), cfg.synthetic.ratio, len(pool))
    return TransferSet(real, draw_synthetic(len(pool), n, cfg.seed), pool.images, pool.key)


def data_key(prepared: Prepared, splits: Splits, indices: np.ndarray | None = None) -> dict:
    """The preprocessed data (its cache entry) and which images of it are meant."""
    return {
        "data": prepared.path.name,
        "labeled": digest(splits.labeled.tolist()),
        "indices": digest(indices.tolist()) if indices is not None else None,
    }


def teacher_key(cfg: Config, prepared: Prepared, splits: Splits) -> dict:
    """Everything that determines the fine-tuned teacher: data, labelled subset, weights, adaptation, optimisation, seed."""
    t = cfg.teacher
    return {
        "kind": "teacher",
        **data_key(prepared, splits),
        "classes": len(prepared.classes),
        # the flips in effect (switched off, or swapping left/right classes) change the teacher
        **flip_plan(cfg.data, prepared.classes).cache_key(),
        "teacher": t.model_dump(mode="json", exclude={"checkpoint"}),
        "weights": weights_identity(t, cfg.seed),
        "seed": cfg.seed,
    } | _precision(cfg)


def _precision(cfg: Config) -> dict:
    # bf16 training gives a different teacher; keys of float32 runs stay as they were before the option
    return {"mixed_precision": True} if cfg.resources.mixed_precision else {}


def cached_outputs(
    store: Store,
    kind: str,
    key: dict,
    transfer: TransferSet,
    read: Callable[[np.ndarray], torch.Tensor | list[torch.Tensor]],
    fn: Callable,
    device: torch.device,
    batch_size: int = 16,
    amp: bool = False,
) -> tuple[np.ndarray, bool]:
    """``fn`` applied to every transfer image (real, then synthetic) as ``read(positions)`` gives it (the
    images, or the teacher's cached prefix states), stored as float16 (N, ...) and memory-mapped, row i
    for transfer position i; cached by key. ``amp``: under CUDA bf16 autocast."""
    full_key = key | transfer.key() | {"outputs": kind}

    def build(tmp: Path) -> None:
        out = None
        with torch.inference_mode():
            for start in range(0, len(transfer), batch_size):
                idx = np.arange(start, min(start + batch_size, len(transfer)))
                x = read(idx)
                x = [t.to(device) for t in x] if isinstance(x, list) else x.to(device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    y = fn(x)
                y = y.float().cpu().numpy().astype(np.float16)
                if out is None:
                    out = np.lib.format.open_memmap(
                        tmp / "outputs.npy", mode="w+", dtype=np.float16, shape=(len(transfer), *y.shape[1:])
                    )
                out[start : start + len(idx)] = y
                beat()
        out.flush()

    hit: Hit = store.get_or_build(kind, full_key, build)
    return np.load(hit.path / "outputs.npy", mmap_mode="r"), hit.cached
