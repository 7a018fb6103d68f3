"""The kvasir adapter on a small Kvasir-SEG copy whose JPEG masks carry real compression noise."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tskd_tune.data.kvasir  # noqa: F401  (registers the adapter)
from tests.conftest import one_line_error
from tskd_tune.cache import Store
from tskd_tune.config import DataConfig, validate
from tskd_tune.data.prepare import prepare
from tskd_tune.errors import ConfigError

S = 48
NAMES = ["cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4", "cju0s690hkp960855tjuaqvv0"]


def _disk(radius: float) -> np.ndarray:
    y, x = np.mgrid[0:S, 0:S]
    return np.hypot(y - S / 2, x - S / 2) < radius


def make_kvasir(parent: Path) -> Path:
    """Kvasir-SEG/{images,masks} under ``parent``: pinkish images, disk-shaped polyps as lossy JPEG masks."""
    top = parent / "Kvasir-SEG"
    (top / "images").mkdir(parents=True)
    (top / "masks").mkdir()
    (top / "kavsir_bboxes.json").write_text("{}")
    for i, name in enumerate(NAMES):
        rgb = np.zeros((S, S, 3), np.uint8)
        rgb[...] = (180, 90, 80)
        Image.fromarray(rgb).save(top / "images" / f"{name}.jpg")
        # the release's masks are RGB JPEGs of a white polyp on black
        mask = np.repeat((_disk(10 + 2 * i) * 255).astype(np.uint8)[..., None], 3, axis=2)
        Image.fromarray(mask).save(top / "masks" / f"{name}.jpg", quality=60)
    return top


def _prepare(tmp_path: Path, root: Path, **fields):
    return prepare(DataConfig(dataset="kvasir", root=root, image_size=S, **fields), Store(tmp_path / "cache"))


def test_jpeg_masks_are_thresholded(tmp_path):
    top = make_kvasir(tmp_path)
    raw = np.asarray(Image.open(top / "masks" / f"{NAMES[2]}.jpg").convert("L"))
    assert len(np.unique(raw)) > 2  # the fixture really has compression noise
    p = _prepare(tmp_path, tmp_path)
    assert p.ids == NAMES and p.groups == NAMES
    assert p.classes == ["background", "polyp"]
    for i in range(3):
        mask = np.asarray(p.masks[i])
        assert set(np.unique(mask)) == {0, 1}
        truth = _disk(10 + 2 * i)
        assert (mask != truth).mean() < 0.02  # at most a ring of edge pixels differs
        assert mask[S // 2, S // 2] == 1 and mask[0, 0] == 0


def test_rgb_preserved_and_root_is_folder_itself(tmp_path):
    top = make_kvasir(tmp_path)
    p = _prepare(tmp_path, top, channels=3)
    assert p.images.shape == (3, 3, S, S)
    r, g, b = (float(p.images[0, c].mean()) for c in range(3))
    assert r == pytest.approx(180 / 255, abs=0.03) and r > g > b


def test_image_without_mask(tmp_path):
    top = make_kvasir(tmp_path)
    (top / "masks" / f"{NAMES[1]}.jpg").unlink()
    msg = one_line_error(_prepare, tmp_path, tmp_path)
    assert f"images/{NAMES[1]}.jpg" in msg and "no mask" in msg


def test_mask_without_image(tmp_path):
    top = make_kvasir(tmp_path)
    (top / "images" / f"{NAMES[0]}.jpg").unlink()
    msg = one_line_error(_prepare, tmp_path, tmp_path)
    assert f"masks/{NAMES[0]}.jpg" in msg and "without an image" in msg


def test_duplicate_names(tmp_path):
    top = make_kvasir(tmp_path)
    Image.fromarray(np.zeros((S, S), np.uint8)).save(top / "masks" / f"{NAMES[0]}.png")
    assert f"duplicate names {NAMES[0]}" in one_line_error(_prepare, tmp_path, tmp_path)


def test_mask_of_other_size(tmp_path):
    top = make_kvasir(tmp_path)
    Image.fromarray(np.zeros((S, S + 8), np.uint8)).save(top / "masks" / f"{NAMES[1]}.jpg")
    msg = one_line_error(_prepare, tmp_path, tmp_path)
    assert f"masks/{NAMES[1]}.jpg" in msg and "size" in msg


def test_missing_folders_name_layout(tmp_path):
    msg = one_line_error(_prepare, tmp_path, tmp_path / "nowhere")
    assert "nowhere: not found" in msg and "masks/<name>.jpg" in msg and "datasets.simula.no" in msg
    (tmp_path / "Kvasir-SEG" / "images").mkdir(parents=True)
    assert "Kvasir-SEG/masks: not found" in one_line_error(_prepare, tmp_path, tmp_path)


def test_config_checks(tmp_path):
    ok = {"dataset": "kvasir", "root": str(tmp_path)}
    validate({"data": ok})
    with pytest.raises(ConfigError) as info:
        validate({"data": {**ok, "options": {"threshold": 100}}})
    assert info.value.problems[0].startswith("data.options.threshold")
    with pytest.raises(ConfigError) as info:
        validate({"data": {**ok, "classes": ["polyp"]}})
    assert info.value.problems[0].startswith("data.classes:")
