"""`busi`: Breast Ultrasound Images (Al-Dhabyani et al. 2020), 780 greyscale images with lesion masks.

Images sit in one folder per category, each with ``<name>_mask.png``; an image with several lesions
has extra masks ``<name>_mask_1.png``, ``<name>_mask_2.png``, ... which are OR-ed into one. The
dataset has no patient ids (600 women, 780 images), so each image is its own split group.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from tskd_tune.data.folder import image_files
from tskd_tune.data.registry import Adapter, Options, Record, read_image, register, require_dir, to_unit_float
from tskd_tune.errors import DataError

TOP = "Dataset_BUSI_with_GT"
CATEGORIES = ("benign", "malignant", "normal")
LAYOUT = (
    f"{TOP}/{{benign,malignant,normal}}/<name>.png with <name>_mask.png "
    "(and extra lesion masks <name>_mask_1.png, ...)"
)
SOURCE = "https://scholar.cu.edu.eg/?q=afahmy/pages/dataset"
LESION_CLASSES = ["background", "lesion"]
MALIGNANCY_CLASSES = ["background", "benign", "malignant"]
_MASK = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<part>\d+))?$")


class BusiOptions(Options):
    target: Literal["lesion", "malignancy"] = "lesion"
    """`lesion`: lesion vs background; `malignancy`: lesion pixels are benign or malignant by folder."""
    include_normal: bool = True
    """Include the `normal` images (no lesion: all-background masks)."""


def _read(image: Path, masks: list[Path], label: int) -> tuple[np.ndarray, np.ndarray]:
    img = to_unit_float(read_image(image, "L"))
    lesion = np.zeros(img.shape, bool)
    for path in masks:
        part = read_image(path, "L")
        if part.shape != lesion.shape:
            raise DataError(f"{path}: mask size {part.shape} does not match image size {img.shape}")
        lesion |= part > 127  # mid-grey threshold: any anti-aliased edge pixel goes to the nearer class
    return img, lesion.astype(np.uint8) * np.uint8(label)


def _part_index(path: Path) -> int:
    return int(_MASK.match(path.stem)["part"] or 0)


def _scan(root: Path | None, opts: BusiOptions) -> list[Record]:
    root = require_dir(root, "busi", LAYOUT, SOURCE)
    base = root / TOP if (root / TOP).is_dir() else root  # root may be the dataset folder or its parent
    records = []
    for category in CATEGORIES:
        if category == "normal" and not opts.include_normal:
            continue
        folder = require_dir(base, "busi", LAYOUT, SOURCE, sub=category)
        files = image_files(folder)
        masks: dict[str, list[Path]] = {stem: [] for stem in files if not _MASK.match(stem)}
        for stem, path in files.items():
            match = _MASK.match(stem)
            if match is None:
                continue
            if match["stem"] not in masks:
                raise DataError(f"{path}: mask without an image {match['stem']}.png in {folder}")
            masks[match["stem"]].append(path)
        # normal images have no lesion, so for malignancy their (empty) masks stay background
        label = 1 if opts.target == "lesion" else {"benign": 1, "malignant": 2, "normal": 0}[category]
        for stem, parts in masks.items():
            image = files[stem]
            parts.sort(key=_part_index)
            if not parts or _part_index(parts[0]) != 0:
                raise DataError(f"{image}: no mask {stem}_mask.png beside it")
            records.append(
                Record(
                    id=f"{category}/{stem}",
                    group=f"{category}/{stem}",
                    read=partial(_read, image, parts, label),
                    sources=(image, *parts),
                )
            )
    return records


register(
    Adapter(
        name="busi",
        options=BusiOptions,
        classes=lambda o: LESION_CLASSES if o.target == "lesion" else MALIGNANCY_CLASSES,
        scan=_scan,
        layout=LAYOUT,
        source=SOURCE,
    )
)
