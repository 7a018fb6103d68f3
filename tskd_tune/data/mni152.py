"""`mni152`: real brain MRI slices, the MNI152 T1 template with grey/white matter labels, no download.

nilearn ships the skull-stripped ICBM152 2009 T1 template and its grey and white matter probability
maps (197x233x189, 1 mm) inside its package, so this dataset works offline on any machine with
tskd-tune installed. A voxel is grey or white matter by the larger of the two probabilities where
that probability reaches ``threshold``, else background (CSF and outside the brain).

Adjacent 1 mm slices are nearly identical, so splitting slice by slice would put near-copies of each
test slice in the training set and overstate every score. Slices are therefore grouped into slabs
of ``slab`` consecutive slices, and splits never divide a slab.
"""

from __future__ import annotations

from functools import lru_cache, partial
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tskd_tune.data.registry import Adapter, Options, Record, register, robust_scale
from tskd_tune.errors import DataError

CLASSES = ["background", "grey_matter", "white_matter"]
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # the template is stored x (left-right), y, z (up)
LAYOUT = "nothing on disk (the MNI152 template ships inside the nilearn package)"
SOURCE = "the nilearn package (nilearn.datasets.load_mni152_template), installed with tskd-tune"


class Mni152Options(Options):
    axis: Literal["axial", "coronal", "sagittal"] = "axial"
    """Slicing direction."""
    stride: int = Field(1, ge=1, le=64)
    """Take every stride-th slice (1: all of them)."""
    min_foreground: float = Field(0.05, ge=0, lt=1)
    """Skip slices whose labelled (grey or white matter) fraction is below this."""
    slab: int = Field(8, ge=1, le=256)
    """Consecutive slices sharing a split group, so near-identical neighbours never straddle train/test."""
    threshold: float = Field(0.5, gt=0, le=1)
    """Minimum grey/white matter probability for a voxel to be labelled."""


FILES = (
    "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
)
"""The T1, grey and white matter templates, in ``nilearn/datasets/data``."""


def _nilearn_data() -> Path:
    """nilearn's data folder, found without importing ``nilearn.datasets`` (it imports scikit-learn: 1.5 s)."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.dataset mni152: the nilearn package is not installed (pip install nilearn)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


@lru_cache(maxsize=1)
def _volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The T1, grey and white matter volumes, loaded once per process (every record reads from them), each
    scaled to a maximum of 1: what ``nilearn.datasets.load_mni152_*template()`` return at 1 mm, read with
    nibabel, the reader nilearn uses (tests compare the two)."""
    import nibabel

    vols = []
    for path in _template_files():
        vol = np.asanyarray(nibabel.load(path).dataobj).astype(np.float32)
        vol /= vol.max()
        vol.setflags(write=False)  # shared by every record through the cache
        vols.append(vol)
    t1, gm, wm = vols
    return t1, gm, wm


@lru_cache(maxsize=4)
def _labels(threshold: float) -> np.ndarray:
    """Voxel labels: 0 background, 1 grey matter, 2 white matter (ties go to grey matter)."""
    _, gm, wm = _volumes()
    labels = np.where(np.maximum(gm, wm) >= threshold, np.where(wm > gm, 2, 1), 0).astype(np.uint8)
    labels.setflags(write=False)
    return labels


def _template_files() -> tuple[Path, ...]:
    """The template files inside nilearn, so that a nilearn upgrade that changes them rebuilds the cache."""
    folder = _nilearn_data()
    files = tuple(folder / name for name in FILES)
    if missing := [f.name for f in files if not f.is_file()]:
        raise DataError(
            f"data.dataset mni152: this nilearn ({folder}) has no {', '.join(missing)}; "
            "tskd-tune reads the MNI152 2009 templates nilearn ships"
        )
    return files


def _read(axis: int, index: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    at = (slice(None),) * axis + (index,)  # a view; np.take would gather through the whole volume
    # rot90 turns the stored (x, y) / (x, z) / (y, z) planes so that anterior or superior is up
    t1 = np.rot90(_volumes()[0][at])
    mask = np.rot90(_labels(threshold)[at])
    return robust_scale(t1), np.ascontiguousarray(mask)


def _scan(root: Path | None, opts: Mni152Options) -> list[Record]:
    axis = AXES[opts.axis]
    labels = _labels(opts.threshold)
    fraction = (labels != 0).mean(axis=tuple(a for a in range(3) if a != axis))
    chosen = [k for k in range(0, labels.shape[axis], opts.stride) if fraction[k] >= opts.min_foreground]
    if not chosen:
        raise DataError(
            f"data.options.min_foreground: no {opts.axis} slice has a labelled fraction "
            f">= {opts.min_foreground} (largest: {fraction.max():.3f})"
        )
    files = _template_files()
    return [
        Record(
            id=f"mni152_{opts.axis}_{k:03d}",
            group=f"mni152_{opts.axis}_slab{k // opts.slab:03d}",
            read=partial(_read, axis, k, opts.threshold),
            sources=files,
        )
        for k in chosen
    ]


register(
    Adapter(
        name="mni152",
        options=Mni152Options,
        classes=lambda o: CLASSES,
        scan=_scan,
        layout=LAYOUT,
        source=SOURCE,
        needs_root=False,
    )
)
