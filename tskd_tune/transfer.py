"""The transfer set (the images the student is distilled on) and the teacher's cached outputs on it.

The real part of the transfer set is every training image: the N labelled ones first, then the
unlabelled pool (``data.unlabeled`` caps it). Teacher outputs on it (logits for TS-KD, encoder
features for TA-KD) are computed once per teacher and cached under a key that hashes exactly what
determines them, so trials that differ only in student-side knobs never run the teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tskd_tune.cache import Hit, Store, digest
from tskd_tune.config import Config
from tskd_tune.data.prepare import Prepared, Splits, take_rows
from tskd_tune.models.teacher import checkpoint_fingerprint


@dataclass(frozen=True)
class TransferSet:
    """Indices of the real transfer images in the prepared dataset (synthetic images join later)."""

    real: np.ndarray

    def __len__(self) -> int:
        return len(self.real)

    @property
    def counts(self) -> dict[str, int]:
        return {"transfer_real": len(self.real), "transfer_synthetic": 0}


def build_transfer_set(splits: Splits) -> TransferSet:
    """Labelled images first, then the unlabelled pool: every training image, nothing from val/test."""
    return TransferSet(real=np.concatenate([splits.labeled, splits.unlabeled]).astype(np.int64))


def data_key(prepared: Prepared, splits: Splits, indices: np.ndarray | None = None) -> dict:
    """The preprocessed data (its cache entry) and which images of it are meant."""
    return {"data": prepared.path.name, "labeled": digest(splits.labeled.tolist()),
            "indices": digest(indices.tolist()) if indices is not None else None}  # fmt: skip


def teacher_key(cfg: Config, prepared: Prepared, splits: Splits) -> dict:
    """Everything that determines the fine-tuned teacher: data, labelled subset, model, LoRA, optimisation, seed."""
    t = cfg.teacher
    return {
        "kind": "teacher",
        **data_key(prepared, splits),
        "classes": len(prepared.classes),
        "augment": cfg.data.augment.model_dump(),
        "teacher": t.model_dump(mode="json", exclude={"checkpoint"}),
        "checkpoint": checkpoint_fingerprint(t),
        "seed": cfg.seed,
    }


def frozen_teacher_key(cfg: Config, prepared: Prepared) -> dict:
    """What determines the pretrained (not fine-tuned) teacher's features: model, weights, input data."""
    t = cfg.teacher
    return {
        "kind": "frozen_teacher",
        "data": prepared.path.name,
        "model": t.model,
        "model_kwargs": t.model_kwargs,
        "checkpoint": checkpoint_fingerprint(t),
        "seed": cfg.seed,
    }


def cached_outputs(
    store: Store,
    kind: str,
    key: dict,
    transfer: TransferSet,
    prepared: Prepared,
    fn: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    batch_size: int = 16,
) -> tuple[np.ndarray, bool]:
    """``fn`` applied to every transfer image, stored as float16 (N, ...) and memory-mapped; cached by key."""
    full_key = key | {"transfer": digest(transfer.real.tolist()), "outputs": kind}

    def build(tmp: Path) -> None:
        out = None
        with torch.inference_mode():
            for start in range(0, len(transfer), batch_size):
                idx = transfer.real[start : start + batch_size]
                x = torch.from_numpy(take_rows(prepared.images, idx))
                y = fn(x.to(device)).float().cpu().numpy().astype(np.float16)
                if out is None:
                    out = np.lib.format.open_memmap(
                        tmp / "outputs.npy", mode="w+", dtype=np.float16, shape=(len(transfer), *y.shape[1:])
                    )
                out[start : start + len(idx)] = y
        out.flush()

    hit: Hit = store.get_or_build(kind, full_key, build)
    return np.load(hit.path / "outputs.npy", mmap_mode="r"), hit.cached
