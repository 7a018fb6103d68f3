"""`folder`: any dataset laid out as ``images/`` and ``masks/`` with matching file stems.

Masks hold one value per class: either the class index itself (``mask_values`` unset) or raw pixel
values listed in class order (``mask_values: [0, 255]`` for 0/255 binary masks). ``group_pattern``
pulls a patient id out of each stem so that no patient is split between train and test.

The file helpers here (:func:`image_files`, :data:`IMAGE_SUFFIXES`) are shared by the other
file-based adapters.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field, field_validator, model_validator

from tskd_tune.data.registry import (
    Adapter,
    Options,
    Record,
    check_unique,
    read_image,
    register,
    require_dir,
    robust_scale,
    to_unit_float,
)
from tskd_tune.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LAYOUT = "images/<name>.png|jpg|jpeg|tif|tiff|bmp and masks/<name>.<any of these> with matching names"
# more than 8 bits per pixel is a scanner's raw range (12-bit CT, MR, X-ray), not a display range
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


class FolderOptions(Options):
    mask_values: list[int] | None = Field(None, min_length=2, max_length=256)
    """Raw mask values in class order, background first (e.g. [0, 255]); unset: a value is its class index."""
    num_classes: int | None = Field(None, ge=2, le=256)
    """Number of classes when mask_values is unset (default 2)."""
    mask_suffix: str = ""
    """Text after the image stem in mask names (e.g. `_mask`: masks/a_mask.png for images/a.png)."""
    image_mode: Literal["L", "RGB"] = "L"
    """Read images as grey (`L`) or colour (`RGB`)."""
    group_pattern: str | None = None
    """Regex whose first group is the patient id in a file stem (e.g. `^(patient\\d+)_`); unset: the stem."""

    @field_validator("mask_values")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"values must be distinct, got {v}")
        if v is not None and min(v) < 0:
            raise ValueError(f"values must be >= 0, got {v}")
        return v

    @field_validator("group_pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            groups = re.compile(v).groups
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc}), got {v!r}") from None
        if groups < 1:
            raise ValueError(f"needs a capturing group (...) around the patient id, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_class_count(self) -> FolderOptions:
        if self.mask_values is not None and self.num_classes not in (None, len(self.mask_values)):
            raise ValueError(
                f"num_classes ({self.num_classes}) disagrees with mask_values "
                f"({len(self.mask_values)} values); set only one of them"
            )
        return self


def classes(opts: FolderOptions) -> list[str]:
    """Default class names: from mask_values, else background + foreground (class_1.. for more)."""
    if opts.mask_values is not None:
        return ["background"] + [f"class_{v}" for v in opts.mask_values[1:]]
    n = opts.num_classes or 2
    return ["background", "foreground"] if n == 2 else ["background"] + [f"class_{i}" for i in range(1, n)]


def pair_files(
    images: dict[str, Path],
    masks: dict[str, Path],
    image_dir: Path,
    mask_dir: Path,
    suffix: str = "",
    ext: str = ".*",
) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for every image, its mask named ``stem + suffix``; an image without its mask,
    or a mask without its image (a dataset copied in part), is an error rather than silently dropped."""
    masks = dict(masks)
    pairs = []
    for stem, image in images.items():
        mask = masks.pop(stem + suffix, None)
        if mask is None:
            raise DataError(f"{image}: no mask {stem}{suffix}{ext} in {mask_dir}")
        pairs.append((stem, image, mask))
    if masks:
        orphan = next(iter(masks.values()))
        raise DataError(f"{orphan}: mask without an image in {image_dir} ({len(masks)} such mask(s))")
    return pairs


def image_files(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` by stem; other files and hidden ones (macOS ``._*`` copies) are skipped."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    check_unique([p.stem for p in files], folder)
    return {p.stem: p for p in files}


def read_any_image(path: Path, mode: str) -> np.ndarray:
    """An image as float32 in [0, 1] in ``mode`` (L or RGB); 16-bit and float images are scaled robustly."""
    try:
        with Image.open(path) as im:
            native = im.mode
    except OSError:
        native = None  # read_image below reports the file
    if native in _HIGH_DEPTH_MODES:
        # Pillow's conversion to 8 bits clips at 255 instead of rescaling, so scale in numpy
        image = read_image(path)
        if image.ndim != 2:
            raise DataError(f"{path}: {image.ndim}-D {native} image; expected a 2-D grey image")
        image = robust_scale(image)
        return np.repeat(image[..., None], 3, axis=2) if mode == "RGB" else image
    return to_unit_float(read_image(path, mode))


def read_index_mask(path: Path) -> np.ndarray:
    """A mask's raw values, HxW: palette masks keep their indices, grey RGB masks become one channel."""
    mask = read_image(path)
    if mask.ndim == 3:
        colour = mask[..., :3] if mask.shape[2] >= 3 else mask[..., :1]  # drop alpha
        if (colour != colour[..., :1]).any():
            raise DataError(
                f"{path}: colour mask (channels differ); expected one grey or palette value per class"
            )
        mask = colour[..., 0]
    return mask.astype(np.uint8) if mask.dtype == bool else mask


def _read(image: Path, mask: Path, opts: FolderOptions) -> tuple[np.ndarray, np.ndarray]:
    img = read_any_image(image, opts.image_mode)
    raw = read_index_mask(mask)
    if opts.mask_values is None:
        return img, raw  # preprocessing reports values outside the class list
    out = np.zeros(raw.shape, np.uint8)
    known = np.zeros(raw.shape, bool)
    for k, value in enumerate(opts.mask_values):
        hit = raw == value
        out[hit] = k
        known |= hit
    if not known.all():
        bad = np.unique(raw[~known])
        raise DataError(
            f"{mask}: mask values {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} "
            f"not in data.options.mask_values {opts.mask_values}"
        )
    return img, out


def _group(stem: str, image: Path, pattern: re.Pattern | None) -> str:
    if pattern is None:
        return stem
    match = pattern.search(stem)
    if match is None or match.group(1) is None:
        raise DataError(f"{image}: name does not match data.options.group_pattern {pattern.pattern!r}")
    return match.group(1)


def _scan(root: Path | None, opts: FolderOptions) -> list[Record]:
    root = require_dir(root, "folder", LAYOUT, "")
    images = image_files(require_dir(root, "folder", LAYOUT, "", sub="images"))
    masks = image_files(require_dir(root, "folder", LAYOUT, "", sub="masks"))
    pattern = re.compile(opts.group_pattern) if opts.group_pattern else None
    return [
        Record(
            id=stem,
            group=_group(stem, image, pattern),
            read=partial(_read, image, mask, opts),
            sources=(image, mask),
        )
        for stem, image, mask in pair_files(images, masks, root / "images", root / "masks", opts.mask_suffix)
    ]


register(
    Adapter(
        name="folder",
        options=FolderOptions,
        classes=classes,
        scan=_scan,
        layout=LAYOUT,
        source="",  # the user's own data
    )
)
