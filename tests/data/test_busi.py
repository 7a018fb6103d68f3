"""The busi adapter on a small copy of its layout: spaces and parentheses in names, multi-part masks."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tskd_tune.data.busi  # noqa: F401  (registers the adapter)
from tests.conftest import one_line_error
from tskd_tune.cache import Store
from tskd_tune.config import DataConfig, validate
from tskd_tune.data.prepare import prepare
from tskd_tune.errors import ConfigError, DataError

S = 32


def _box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((S, S), np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_busi(parent: Path) -> Path:
    """Dataset_BUSI_with_GT under ``parent``: 2 benign (one with a 2-part mask), 1 malignant, 1 normal."""
    top = parent / "Dataset_BUSI_with_GT"
    rng = np.random.default_rng(0)
    for cat, n in (("benign", 2), ("malignant", 1), ("normal", 1)):
        for i in range(1, n + 1):
            grey = rng.integers(0, 256, (S, S), dtype=np.uint8)
            # the real images are greyscale content saved as RGB PNGs
            _write(top / cat / f"{cat} ({i}).png", np.stack([grey] * 3, axis=2))
            _write(
                top / cat / f"{cat} ({i})_mask.png",
                np.zeros((S, S), np.uint8) if cat == "normal" else _box(2, 8, 2, 8),
            )
    _write(top / "benign" / "benign (1)_mask_1.png", _box(20, 26, 20, 26))  # second lesion, only in part 1
    (top / "benign" / "._benign (1).png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (top / "normal" / "Thumbs.db").write_bytes(b"junk")
    return top


def _prepare(tmp_path: Path, root: Path, **fields):
    data = DataConfig(dataset="busi", root=root, image_size=S, **fields)
    return prepare(data, Store(tmp_path / "cache"))


def _mask(prepared, rid: str) -> np.ndarray:
    return np.asarray(prepared.masks[prepared.ids.index(rid)])


def test_lesion_target_merges_mask_parts(tmp_path):
    make_busi(tmp_path)
    p = _prepare(tmp_path, tmp_path)
    assert sorted(p.ids) == [
        "benign/benign (1)",
        "benign/benign (2)",
        "malignant/malignant (1)",
        "normal/normal (1)",
    ]
    assert p.groups == p.ids
    assert p.classes == ["background", "lesion"]
    assert p.images.shape == (4, 1, S, S)
    m = _mask(p, "benign/benign (1)")
    assert m[4, 4] == 1 and m[22, 22] == 1  # main mask and the pixel only in _mask_1
    assert m.sum() == 2 * 36
    assert _mask(p, "malignant/malignant (1)")[4, 4] == 1
    assert _mask(p, "normal/normal (1)").max() == 0


def test_malignancy_target_labels_lesions_by_folder(tmp_path):
    make_busi(tmp_path)
    p = _prepare(tmp_path, tmp_path, options={"target": "malignancy"})
    assert p.classes == ["background", "benign", "malignant"]
    assert set(np.unique(_mask(p, "benign/benign (1)"))) == {0, 1}
    assert _mask(p, "benign/benign (1)")[22, 22] == 1
    assert set(np.unique(_mask(p, "malignant/malignant (1)"))) == {0, 2}


def test_root_may_be_the_dataset_folder_and_normal_optional(tmp_path):
    top = make_busi(tmp_path)
    for f in (top / "normal").iterdir():
        f.unlink()
    (top / "normal").rmdir()
    p = _prepare(tmp_path, top, options={"include_normal": False})
    assert len(p) == 3 and not any(i.startswith("normal/") for i in p.ids)
    with pytest.raises(DataError, match="normal: not found"):
        _prepare(tmp_path, top)


def test_new_mask_part_rebuilds_cache(tmp_path):
    top = make_busi(tmp_path)
    assert _mask(_prepare(tmp_path, tmp_path), "benign/benign (2)")[15, 15] == 0
    _write(top / "benign" / "benign (2)_mask_1.png", _box(12, 18, 12, 18))
    p = _prepare(tmp_path, tmp_path)
    assert not p.cached
    assert _mask(p, "benign/benign (2)")[15, 15] == 1


def test_missing_root_names_layout(tmp_path):
    msg = one_line_error(_prepare, tmp_path, tmp_path / "nowhere")
    assert (
        "nowhere" in msg
        and "Dataset_BUSI_with_GT/{benign,malignant,normal}" in msg
        and "scholar.cu.edu.eg" in msg
    )


def test_image_without_mask(tmp_path):
    top = make_busi(tmp_path)
    (top / "benign" / "benign (2)_mask.png").unlink()
    msg = one_line_error(_prepare, tmp_path, tmp_path)
    assert "benign (2).png" in msg and "no mask" in msg


def test_only_extra_part_is_not_a_mask(tmp_path):
    top = make_busi(tmp_path)
    (top / "benign" / "benign (1)_mask.png").unlink()
    assert "benign (1).png" in one_line_error(_prepare, tmp_path, tmp_path)


def test_mask_without_image(tmp_path):
    top = make_busi(tmp_path)
    (top / "malignant" / "malignant (1).png").unlink()
    msg = one_line_error(_prepare, tmp_path, tmp_path)
    assert "malignant (1)_mask.png" in msg and "without an image" in msg


def test_duplicate_names(tmp_path):
    top = make_busi(tmp_path)
    _write(top / "benign" / "benign (2).jpg", np.zeros((S, S), np.uint8))
    msg = one_line_error(_prepare, tmp_path, tmp_path)
    assert "benign" in msg and "duplicate names benign (2)" in msg


def test_mask_part_of_other_size(tmp_path):
    top = make_busi(tmp_path)
    _write(top / "benign" / "benign (1)_mask_1.png", np.zeros((S, S + 4), np.uint8))
    msg = one_line_error(_prepare, tmp_path, tmp_path)
    assert "benign (1)_mask_1.png" in msg and "size" in msg


def test_corrupt_image_names_file(tmp_path):
    top = make_busi(tmp_path)
    (top / "malignant" / "malignant (1).png").write_bytes(b"not a png")
    msg = one_line_error(_prepare, tmp_path, tmp_path)
    assert "malignant (1).png" in msg and "cannot decode" in msg


def test_config_checks(tmp_path):
    ok = {"dataset": "busi", "root": str(tmp_path), "classes": ["bg", "benign", "malignant"]}
    validate({"data": {**ok, "options": {"target": "malignancy"}}})
    with pytest.raises(ConfigError) as info:
        validate({"data": {**ok, "options": {"targt": "lesion"}}})
    assert any(p.startswith("data.options.targt") for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        validate({"data": ok})  # lesion target: 2 classes, 3 given
    assert any(p.startswith("data.classes:") for p in info.value.problems)
    with pytest.raises(ConfigError) as info:
        validate({"data": {"dataset": "busi"}})
    assert any(p.startswith("data.root:") and "Dataset_BUSI_with_GT" in p for p in info.value.problems)
