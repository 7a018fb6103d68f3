"""`chaos`: the CHAOS challenge training sets (abdominal CT liver; MR liver, kidneys and spleen).

Each DICOM slice is one record, paired by position with its ground-truth PNG: slices in InstanceNumber
order, PNGs in the order of the numbers in their names. Records are grouped by patient so that no
slice of a test patient is trained on. pydicom is imported when a slice is read, not when the adapter
is registered.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from tskd_tune.data.registry import Adapter, Options, Record, read_image, register, require_dir, robust_scale
from tskd_tune.errors import DataError

LAYOUT = (
    "Train_Sets/CT/<id>/{DICOM_anon/*.dcm, Ground/liver_GT_*.png} and "
    "Train_Sets/MR/<id>/{T2SPIR,T1DUAL}/{DICOM_anon[/InPhase|/OutPhase]/*.dcm, Ground/*.png}"
)
SOURCE = "https://zenodo.org/records/3431873"

CT_CLASSES = ["background", "liver"]
MR_CLASSES = ["background", "liver", "right_kidney", "left_kidney", "spleen"]
# published grey-value ranges of the MR ground truth (inclusive) -> class index
MR_GREY = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))
MR_GREY_TEXT = "0, liver 55-70, right kidney 110-135, left kidney 175-200, spleen 240-255"


class ChaosOptions(Options):
    modality: Literal["CT", "MR"] = "CT"
    """`CT`: liver only; `MR`: liver, right kidney, left kidney, spleen."""
    sequence: Literal["T2SPIR", "T1DUAL_in", "T1DUAL_out"] = "T2SPIR"
    """MR sequence: T2-SPIR, or the in-phase or opposed-phase T1-DUAL images (ignored for CT)."""
    window: tuple[float, Annotated[float, Field(gt=0)]] = (40.0, 400.0)
    """CT window (level, width) in Hounsfield units, mapped to [0, 1] (ignored for MR)."""


def _classes(opts: ChaosOptions) -> list[str]:
    return CT_CLASSES if opts.modality == "CT" else MR_CLASSES


def _scan(root: Path | None, opts: ChaosOptions) -> list[Record]:
    """One record per slice of every patient of the chosen modality (and MR sequence)."""
    base = require_dir(root, "chaos", LAYOUT, SOURCE, sub=f"Train_Sets/{opts.modality}")
    patients = sorted(
        (d for d in base.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))), key=_natural_key
    )
    records = []
    for patient in patients:
        dicom_dir, ground_dir = _series_dirs(patient, opts)
        for d in (dicom_dir, ground_dir):
            if not d.is_dir():
                raise DataError(f"{d}: not found; chaos expects {LAYOUT}")
        slices = sorted(
            (p for p in dicom_dir.iterdir() if p.suffix.lower() == ".dcm"),
            key=lambda p: (_instance(p), p.name),
        )
        truths = sorted((p for p in ground_dir.iterdir() if p.suffix.lower() == ".png"), key=_natural_key)
        if len(slices) != len(truths):
            raise DataError(
                f"{dicom_dir}: {len(slices)} DICOM slices but {len(truths)} ground-truth PNGs in {ground_dir}"
            )
        if not slices:
            raise DataError(f"{dicom_dir}: no .dcm files; chaos expects {LAYOUT}")
        ct = opts.modality == "CT"
        prefix = f"CT_{patient.name}" if ct else f"MR_{patient.name}_{opts.sequence}"
        group = f"{opts.modality}/{patient.name}"
        for i, (dcm, png) in enumerate(zip(slices, truths, strict=True)):
            read = partial(_read_ct, dcm, png, opts.window) if ct else partial(_read_mr, dcm, png)
            records.append(Record(id=f"{prefix}_{i:03d}", group=group, read=read, sources=(dcm, png)))
    return records


def _series_dirs(patient: Path, opts: ChaosOptions) -> tuple[Path, Path]:
    """(DICOM folder, ground-truth folder) of one patient's chosen series."""
    if opts.modality == "CT":
        return patient / "DICOM_anon", patient / "Ground"
    if opts.sequence == "T2SPIR":
        return patient / "T2SPIR" / "DICOM_anon", patient / "T2SPIR" / "Ground"
    phase = "InPhase" if opts.sequence == "T1DUAL_in" else "OutPhase"
    # both T1-DUAL phases image the same slices, so they share one Ground folder
    return patient / "T1DUAL" / "DICOM_anon" / phase, patient / "T1DUAL" / "Ground"


def _natural_key(path: Path) -> tuple:
    """Sort by the numbers in a name (liver_GT_9 before liver_GT_10; patient 2 before 10)."""
    return tuple(int(n) for n in re.findall(r"\d+", path.stem)), path.name


def _instance(path: Path) -> int:
    """A slice's InstanceNumber, read from its header only."""
    ds = _dcmread(path, stop_before_pixels=True, specific_tags=["InstanceNumber"])
    number = ds.get("InstanceNumber")
    if number is None or str(number).strip() == "":
        raise DataError(f"{path}: no InstanceNumber, so the slice cannot be ordered")
    return int(number)


def _dcmread(path: Path, **kwargs):
    import pydicom

    try:
        return pydicom.dcmread(path, **kwargs)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # pydicom reports damaged files with many exception types
        raise DataError(f"{path}: cannot read DICOM ({exc.__class__.__name__})") from None


def _pixels(path: Path) -> np.ndarray:
    """The slice's stored values mapped through RescaleSlope/RescaleIntercept (Hounsfield units for CT)."""
    ds = _dcmread(path)
    try:
        values = ds.pixel_array.astype(np.float32)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except Exception as exc:  # missing or truncated PixelData, unsupported compression, bad tag values
        raise DataError(f"{path}: cannot decode DICOM pixels ({exc.__class__.__name__})") from None
    if values.ndim != 2:
        raise DataError(f"{path}: expected one 2D greyscale slice, got pixel shape {values.shape}")
    return values * slope + intercept


def _ground(path: Path) -> np.ndarray:
    truth = read_image(path)
    return truth[..., 0] if truth.ndim == 3 else truth  # grey PNGs saved as RGB repeat the value


def _read_ct(dcm: Path, png: Path, window: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    level, width = window
    image = np.clip((_pixels(dcm) - (level - width / 2)) / width, 0, 1).astype(np.float32)
    truth = _ground(png)
    bad = np.unique(truth[(truth != 0) & (truth != 255)])
    if bad.size:
        raise DataError(f"{png}: grey values {bad[:5].tolist()} are not CHAOS CT labels (0, liver 255)")
    return image, (truth == 255).astype(np.uint8)


def _read_mr(dcm: Path, png: Path) -> tuple[np.ndarray, np.ndarray]:
    image = robust_scale(_pixels(dcm))
    truth = _ground(png)
    mask = np.zeros(truth.shape, np.uint8)
    known = truth == 0
    for lo, hi, cls in MR_GREY:
        hit = (truth >= lo) & (truth <= hi)
        mask[hit] = cls
        known |= hit
    if not known.all():
        bad = np.unique(truth[~known])[:5].tolist()
        raise DataError(f"{png}: grey values {bad} are not CHAOS MR labels ({MR_GREY_TEXT})")
    return image, mask


register(
    Adapter(
        name="chaos",
        options=ChaosOptions,
        classes=_classes,
        scan=_scan,
        layout=LAYOUT,
        source=SOURCE,
        # declared, not left to name matching: a flip must swap the kidneys even when data.classes renames them
        lateral_pairs=(("right_kidney", "left_kidney"),),
    )
)
