"""`kvasir`: Kvasir-SEG, 1000 colonoscopy RGB images with polyp masks.

The masks are JPEGs, so their edges carry compression noise; they are thresholded at mid-grey. The
release has no patient or video ids, so each image is its own split group.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from tskd_tune.data.folder import image_files, pair_files
from tskd_tune.data.registry import Adapter, Options, Record, read_image, register, require_dir, to_unit_float

TOP = "Kvasir-SEG"
LAYOUT = f"{TOP}/images/<name>.jpg and {TOP}/masks/<name>.jpg (root: {TOP} or its parent)"
SOURCE = "https://datasets.simula.no/kvasir-seg/"
CLASSES = ["background", "polyp"]


class KvasirOptions(Options):
    """Kvasir-SEG has no options."""


def _read(image: Path, mask: Path) -> tuple[np.ndarray, np.ndarray]:
    img = to_unit_float(read_image(image, "RGB"))
    return img, (read_image(mask, "L") > 127).astype(np.uint8)


def _scan(root: Path | None, opts: KvasirOptions) -> list[Record]:
    root = require_dir(root, "kvasir", LAYOUT, SOURCE)
    base = root / TOP if (root / TOP).is_dir() else root  # as unzipped, or the folder itself
    images = image_files(require_dir(base, "kvasir", LAYOUT, SOURCE, sub="images"))
    masks = image_files(require_dir(base, "kvasir", LAYOUT, SOURCE, sub="masks"))
    return [
        Record(id=stem, group=stem, read=partial(_read, image, mask), sources=(image, mask))
        for stem, image, mask in pair_files(images, masks, base / "images", base / "masks", ext=".jpg")
    ]


register(
    Adapter(
        name="kvasir",
        options=KvasirOptions,
        classes=lambda o: CLASSES,
        scan=_scan,
        layout=LAYOUT,
        source=SOURCE,
    )
)
