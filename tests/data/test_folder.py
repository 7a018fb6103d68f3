"""The generic folder adapter: mask value mapping, patient grouping, image modes and layout errors."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tskd_tune.data.folder  # noqa: F401  (registers the adapter)
from tests.conftest import one_line_error
from tskd_tune.cache import Store
from tskd_tune.config import DataConfig, validate
from tskd_tune.data.prepare import make_splits, prepare
from tskd_tune.errors import ConfigError

S = 32
STEMS = ["patient1_a", "patient1_b", "patient2_a", "patient3_a", "patient3_b"]


def _save(path: Path, array: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def make_folder(root: Path, values=(0, 255), stems=STEMS) -> Path:
    """images/<stem>.png (grey ramps) and masks/<stem>.png holding the given raw values in bands."""
    for stem in stems:
        _save(root / "images" / f"{stem}.png", np.tile(np.arange(S, dtype=np.uint8) * 8, (S, 1)))
        mask = np.zeros((S, S), np.uint8)
        for k, v in enumerate(values):
            mask[k * S // len(values) : (k + 1) * S // len(values)] = v
        _save(root / "masks" / f"{stem}.png", mask)
    return root


def _prepare(tmp_path: Path, root: Path, **fields):
    return prepare(DataConfig(dataset="folder", root=root, image_size=S, **fields), Store(tmp_path / "cache"))


def test_mask_values_map_to_class_indices(tmp_path):
    root = make_folder(tmp_path / "ds", values=(0, 100, 200))
    p = _prepare(tmp_path, root, options={"mask_values": [0, 100, 200]})
    assert p.ids == STEMS and p.groups == STEMS
    assert p.classes == ["background", "class_100", "class_200"]
    assert p.masks[0, 0, 0] == 0 and p.masks[0, S // 2, 0] == 1 and p.masks[0, -1, 0] == 2


def test_binary_0_255(tmp_path):
    root = make_folder(tmp_path / "ds")
    p = _prepare(tmp_path, root, options={"mask_values": [0, 255]}, classes=["bg", "kidney"])
    assert p.classes == ["bg", "kidney"]
    assert set(np.unique(p.masks)) == {0, 1}
    # the unmapped default reads 255 as class index 255: refused, naming the mask
    msg = one_line_error(_prepare, tmp_path, root)
    assert "masks/patient1_a.png" in msg and "[255]" in msg


def test_value_not_in_mask_values(tmp_path):
    root = make_folder(tmp_path / "ds")
    bad = np.zeros((S, S), np.uint8)
    bad[3, 3], bad[4, 4] = 128, 255
    _save(root / "masks" / "patient2_a.png", bad)
    msg = one_line_error(_prepare, tmp_path, root, options={"mask_values": [0, 255]})
    assert "masks/patient2_a.png" in msg and "[128]" in msg and "mask_values" in msg


def test_index_masks_with_num_classes_and_palette(tmp_path):
    root = make_folder(tmp_path / "ds", values=(0, 1, 2, 3), stems=["a", "b", "c"])
    # a palette PNG whose colours are not grey: its indices are the classes
    rows = np.repeat(np.arange(4, dtype=np.uint8), S // 4)[:, None].repeat(S, axis=1)
    pal = Image.frombytes("P", (S, S), rows.tobytes())
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    pal.save(root / "masks" / "c.png")
    p = _prepare(tmp_path, root, options={"num_classes": 4})
    assert p.classes == ["background", "class_1", "class_2", "class_3"]
    for i in range(3):
        assert [p.masks[i, r, 0] for r in (0, 10, 18, 30)] == [0, 1, 2, 3]


def test_colour_mask_refused(tmp_path):
    root = make_folder(tmp_path / "ds", stems=["a", "b", "c"])
    rgb = np.zeros((S, S, 3), np.uint8)
    rgb[:4, :4] = (255, 0, 0)
    _save(root / "masks" / "b.png", rgb)
    msg = one_line_error(_prepare, tmp_path, root, options={"mask_values": [0, 255]})
    assert "masks/b.png" in msg and "colour mask" in msg


def test_group_pattern_groups_by_patient(tmp_path):
    root = make_folder(tmp_path / "ds")
    data = DataConfig(
        dataset="folder",
        root=root,
        image_size=S,
        labeled=1,
        options={"mask_values": [0, 255], "group_pattern": r"^(patient\d+)_"},
    )
    p = prepare(data, Store(tmp_path / "cache"))
    assert p.groups == ["patient1", "patient1", "patient2", "patient3", "patient3"]
    splits = make_splits(p, data)
    parts = [
        set(np.array(p.groups)[idx])
        for idx in (np.r_[splits.labeled, splits.unlabeled], splits.val, splits.test)
    ]
    assert sum(len(s) for s in parts) == 3  # each patient lies in exactly one split
    _save(root / "images" / "scan7.png", np.zeros((S, S), np.uint8))
    _save(root / "masks" / "scan7.png", np.zeros((S, S), np.uint8))
    msg = one_line_error(
        _prepare, tmp_path, root, options={"mask_values": [0, 255], "group_pattern": r"^(patient\d+)_"}
    )
    assert "images/scan7.png" in msg and "group_pattern" in msg


def test_rgb_mode_and_mask_suffix_and_mixed_suffixes(tmp_path):
    root = tmp_path / "ds"
    rgb = np.zeros((S, S, 3), np.uint8)
    rgb[...] = (30, 140, 250)
    for stem in ("x", "y", "z"):
        _save(root / "images" / f"{stem}.jpg", rgb, quality=95)
        _save(root / "masks" / f"{stem}_mask.tif", np.eye(S, dtype=np.uint8))
    (root / "images" / "notes.txt").write_text("not an image")
    p = _prepare(tmp_path, root, channels=3, options={"image_mode": "RGB", "mask_suffix": "_mask"})
    r, g, b = (float(p.images[0, c].mean()) for c in range(3))
    assert r < g < b and b == pytest.approx(250 / 255, abs=0.03)
    assert np.asarray(p.masks[1]).trace() == S


def test_16_bit_images_are_rescaled_not_clipped(tmp_path):
    root = make_folder(tmp_path / "ds", stems=["a", "b", "c"])
    _save(root / "images" / "b.png", np.tile(np.arange(S, dtype=np.uint16) * 120, (S, 1)))  # 12-bit range
    p = _prepare(tmp_path, root, options={"mask_values": [0, 255]})
    row = np.asarray(p.images[1, 0, 0], np.float32)
    assert row[0] == 0 and row[-1] == pytest.approx(1, abs=0.01) and np.all(np.diff(row) > 0)


def test_layout_errors(tmp_path):
    msg = one_line_error(_prepare, tmp_path, tmp_path / "nowhere")
    assert "nowhere: not found" in msg and "images/<name>" in msg
    root = make_folder(tmp_path / "ds", stems=["a", "b"])
    (root / "masks" / "b.png").unlink()
    assert "images/b.png: no mask" in one_line_error(_prepare, tmp_path, root)
    _save(root / "masks" / "b.png", np.zeros((S, S), np.uint8))
    _save(root / "masks" / "c.png", np.zeros((S, S), np.uint8))
    assert "masks/c.png: mask without an image" in one_line_error(_prepare, tmp_path, root)
    (root / "masks" / "c.png").unlink()
    _save(root / "images" / "a.jpg", np.zeros((S, S), np.uint8))
    assert "duplicate names a" in one_line_error(_prepare, tmp_path, root)


def test_config_checks(tmp_path):
    ok = {"dataset": "folder", "root": str(tmp_path)}
    validate({"data": {**ok, "classes": ["bg", "liver", "tumour"], "options": {"mask_values": [0, 1, 2]}}})
    cases = {
        "data.options.colour": {"colour": True},
        "data.options.group_pattern": {"group_pattern": "^(patient"},
        "data.options.mask_values": {"mask_values": [0, 0]},
        "data.options": {"mask_values": [0, 255], "num_classes": 3},
    }
    for prefix, options in cases.items():
        with pytest.raises(ConfigError) as info:
            validate({"data": {**ok, "options": options}})
        assert info.value.problems[0].startswith(prefix + ":"), info.value.problems
    with pytest.raises(ConfigError) as info:
        validate({"data": {**ok, "classes": ["bg", "liver", "tumour"]}})  # default: 2 classes
    assert info.value.problems[0].startswith("data.classes:")
    validate({"data": {**ok, "classes": ["bg", "liver", "tumour"], "options": {"num_classes": 3}}})
