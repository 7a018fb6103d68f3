"""`isic2018`: ISIC 2018 challenge task 1, dermoscopic RGB images with lesion masks.

Ground truth masks are exact 0/255 PNGs, so any other value means a damaged or foreign file and is
refused rather than thresholded. The task 1 files carry no lesion or patient ids, so each image is
its own split group.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from tskd_tune.data.folder import image_files, pair_files
from tskd_tune.data.registry import Adapter, Options, Record, read_image, register, require_dir, to_unit_float
from tskd_tune.errors import DataError

FOLDERS = {
    "training": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "validation": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}
LAYOUT = (
    "ISIC2018_Task1-2_Training_Input/ISIC_<id>.jpg and ISIC2018_Task1_Training_GroundTruth/"
    "ISIC_<id>_segmentation.png (Validation/Test instead of Training with data.options.split)"
)
SOURCE = "https://challenge.isic-archive.com/data/#2018"
CLASSES = ["background", "lesion"]
_SUFFIX = "_segmentation"


class Isic2018Options(Options):
    split: Literal["training", "validation", "test"] = "training"
    """Which released part to read: the Training, Validation or Test image/ground-truth folder pair."""


def _read(image: Path, mask: Path) -> tuple[np.ndarray, np.ndarray]:
    img = to_unit_float(read_image(image, "RGB"))
    raw = read_image(mask, "L")
    bad = np.unique(raw[(raw != 0) & (raw != 255)])
    if bad.size:
        raise DataError(f"{mask}: mask values {bad[:5].tolist()} are not 0/255")
    return img, (raw == 255).astype(np.uint8)


def _scan(root: Path | None, opts: Isic2018Options) -> list[Record]:
    root = require_dir(root, "isic2018", LAYOUT, SOURCE)
    input_dir, truth_dir = FOLDERS[opts.split]
    # the 2017 release put <id>_superpixels.png beside the inputs; they are not images to segment
    images = {
        stem: p
        for stem, p in image_files(require_dir(root, "isic2018", LAYOUT, SOURCE, sub=input_dir)).items()
        if not stem.endswith("_superpixels")
    }
    masks = {}
    for stem, path in image_files(require_dir(root, "isic2018", LAYOUT, SOURCE, sub=truth_dir)).items():
        if not stem.endswith(_SUFFIX):
            raise DataError(f"{path}: not a ground truth name; expected <image id>{_SUFFIX}.png")
        masks[stem] = path
    return [
        Record(id=stem, group=stem, read=partial(_read, image, mask), sources=(image, mask))
        for stem, image, mask in pair_files(
            images, masks, root / input_dir, root / truth_dir, _SUFFIX, ".png"
        )
    ]


register(
    Adapter(
        name="isic2018",
        options=Isic2018Options,
        classes=lambda o: CLASSES,
        scan=_scan,
        layout=LAYOUT,
        source=SOURCE,
    )
)
