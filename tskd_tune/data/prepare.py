"""Preprocessing (decode, resize, normalise) into a cached, memory-mapped array pair, and the splits.

The cache key hashes the data config fields that change pixels (adapter and its options, root,
size, channels, resize mode) and a fingerprint of the source files (path, size, mtime), so an edit to
the dataset rebuilds the entry. The split and labelled subset are not in the key: they are cheap
index computations over the cached arrays.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tskd_tune.cache import Hit, Store, digest
from tskd_tune.config.schema import Config, DataConfig
from tskd_tune.data.adapters import adapter_options, class_names, get_adapter
from tskd_tune.data.registry import Record
from tskd_tune.errors import DataError


@dataclass
class Prepared:
    """A preprocessed dataset: images (N, C, S, S) float16 in [0, 1], masks (N, S, S) uint8, memory-mapped."""

    images: np.ndarray
    masks: np.ndarray
    ids: list[str]
    groups: list[str]
    classes: list[str]
    path: Path
    cached: bool

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Splits:
    """Indices into a Prepared dataset. ``labeled`` for N is a prefix of ``labeled`` for N' > N."""

    labeled: np.ndarray
    unlabeled: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("labeled", "unlabeled", "val", "test")}


def _fingerprint(records: list[Record], root: Path | None) -> str:
    rows = []
    for rec in records:
        for src in rec.sources:
            try:
                st = src.stat()
            except FileNotFoundError:
                raise DataError(f"{src}: file not found") from None
            rel = src.relative_to(root) if root and src.is_relative_to(root) else src
            rows.append((str(rel), st.st_size, st.st_mtime_ns))
    return digest(rows)


def cache_key(data: DataConfig, records: list[Record]) -> dict:
    """Exactly the inputs that determine the preprocessed arrays."""
    adapter = get_adapter(data.dataset)
    root = data.root.resolve() if data.root is not None else None
    return {
        "adapter": adapter.name,
        "adapter_version": adapter.version,
        "options": adapter_options(data).model_dump(mode="json"),
        "root": str(root) if root else None,
        "image_size": data.image_size,
        "channels": data.channels,
        "resize": data.resize,
        "num_classes": len(class_names(data)),
        "sources": _fingerprint(records, root),
        "n": len(records),
    }


def scan(data: DataConfig) -> list[Record]:
    """The adapter's records for ``data``; an empty dataset is an error that names the layout."""
    adapter = get_adapter(data.dataset)
    records = adapter.scan(data.root, adapter_options(data))
    if not records:
        where = data.root or f"data.dataset {data.dataset}"
        raise DataError(f"{where}: no images found; {adapter.name} expects {adapter.layout}")
    return records


def prepare(data: DataConfig, store: Store) -> Prepared:
    """Preprocess every record of ``data`` once (cached) and return memory-mapped arrays."""
    records = scan(data)
    classes = class_names(data)
    hit: Hit = store.get_or_build(
        "data", cache_key(data, records), lambda tmp: _build(data, records, classes, tmp)
    )
    meta = json.loads((hit.path / "meta.json").read_text())
    return Prepared(
        images=np.load(hit.path / "images.npy", mmap_mode="r"),
        masks=np.load(hit.path / "masks.npy", mmap_mode="r"),
        ids=meta["ids"],
        groups=meta["groups"],
        classes=classes,
        path=hit.path,
        cached=hit.cached,
    )


def _build(data: DataConfig, records: list[Record], classes: list[str], out: Path) -> None:
    s, c = data.image_size, data.channels
    images = np.lib.format.open_memmap(
        out / "images.npy", mode="w+", dtype=np.float16, shape=(len(records), c, s, s)
    )
    masks = np.lib.format.open_memmap(
        out / "masks.npy", mode="w+", dtype=np.uint8, shape=(len(records), s, s)
    )
    for i, rec in enumerate(_progress(records, f"preprocessing {data.dataset}")):
        image, mask = rec.read()
        where = rec.sources[-1] if rec.sources else rec.id
        images[i], masks[i] = preprocess_pair(image, mask, data, len(classes), where, classes)
    images.flush()
    masks.flush()
    del images, masks
    meta = {"ids": [r.id for r in records], "groups": [r.group for r in records], "classes": classes}
    (out / "meta.json").write_text(json.dumps(meta))


def preprocess_pair(
    image: np.ndarray, mask: np.ndarray, data: DataConfig, num_classes: int, where, classes: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Check one image/mask pair, convert channels, resize; returns ((C, S, S) image, (S, S) mask)."""
    if image.shape[:2] != mask.shape[:2] or mask.ndim != 2:
        raise DataError(f"{where}: mask size {mask.shape} does not match image size {image.shape[:2]}")
    bad = np.unique(mask[(mask < 0) | (mask >= num_classes)])
    if bad.size:
        raise DataError(
            f"{where}: mask values {bad[:5].tolist()} outside the class map (0..{num_classes - 1}: {', '.join(classes)})"
        )
    if data.resize == "pad":
        mask = pad_square(mask)
    size = (data.image_size, data.image_size)
    mask_r = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST))
    return preprocess_image(image, data), mask_r


def preprocess_image(image: np.ndarray, data: DataConfig) -> np.ndarray:
    """An HxW or HxWx3 image in [0, 1] -> (C, S, S) float32: channel conversion, pad to square, resize."""
    image = image.astype(np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if data.channels == 1 and image.shape[2] == 3:
        image = image @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
    elif data.channels == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if data.resize == "pad":
        image = pad_square(image)
    size = (data.image_size, data.image_size)
    chans = [
        np.asarray(Image.fromarray(image[..., k], mode="F").resize(size, Image.BILINEAR))
        for k in range(image.shape[2])
    ]
    return np.clip(np.stack(chans), 0, 1)


def pad_square(a: np.ndarray) -> np.ndarray:
    """Zero-pad an image or mask to a square, centred (the `pad` resize mode)."""
    h, w = a.shape[:2]
    n = max(h, w)
    top, left = (n - h) // 2, (n - w) // 2
    pad = [(top, n - h - top), (left, n - w - left)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad)


def make_splits(prepared: Prepared, data: DataConfig) -> Splits:
    """Split by group (patient/volume) with ``data.seed``; take ``data.labeled`` training images."""
    groups = np.array(prepared.groups)
    unique = np.unique(groups)
    if len(unique) < 3:
        raise DataError(
            f"data: {data.dataset} has {len(unique)} patient/volume group(s); a train/val/test split needs at least 3"
        )
    rng = np.random.default_rng(data.seed)
    order = rng.permutation(unique)
    n = len(groups)
    sizes = {g: int(c) for g, c in zip(*np.unique(groups, return_counts=True), strict=True)}
    test_g, val_g, taken = [], [], 0
    for g in order:  # whole groups go to test, then val, until each holds its fraction of images
        if taken < data.test_fraction * n or not test_g:
            test_g.append(g)
        elif taken < (data.test_fraction + data.val_fraction) * n or not val_g:
            val_g.append(g)
        else:
            break
        taken += sizes[g]
    train_g = [g for g in order if g not in set(test_g) | set(val_g)]
    if not train_g:
        raise DataError(f"data: val_fraction + test_fraction leave no training images in {data.dataset}")
    idx = np.arange(n)
    train = idx[np.isin(groups, train_g)]
    train = train[rng.permutation(len(train))]
    if data.labeled > len(train):
        raise DataError(
            f"data.labeled: must be <= {len(train)} (training images of {data.dataset}), got {data.labeled}"
        )
    unlabeled = train[data.labeled :]
    if data.unlabeled is not None:
        unlabeled = unlabeled[: data.unlabeled]
    return Splits(
        labeled=train[: data.labeled],
        unlabeled=unlabeled,
        val=np.sort(idx[np.isin(groups, val_g)]),
        test=np.sort(idx[np.isin(groups, test_g)]),
    )


def take_rows(array: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Rows at ``indices`` (any order, repeats allowed) as float32; memory maps are read in sorted order."""
    order = np.argsort(indices, kind="stable")
    rows = np.asarray(array[indices[order]], dtype=np.float32)
    out = np.empty_like(rows)
    out[order] = rows
    return out


def load(cfg: Config) -> tuple[Prepared, Splits]:
    """Preprocess (or load from cache, unless ``cache.enabled`` is false) ``cfg.data`` and split it."""
    prepared = prepare(cfg.data, Store(cfg.cache.dir, enabled=cfg.cache.enabled))
    return prepared, make_splits(prepared, cfg.data)


def _progress(items, description: str):
    """A progress bar on an interactive terminal; silent in logs and tests."""
    if not sys.stderr.isatty() or len(items) < 50:
        return items
    from rich.progress import track

    return track(items, description=description, console=None, transient=True)
