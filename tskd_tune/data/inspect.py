"""`tskd-tune data inspect`: counts per split, class pixel frequencies and a preview grid with overlays; the
image | truth | prediction grid a trial writes as ``val_overlays.png`` (:func:`val_overlays`)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tskd_tune.cache import atomic_write
from tskd_tune.data.prepare import Prepared, Splits

if TYPE_CHECKING:
    import torch

# distinct, colour-blind-friendly overlay colours (Okabe-Ito), background transparent
PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 159, 0],
        [86, 180, 233],
        [0, 158, 115],
        [240, 228, 66],
        [0, 114, 178],
        [213, 94, 0],
        [204, 121, 167],
    ],
    dtype=np.float32,
)


def summarize(prepared: Prepared, splits: Splits) -> dict:
    """Image counts, size and per-class pixel frequencies of a prepared dataset."""
    counts = np.zeros(len(prepared.classes), np.int64)
    for start in range(0, len(prepared), 256):  # chunks keep memory flat on large datasets
        counts += np.bincount(np.asarray(prepared.masks[start : start + 256]).ravel(), minlength=len(counts))
    freq = counts / max(counts.sum(), 1)
    split_counts = splits.counts()
    return {
        "images": len(prepared),
        "groups": len(set(prepared.groups)),
        "splits": {"train": split_counts["labeled"] + split_counts["unlabeled"], **split_counts},
        "image_size": list(prepared.images.shape[1:]),
        "class_frequency": {name: round(float(f), 5) for name, f in zip(prepared.classes, freq, strict=True)},
        "cache": str(prepared.path),
        "cached": prepared.cached,
    }


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 picture of a (C, H, W) image with its mask's classes tinted on top."""
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
    rgb = np.moveaxis(rgb.astype(np.float32), 0, -1) * 255
    colours = PALETTE[mask % len(PALETTE)]
    tinted = np.where(mask[..., None] > 0, (1 - alpha) * rgb + alpha * colours, rgb)
    return np.clip(tinted, 0, 255).astype(np.uint8)


TILE_MIN = 128
"""Smallest side of a tile in :func:`comparison_grid`: small images are upscaled (nearest) to at least this."""
GAP, HEADER = 6, 30
COLUMNS = ("image", "ground truth", "prediction")


def tile_box(row: int, col: int, tile: int) -> tuple[int, int, int, int]:
    """Where the tile at ``row``, ``col`` of :func:`comparison_grid` lies: (left, top, right, bottom)."""
    left, top = GAP + col * (tile + GAP), HEADER + row * (tile + GAP)
    return left, top, left + tile, top + tile


def comparison_grid(
    images: np.ndarray, truths: np.ndarray, preds: np.ndarray, classes: list[str]
) -> Image.Image:
    """One row per image: the image, its true mask and a predicted mask tinted on it, under column titles,
    above a legend with each foreground class's colour. Tiles are square, at least ``TILE_MIN`` px."""
    size = images.shape[-1]
    scale = -(-TILE_MIN // size)  # nearest upscaling by a whole factor keeps every mask pixel a crisp block
    tile = size * scale
    font = ImageFont.load_default(size=16)
    # the legend wraps onto as many lines as the grid's width needs
    width = GAP + len(COLUMNS) * (tile + GAP)
    entries, lines, x = [], 0, width
    for k, name in enumerate(classes[1:], start=1):
        w = 22 + int(font.getlength(name)) + 18
        if x + w > width - GAP:
            lines, x = lines + 1, GAP
        entries.append((k, name, x, lines - 1))
        x += w
    grid_bottom = HEADER + len(images) * (tile + GAP)
    canvas = Image.new("RGB", (width, grid_bottom + lines * 24 + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(COLUMNS):
        left, _, right, _ = tile_box(0, col, tile)
        draw.text(((left + right) / 2, HEADER / 2), title, fill="black", font=font, anchor="mm")
    for row, (image, truth, pred) in enumerate(zip(images, truths, preds, strict=True)):
        shown = (np.zeros_like(truth), truth, pred)
        for col, mask in enumerate(shown):
            picture = Image.fromarray(overlay(image, np.asarray(mask))).resize((tile, tile), Image.NEAREST)
            canvas.paste(picture, tile_box(row, col, tile)[:2])
    for k, name, x, line in entries:
        y = grid_bottom + line * 24
        draw.rectangle(
            (x, y + 2, x + 16, y + 18), fill=tuple(int(c) for c in PALETTE[k % len(PALETTE)]), outline="black"
        )
        draw.text((x + 22, y + 10), name, fill="black", font=font, anchor="lm")
    return canvas


def val_overlays(
    model: torch.nn.Module,
    prepared: Prepared,
    splits: Splits,
    out_dir: Path,
    device,
    n: int = 6,
    name: str = "val_overlays.png",
) -> Path:
    """``name`` (a trial's ``val_overlays.png``, the report's ``best_overlays.png``) in ``out_dir``: for ``n``
    validation images spread over the split (those with foreground first, :func:`spread_indices`), a row of
    the image, its true mask and ``model``'s prediction, with the class colours in a legend
    (:func:`comparison_grid`)."""
    import torch

    val = np.sort(splits.val)  # in slice order: spread over the volume
    fg = (np.asarray(prepared.masks[val]) > 0).reshape(len(val), -1).sum(1)
    idx = spread_indices(val, n, foreground=fg)
    images = np.asarray(prepared.images[idx], dtype=np.float32)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        pred = model(torch.from_numpy(images).to(device)).argmax(1).cpu().numpy().astype(np.uint8)
    model.train(was_training)
    buf = io.BytesIO()
    comparison_grid(images, np.asarray(prepared.masks[idx]), pred, prepared.classes).save(buf, format="PNG")
    atomic_write(Path(out_dir) / name, buf.getvalue())
    return Path(out_dir) / name


def preview_grid(prepared: Prepared, indices: np.ndarray, path: Path, columns: int = 8) -> Path:
    """Write a PNG grid: each image next to (below) its overlay; written atomically."""
    indices = list(indices)
    rows = []
    for start in range(0, len(indices), columns):
        chunk = indices[start : start + columns]
        plain = [
            overlay(np.asarray(prepared.images[i], np.float32), np.zeros_like(prepared.masks[i]))
            for i in chunk
        ]
        tinted = [
            overlay(np.asarray(prepared.images[i], np.float32), np.asarray(prepared.masks[i])) for i in chunk
        ]
        pad = [np.zeros_like(plain[0])] * (columns - len(chunk))
        rows += [np.concatenate(plain + pad, axis=1), np.concatenate(tinted + pad, axis=1)]
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 128 // prepared.images.shape[-1])
    picture = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    picture.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def preview_indices(splits: Splits, n: int = 16) -> np.ndarray:
    """A few labelled images first (what the teacher sees), then validation images."""
    take = list(splits.labeled[: n // 2])
    take += list(splits.val[: n - len(take)])
    return np.array(take, dtype=int)


def save_png(array: np.ndarray, path: Path, palette: bool = False) -> None:
    """An image or a class-index mask as a PNG, written to a temporary file and renamed. ``palette``: a mask
    as a palette PNG, whose pixel values stay the class indices (what a program reads) while an image viewer
    shows each class in the overlay's colour (a grey-level mask of classes 0-3 looks black)."""
    tmp = path.with_name(f".{path.name}.tmp")
    image = Image.fromarray(array)
    if palette:
        image = image.convert("P")
        colours = np.resize(PALETTE.astype(np.uint8), (256, 3))  # class k -> PALETTE[k % len(PALETTE)]
        image.putpalette(colours.flatten().tolist())
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def export_slices(prepared: Prepared, splits: Splits, split: str, n: int, out_dir: Path) -> tuple[Path, Path]:
    """``n`` images of ``split``, spread over it, as they reach the models (preprocessed, 8-bit PNG) in
    ``out_dir/images`` and their true masks (palette PNGs) in ``out_dir/masks``: images for `predict` to try,
    with the answers beside them."""
    images, masks = Path(out_dir) / "images", Path(out_dir) / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    chosen = spread_indices(getattr(splits, split), n)  # a split of consecutive slices would give near-copies
    for i in chosen:
        name = prepared.ids[i].replace("/", "_")
        pixels = np.clip(np.asarray(prepared.images[i], dtype=np.float32) * 255 + 0.5, 0, 255).astype(
            np.uint8
        )
        save_png(pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1), images / f"{name}.png")
        save_png(np.asarray(prepared.masks[i], dtype=np.uint8), masks / f"{name}_mask.png", palette=True)
    return images, masks


def spread_indices(indices: np.ndarray, n: int, foreground: np.ndarray | None = None) -> np.ndarray:
    """``n`` of ``indices`` (a split, in its order) spread evenly over it, its first and last included, instead
    of its first ``n``: a split of consecutive slices then shows the volume from one end to the other, not
    six near-copies of its top. ``foreground``: each index's count of foreground pixels; when at least ``n``
    indices have some, only those are chosen (an empty slice shows nothing of a segmentation). All of
    ``indices`` when there are ``n`` or fewer."""
    indices = np.asarray(indices)
    if foreground is not None:
        has = np.asarray(foreground) > 0
        if has.sum() >= n:
            indices = indices[has]
    if len(indices) <= n:
        return indices.copy()
    return indices[np.unique(np.linspace(0, len(indices) - 1, n).round().astype(int))]
