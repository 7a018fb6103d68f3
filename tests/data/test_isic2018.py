"""The isic2018 adapter on a small copy of the task 1 layout, license files included."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tskd_tune.data.isic2018  # noqa: F401  (registers the adapter)
from tests.conftest import one_line_error
from tskd_tune.cache import Store
from tskd_tune.config import DataConfig, validate
from tskd_tune.data.prepare import prepare
from tskd_tune.errors import ConfigError, DataError

S = 32
INPUT = "ISIC2018_Task1-2_Training_Input"
TRUTH = "ISIC2018_Task1_Training_GroundTruth"


def make_isic(root: Path, n: int = 3, inputs: str = INPUT, truth: str = TRUTH) -> Path:
    """n reddish skin images with a square lesion each, plus the text files the release ships."""
    for folder in (inputs, truth):
        (root / folder).mkdir(parents=True)
        (root / folder / "LICENSE.txt").write_text("CC-BY-NC\n")
        (root / folder / "ATTRIBUTION.txt").write_text("ISIC Archive\n")
    for i in range(n):
        rgb = np.zeros((S, S, 3), np.uint8)
        rgb[...] = (200, 120, 60)
        Image.fromarray(rgb).save(root / inputs / f"ISIC_{i:07d}.jpg", quality=95)
        mask = np.zeros((S, S), np.uint8)
        mask[8:16, 8 + i : 16 + i] = 255
        Image.fromarray(mask).save(root / truth / f"ISIC_{i:07d}_segmentation.png")
    return root


def _prepare(tmp_path: Path, root: Path, **fields):
    return prepare(
        DataConfig(dataset="isic2018", root=root, image_size=S, **fields), Store(tmp_path / "cache")
    )


def test_reads_rgb_and_binary_masks(tmp_path):
    make_isic(tmp_path / "isic")
    p = _prepare(tmp_path, tmp_path / "isic", channels=3)
    assert p.ids == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert p.groups == p.ids
    assert p.classes == ["background", "lesion"]
    assert p.images.shape == (3, 3, S, S)
    r, g, b = (float(p.images[0, c].mean()) for c in range(3))
    assert r == pytest.approx(200 / 255, abs=0.03) and g == pytest.approx(120 / 255, abs=0.03) and r > g > b
    expected = np.zeros((S, S), np.uint8)
    expected[8:16, 10:18] = 1
    np.testing.assert_array_equal(p.masks[2], expected)


def test_grey_channel(tmp_path):
    make_isic(tmp_path / "isic")
    p = _prepare(tmp_path, tmp_path / "isic")
    assert p.images.shape == (3, 1, S, S)
    grey = (0.299 * 200 + 0.587 * 120 + 0.114 * 60) / 255
    assert float(p.images[0, 0].mean()) == pytest.approx(grey, abs=0.03)


def test_validation_split_folders(tmp_path):
    make_isic(
        tmp_path / "isic",
        n=2,
        inputs="ISIC2018_Task1-2_Validation_Input",
        truth="ISIC2018_Task1_Validation_GroundTruth",
    )
    assert len(_prepare(tmp_path, tmp_path / "isic", options={"split": "validation"})) == 2
    with pytest.raises(DataError, match=INPUT):
        _prepare(tmp_path, tmp_path / "isic")


def test_mask_value_not_0_255(tmp_path):
    root = make_isic(tmp_path / "isic")
    mask = np.zeros((S, S), np.uint8)
    mask[4, 4] = 128
    Image.fromarray(mask).save(root / TRUTH / "ISIC_0000001_segmentation.png")
    msg = one_line_error(_prepare, tmp_path, root)
    assert "ISIC_0000001_segmentation.png" in msg and "[128]" in msg


def test_image_without_mask(tmp_path):
    root = make_isic(tmp_path / "isic")
    (root / TRUTH / "ISIC_0000002_segmentation.png").unlink()
    msg = one_line_error(_prepare, tmp_path, root)
    assert "ISIC_0000002.jpg" in msg and "no mask" in msg


def test_mask_without_image_and_foreign_names(tmp_path):
    root = make_isic(tmp_path / "isic")
    (root / INPUT / "ISIC_0000000.jpg").unlink()
    assert "ISIC_0000000_segmentation.png" in one_line_error(_prepare, tmp_path, root)
    Image.fromarray(np.zeros((S, S), np.uint8)).save(root / TRUTH / "ISIC_0000009.png")
    assert "ISIC_0000009.png" in one_line_error(_prepare, tmp_path, root)


def test_duplicate_names(tmp_path):
    root = make_isic(tmp_path / "isic")
    Image.fromarray(np.zeros((S, S, 3), np.uint8)).save(root / INPUT / "ISIC_0000001.png")
    assert "duplicate names ISIC_0000001" in one_line_error(_prepare, tmp_path, root)


def test_missing_folders_name_layout(tmp_path):
    msg = one_line_error(_prepare, tmp_path, tmp_path / "nowhere")
    assert "nowhere" in msg and INPUT in msg and "challenge.isic-archive.com" in msg
    (tmp_path / "empty").mkdir()
    msg = one_line_error(_prepare, tmp_path, tmp_path / "empty")
    assert f"empty/{INPUT}: not found" in msg and "_segmentation.png" in msg


def test_config_checks(tmp_path):
    ok = {"dataset": "isic2018", "root": str(tmp_path)}
    validate({"data": {**ok, "classes": ["skin", "lesion"]}})
    with pytest.raises(ConfigError) as info:
        validate({"data": {**ok, "options": {"split": "train", "size": 3}}})
    assert {p.split(":")[0] for p in info.value.problems} == {"data.options.split", "data.options.size"}
    with pytest.raises(ConfigError) as info:
        validate({"data": {**ok, "classes": ["skin", "nevus", "melanoma"]}})
    assert any(p.startswith("data.classes:") for p in info.value.problems)
