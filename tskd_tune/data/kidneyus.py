"""`kidneyus`: the Open Kidney Ultrasound data set (B-mode kidney images, two sonographers' polygons).

Masks come from the VGG Image Annotator CSV of one sonographer (rasterised here) or from the mask
PNGs some copies of the data set ship. Images with no annotation rows in the sonographer's CSV, or
none with a polygon of the chosen target, are skipped: the CSV cannot tell "no kidney here" from "not
annotated", and a blank mask would teach the former. Byte-identical images published under different
names are read once, so that no image lands in both the training and the test split.
"""

from __future__ import annotations

import csv
import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from tskd_tune.data.registry import (
    Adapter,
    Options,
    Record,
    check_unique,
    read_image,
    register,
    require_dir,
    to_unit_float,
)
from tskd_tune.errors import DataError

LAYOUT = (
    "images/*.png + labels/reviewed_labels_{1,2}.csv (VIA polygons) "
    "[+ labels/reviewed_masks_{1,2}/{capsule,regions}/*.png]"
)
SOURCE = "https://rsingla.ca/kidneyUS/ (registration required)"

CAPSULE_CLASSES = ["background", "kidney"]
REGION_CLASSES = ["background", "central_echo_complex", "medulla", "cortex"]
ANATOMIES = ("Capsule", "Central Echo Complex", "Medulla", "Cortex")
# drawn in this order, so that where sonographers' polygons overlap the inner structure wins
REGION_ORDER = (("Cortex", 3), ("Medulla", 2), ("Central Echo Complex", 1))
REQUIRED_COLUMNS = ("filename", "region_shape_attributes", "region_attributes")

Polygon = tuple[str, list[tuple[float, float]]]


class KidneyUSOptions(Options):
    sonographer: Literal[1, 2] = 1
    """Whose reviewed annotations to use: reviewed_labels_1.csv or reviewed_labels_2.csv."""
    target: Literal["capsule", "regions"] = "capsule"
    """`capsule`: the whole kidney; `regions`: central echo complex, medulla, cortex."""
    source: Literal["polygons", "masks"] = "polygons"
    """`polygons`: rasterise the CSV's polygons; `masks`: read reviewed_masks_<sonographer>/<target>/."""


def _classes(opts: KidneyUSOptions) -> list[str]:
    return CAPSULE_CLASSES if opts.target == "capsule" else REGION_CLASSES


def _scan(root: Path | None, opts: KidneyUSOptions) -> list[Record]:
    """One record per distinct image with a polygon of the chosen target; the others are skipped."""
    root = require_dir(root, "kidneyus", LAYOUT, SOURCE)
    images_dir = require_dir(root, "kidneyus", LAYOUT, SOURCE, sub="images")
    csv_path = root / "labels" / f"reviewed_labels_{opts.sonographer}.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: not found; kidneyus expects {LAYOUT}; get it from {SOURCE}")
    images = {p.name: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() == ".png" and p.is_file()}
    polygons = _parse_csv(csv_path, images)

    wanted = {"Capsule"} if opts.target == "capsule" else {a for a, _ in REGION_ORDER}
    annotated = [images[n] for n in sorted(polygons) if any(a in wanted for a, _ in polygons[n])]
    kept = _drop_duplicates(annotated)
    check_unique([p.stem for p in kept], images_dir)

    mask_dir = root / "labels" / f"reviewed_masks_{opts.sonographer}" / opts.target
    records = []
    for path in kept:
        if opts.source == "masks":
            mask_path = mask_dir / path.name
            # checked here, not at read time: preprocessing fingerprints every source before reading
            if not mask_path.is_file():
                raise DataError(f"{mask_path}: not found; kidneyus with source: masks expects {LAYOUT}")
            read = partial(_read_with_mask, path, mask_path, opts.target)
            sources = (path, csv_path, mask_path)
        else:
            read = partial(_read_with_polygons, path, tuple(polygons[path.name]), opts.target)
            sources = (path, csv_path)
        records.append(Record(id=path.stem, group=path.stem, read=read, sources=sources))
    return records


def _parse_csv(path: Path, images: dict[str, Path]) -> dict[str, list[Polygon]]:
    """Image name -> its (anatomy, points) polygons, in CSV order; every row is checked."""
    out: dict[str, list[Polygon]] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise DataError(
                    f"{path}: line 1: missing column(s) {', '.join(missing)}; expected a VGG Image Annotator "
                    "CSV (filename, file_size, file_attributes, region_count, region_id, "
                    "region_shape_attributes, region_attributes)"
                )
            reader.fieldnames = columns
            for row in reader:
                where = f"{path}: line {reader.line_num}"
                name = (row.get("filename") or "").strip()
                if name not in images:
                    raise DataError(f"{where}: filename: {name!r} is not in {path.parent.parent / 'images'}")
                polygon = _parse_region(row, where)
                regions = out.setdefault(name, [])
                if polygon is not None:
                    regions.append(polygon)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    return out


def _parse_region(row: dict, where: str) -> Polygon | None:
    """The row's polygon, or None for VIA's placeholder row of an image without regions."""
    shape = _json(row, "region_shape_attributes", where)
    attrs = _json(row, "region_attributes", where)
    if shape == {} and attrs == {}:
        return None
    field = f"{where}: region_shape_attributes"
    if not isinstance(shape, dict) or shape.get("name") != "polygon":
        kind = shape.get("name") if isinstance(shape, dict) else type(shape).__name__
        raise DataError(f"{field}: expected a polygon, got {kind!r}")
    xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
    if not isinstance(xs, list) or not isinstance(ys, list):
        raise DataError(f"{field}: all_points_x and all_points_y must be lists of numbers")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in xs + ys):
        raise DataError(f"{field}: all_points_x and all_points_y must hold only numbers")
    if len(xs) != len(ys):
        raise DataError(f"{field}: all_points_x has {len(xs)} points but all_points_y has {len(ys)}")
    if len(xs) < 3:
        raise DataError(f"{field}: a polygon needs at least 3 points, got {len(xs)}")
    anatomy = attrs.get("Anatomy") if isinstance(attrs, dict) else None
    anatomy = anatomy.strip() if isinstance(anatomy, str) else anatomy
    if anatomy not in ANATOMIES:
        got = "no Anatomy attribute" if anatomy is None else f"got {anatomy!r}"
        raise DataError(f"{where}: region_attributes: Anatomy must be one of {', '.join(ANATOMIES)}; {got}")
    return anatomy, [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]


def _json(row: dict, column: str, where: str):
    text = row.get(column)
    if text is None:
        raise DataError(f"{where}: {column}: missing (the row has too few fields)")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise DataError(f"{where}: {column}: not valid JSON, got {text[:60]!r}") from None


def _drop_duplicates(paths: list[Path]) -> list[Path]:
    """Keep the first of byte-identical files (by name); only files of equal size are hashed."""
    by_size: dict[int, list[Path]] = {}
    for p in paths:
        by_size.setdefault(p.stat().st_size, []).append(p)
    drop: set[Path] = set()
    for same_size in by_size.values():
        seen: set[str] = set()
        for p in same_size if len(same_size) > 1 else ():
            h = hashlib.sha1(p.read_bytes()).hexdigest()
            if h in seen:
                drop.add(p)
            seen.add(h)
    return [p for p in paths if p not in drop]


def _read_with_polygons(
    image_path: Path, polygons: tuple[Polygon, ...], target: str
) -> tuple[np.ndarray, np.ndarray]:
    image = to_unit_float(read_image(image_path, "L"))
    canvas = Image.new("L", (image.shape[1], image.shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    order = (("Capsule", 1),) if target == "capsule" else REGION_ORDER
    for anatomy, value in order:
        for a, points in polygons:
            if a == anatomy:
                draw.polygon(points, fill=value)
    return image, np.asarray(canvas)


def _read_with_mask(image_path: Path, mask_path: Path, target: str) -> tuple[np.ndarray, np.ndarray]:
    image = to_unit_float(read_image(image_path, "L"))
    mask = read_image(mask_path)
    if mask.ndim == 3:  # grey masks saved as RGB(A) carry the label in every colour channel
        mask = mask[..., 0]
    if target == "capsule":
        return image, (mask != 0).astype(np.uint8)
    outside = (mask < 0) | (mask > 3)
    if outside.any():
        bad = np.unique(mask[outside])[:5].tolist()
        raise DataError(
            f"{mask_path}: values {bad} are not KidneyUS region labels "
            "(0 background, 1 central echo complex, 2 medulla, 3 cortex)"
        )
    return image, mask.astype(np.uint8)


register(
    Adapter(
        name="kidneyus",
        options=KidneyUSOptions,
        classes=_classes,
        scan=_scan,
        layout=LAYOUT,
        source=SOURCE,
    )
)
