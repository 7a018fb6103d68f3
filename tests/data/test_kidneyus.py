import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import tskd_tune.data.kidneyus  # noqa: F401  (registers the adapter)
from tskd_tune.cache import Store
from tskd_tune.config import DataConfig, validate
from tskd_tune.data.prepare import prepare
from tskd_tune.data.registry import get_adapter
from tskd_tune.errors import ConfigError, DataError

HEADER = [
    "filename",
    "file_size",
    "file_attributes",
    "region_count",
    "region_id",
    "region_shape_attributes",
    "region_attributes",
]
SIZE = 64  # native side of the fixture images; prepared at 32, so prepared pixel (r, c) samples (2r+1, 2c+1)

# nested squares (x0, y0, x1, y1), drawn in a deliberately outside-in-unfriendly CSV order
SHAPES_A = [
    ("Central Echo Complex", (28, 28, 36, 36)),
    ("Capsule", (8, 8, 56, 56)),
    ("Medulla", (20, 20, 44, 44)),
    ("Cortex", (12, 12, 52, 52)),
]
SHAPES_B = [("Capsule", (4, 4, 30, 30))]
SHAPES_B_SONOGRAPHER_2 = [("Capsule", (34, 34, 60, 60))]
SHAPES_E_SONOGRAPHER_2 = [("Capsule", (10, 30, 50, 60)), ("Cortex", (12, 32, 48, 58))]


def _square(box):
    x0, y0, x1, y1 = box
    return {"name": "polygon", "all_points_x": [x0, x1, x1, x0], "all_points_y": [y0, y0, y1, y1]}


def _row(name, shape, anatomy, region_id=0, count=1):
    attrs = {"Anatomy": anatomy} if anatomy is not None else {}
    return [
        name,
        1234,
        json.dumps({"Quality": "Fair"}),
        count,
        region_id,
        json.dumps(shape),
        json.dumps(attrs),
    ]


def _rows(name, shapes):
    return [_row(name, _square(box), anatomy, i, len(shapes)) for i, (anatomy, box) in enumerate(shapes)]


def _write_csv(path: Path, rows, header=HEADER):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _draw(shapes, target):
    """The mask a sonographer's tool would export: capsule 255 anywhere inside, regions inner on top."""
    canvas = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    order = (
        [("Capsule", 255)]
        if target == "capsule"
        else [("Cortex", 3), ("Medulla", 2), ("Central Echo Complex", 1)]
    )
    for anatomy, value in order:
        for a, (x0, y0, x1, y1) in shapes:
            if a == anatomy:
                draw.polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill=value)
    return canvas


def _noise(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), dtype=np.uint8))


@pytest.fixture
def root(tmp_path):
    """The published layout in small: a.png and its byte copy c.png, b.png, unlabelled e.png and g.png."""
    root = tmp_path / "kidneyUS"
    images = root / "images"
    images.mkdir(parents=True)
    for name, seed in [("a", 1), ("b", 2), ("e", 3), ("g", 4)]:
        _noise(seed).save(images / f"{name}.png")
    shutil.copyfile(images / "a.png", images / "c.png")  # the data set's duplicates: same bytes, other name

    rows_1 = _rows("a.png", SHAPES_A) + _rows("b.png", SHAPES_B) + _rows("c.png", SHAPES_B)
    rows_1.append(
        ["g.png", 1234, "{}", 0, 0, "{}", "{}"]
    )  # VIA's placeholder row of an image without regions
    _write_csv(root / "labels" / "reviewed_labels_1.csv", rows_1)
    rows_2 = _rows("b.png", SHAPES_B_SONOGRAPHER_2) + _rows("e.png", SHAPES_E_SONOGRAPHER_2)
    _write_csv(root / "labels" / "reviewed_labels_2.csv", rows_2)

    for target in ("capsule", "regions"):
        folder = root / "labels" / "reviewed_masks_1" / target
        folder.mkdir(parents=True)
        for name, shapes in [("a", SHAPES_A), ("b", SHAPES_B), ("c", SHAPES_B)]:
            _draw(shapes, target).save(folder / f"{name}.png")
    return root


def _prepare(root, tmp_path, **options):
    cfg = DataConfig(dataset="kidneyus", root=root, image_size=32, options=options)
    return prepare(cfg, Store(tmp_path / "cache"))


def _at(prepared, record_id, x, y):
    """Class of the prepared mask at native (64 px) coordinates x, y."""
    return int(prepared.masks[prepared.ids.index(record_id)][y // 2, x // 2])


def test_capsule_masks_from_polygons_and_duplicates_dropped(root, tmp_path):
    prepared = _prepare(root, tmp_path)
    # c.png is a byte copy of a.png (dropped); e.png has no rows; g.png only VIA's empty placeholder
    assert prepared.ids == ["a", "b"]
    assert prepared.groups == ["a", "b"]
    assert prepared.classes == ["background", "kidney"]
    assert prepared.images.shape == (2, 1, 32, 32)
    assert (
        _at(prepared, "a", 32, 32) == 1 and _at(prepared, "a", 0, 0) == 0 and _at(prepared, "a", 62, 62) == 0
    )
    assert _at(prepared, "b", 16, 16) == 1 and _at(prepared, "b", 40, 40) == 0
    # each record holds its own image, grey values scaled from 0..255 to [0, 1]
    for i, name in enumerate(prepared.ids):
        native = np.asarray(Image.open(root / "images" / f"{name}.png"), np.float32) / 255
        assert abs(float(prepared.images[i].astype(np.float32).mean()) - native.mean()) < 0.02
    assert float(prepared.images.min()) >= 0 and float(prepared.images.max()) <= 1


def test_regions_layer_inner_structures_on_top(root, tmp_path):
    prepared = _prepare(root, tmp_path, target="regions")
    # b.png has only a capsule: nothing to learn regions from
    assert prepared.ids == ["a"]
    assert prepared.classes == ["background", "central_echo_complex", "medulla", "cortex"]
    assert _at(prepared, "a", 32, 32) == 1  # central echo complex, inside medulla and cortex
    assert _at(prepared, "a", 24, 24) == 2  # medulla, inside cortex
    assert _at(prepared, "a", 14, 14) == 3  # cortex only
    assert _at(prepared, "a", 9, 9) == 0  # inside the capsule but in no region polygon
    assert set(np.unique(prepared.masks)) == {0, 1, 2, 3}


def test_sonographer_2_reads_the_other_csv(root, tmp_path):
    prepared = _prepare(root, tmp_path, sonographer=2)
    assert prepared.ids == ["b", "e"]
    assert _at(prepared, "b", 46, 46) == 1 and _at(prepared, "b", 16, 16) == 0  # sonographer 2's square
    regions = _prepare(root, tmp_path, sonographer=2, target="regions")
    assert regions.ids == ["e"] and _at(regions, "e", 30, 44) == 3


def test_published_csv_quoting(root, tmp_path):
    # reviewed_labels_2.csv as published leaves region_attributes unquoted: {"Anatomy":"Capsule"}
    shape = '"{""name"":""polygon"",""all_points_x"":[4,30,30,4],""all_points_y"":[4,4,30,30]}"'
    quality = '"{""Quality"":""Fair"",""View"":""Transverse"",""Comments"":""n/a""}"'
    lines = [",".join(HEADER), f'b.png,1234,{quality},1,0,{shape},{{"Anatomy":"Capsule"}}']
    (root / "labels" / "reviewed_labels_2.csv").write_text("\n".join(lines) + "\n")
    prepared = _prepare(root, tmp_path, sonographer=2)
    assert prepared.ids == ["b"] and _at(prepared, "b", 16, 16) == 1 and _at(prepared, "b", 40, 40) == 0


@pytest.mark.parametrize("target", ["capsule", "regions"])
def test_provided_masks_equal_rasterised_polygons(root, tmp_path, target):
    from_polygons = _prepare(root, tmp_path, target=target)
    from_masks = _prepare(root, tmp_path, target=target, source="masks")
    assert from_masks.ids == from_polygons.ids
    assert np.array_equal(np.asarray(from_masks.masks), np.asarray(from_polygons.masks))
    assert np.array_equal(np.asarray(from_masks.images), np.asarray(from_polygons.images))


def test_scan_is_lazy_and_a_corrupt_image_names_itself(root, tmp_path):
    (root / "images" / "b.png").write_bytes(b"not a png")
    adapter = get_adapter("kidneyus")
    records = adapter.scan(root, adapter.options())  # lists and parses only: no image decoded yet
    assert [r.id for r in records] == ["a", "b"]
    assert root / "labels" / "reviewed_labels_1.csv" in records[0].sources
    assert root / "images" / "a.png" in records[0].sources
    with pytest.raises(DataError) as exc:
        records[1].read()
    assert str(root / "images" / "b.png") in str(exc.value)


def test_missing_provided_mask_names_the_file(root, tmp_path):
    (root / "labels" / "reviewed_masks_1" / "capsule" / "b.png").unlink()
    with pytest.raises(DataError) as exc:
        _prepare(root, tmp_path, source="masks")
    _one_line(exc, root / "labels" / "reviewed_masks_1" / "capsule" / "b.png")


def test_provided_region_mask_with_foreign_values_names_the_file(root, tmp_path):
    bad = root / "labels" / "reviewed_masks_1" / "regions" / "a.png"
    Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8)).save(bad)
    with pytest.raises(DataError) as exc:
        _prepare(root, tmp_path, target="regions", source="masks")
    _one_line(exc, bad)


def _one_line(exc, *parts):
    message = str(exc.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, message


BAD_ROWS = {
    "unparsable JSON": (
        ["a.png", 1, "{}", 1, 0, '{"name": "polygon", "all_points_x": [1,', '{"Anatomy": "Capsule"}'],
        "region_shape_attributes",
    ),
    "not a polygon": (
        _row("a.png", {"name": "rect", "x": 1, "y": 1, "width": 5, "height": 5}, "Capsule"),
        "region_shape_attributes",
    ),
    "two points": (
        _row("a.png", {"name": "polygon", "all_points_x": [1, 9], "all_points_y": [1, 9]}, "Capsule"),
        "region_shape_attributes",
    ),
    "x/y lengths differ": (
        _row(
            "a.png", {"name": "polygon", "all_points_x": [1, 9, 9, 1], "all_points_y": [1, 1, 9]}, "Capsule"
        ),
        "region_shape_attributes",
    ),
    "unknown anatomy": (_row("a.png", _square((1, 1, 9, 9)), "Liver"), "region_attributes"),
    "no anatomy": (_row("a.png", _square((1, 1, 9, 9)), None), "region_attributes"),
    "unknown image": (_row("zz.png", _square((1, 1, 9, 9)), "Capsule"), "filename"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_csv_row_names_file_line_and_field(root, tmp_path, case):
    row, field = BAD_ROWS[case]
    csv_path = root / "labels" / "reviewed_labels_1.csv"
    _write_csv(
        csv_path, _rows("b.png", SHAPES_B) + [row]
    )  # header is line 1, b.png line 2, the bad row line 3
    with pytest.raises(DataError) as exc:
        _prepare(root, tmp_path)
    _one_line(exc, csv_path, "line 3", field)


def test_csv_missing_columns(root, tmp_path):
    csv_path = root / "labels" / "reviewed_labels_1.csv"
    _write_csv(csv_path, [row[:6] for row in _rows("b.png", SHAPES_B)], header=HEADER[:6])
    with pytest.raises(DataError) as exc:
        _prepare(root, tmp_path)
    _one_line(exc, csv_path, "line 1", "region_attributes")


def test_missing_root_images_or_csv_explain_the_layout(root, tmp_path):
    with pytest.raises(DataError) as exc:
        _prepare(tmp_path / "nowhere", tmp_path)
    _one_line(exc, tmp_path / "nowhere", "https://rsingla.ca/kidneyUS/", "images/*.png")

    (root / "labels" / "reviewed_labels_2.csv").unlink()
    with pytest.raises(DataError) as exc:
        _prepare(root, tmp_path, sonographer=2)
    _one_line(exc, root / "labels" / "reviewed_labels_2.csv", "https://rsingla.ca/kidneyUS/")

    shutil.rmtree(root / "images")
    with pytest.raises(DataError) as exc:
        _prepare(root, tmp_path)
    _one_line(exc, root / "images", "https://rsingla.ca/kidneyUS/")


def test_unknown_option_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        validate({"data": {"dataset": "kidneyus", "root": str(tmp_path), "options": {"sonographr": 2}}})
    assert exc.value.problems == ["data.options.sonographr: unknown key"]
    with pytest.raises(ConfigError) as exc:
        validate({"data": {"dataset": "kidneyus", "root": str(tmp_path), "options": {"sonographer": 3}}})
    assert exc.value.problems[0].startswith("data.options.sonographer:")
