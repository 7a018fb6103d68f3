import numpy as np
import pytest

from tskd_tune.cache import Store
from tskd_tune.config import DataConfig
from tskd_tune.data.prepare import make_splits, prepare, preprocess_pair
from tskd_tune.errors import DataError


def phantom(**kw) -> DataConfig:
    fields = {"dataset": "phantom", "image_size": 32, "labeled": 5} | kw
    fields["options"] = {"num_images": 40, "size": 48} | kw.get("options", {})
    return DataConfig(**fields)


def test_prepare_caches_and_memory_maps(tmp_path):
    store = Store(tmp_path)
    first = prepare(phantom(), store)
    second = prepare(phantom(), store)
    assert (first.cached, second.cached) == (False, True)
    assert first.images.shape == (40, 1, 32, 32) and first.masks.shape == (40, 32, 32)
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(np.asarray(first.images), np.asarray(second.images))
    assert first.classes == ["background", "central_echo_complex", "medulla", "cortex"]


def test_split_and_labeled_count_do_not_change_the_cache_key(tmp_path):
    store = Store(tmp_path)
    a = prepare(phantom(), store)
    b = prepare(phantom(seed=7, labeled=9), store)
    c = prepare(phantom(image_size=48), store)
    assert a.path == b.path and b.cached
    assert c.path != a.path


def test_channels_three_repeats_grey(tmp_path):
    p = prepare(phantom(channels=3), Store(tmp_path))
    assert p.images.shape[1] == 3
    assert np.array_equal(p.images[0, 0], p.images[0, 2])


def test_splits_are_disjoint_deterministic_and_nested(tmp_path):
    p = prepare(phantom(), Store(tmp_path))
    s = make_splits(p, phantom())
    parts = [set(s.labeled), set(s.unlabeled), set(s.val), set(s.test)]
    assert sum(map(len, parts)) == 40 and len(set().union(*parts)) == 40
    assert len(s.labeled) == 5 and 4 <= len(s.val) <= 8 and 4 <= len(s.test) <= 8
    again = make_splits(p, phantom())
    assert all(
        np.array_equal(getattr(s, k), getattr(again, k)) for k in ("labeled", "unlabeled", "val", "test")
    )
    more = make_splits(p, phantom(labeled=10))
    assert list(more.labeled[:5]) == list(s.labeled)  # N labelled is a prefix of N' > N
    assert np.array_equal(more.val, s.val) and np.array_equal(more.test, s.test)
    other = make_splits(p, phantom(seed=1))
    assert not np.array_equal(other.test, s.test)
    capped = make_splits(p, phantom(unlabeled=3))
    assert len(capped.unlabeled) == 3


def test_splits_never_divide_a_group(tmp_path):
    p = prepare(phantom(), Store(tmp_path))
    p.groups = [f"patient{i // 4}" for i in range(40)]  # 10 patients, 4 slices each
    s = make_splits(p, phantom())
    group_of = np.array(p.groups)
    seen = [set(group_of[idx]) for idx in (np.concatenate([s.labeled, s.unlabeled]), s.val, s.test)]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_too_many_labels_is_a_clear_error(tmp_path):
    p = prepare(phantom(), Store(tmp_path))
    with pytest.raises(
        DataError, match=r"data.labeled: must be <= \d+ \(training images of phantom\), got 500"
    ):
        make_splits(p, phantom(labeled=500))


def test_mask_size_mismatch_and_values_outside_class_map_name_the_file():
    data = phantom()
    classes = ["bg", "a", "b", "c"]
    with pytest.raises(DataError, match=r"^img7.png: mask size \(4, 5\) does not match image size \(4, 4\)$"):
        preprocess_pair(
            np.zeros((4, 4), np.float32), np.zeros((4, 5), np.uint8), data, 4, "img7.png", classes
        )
    with pytest.raises(
        DataError, match=r"^m.png: mask values \[9\] outside the class map \(0..3: bg, a, b, c\)$"
    ):
        preprocess_pair(np.zeros((4, 4), np.float32), np.full((4, 4), 9, np.uint8), data, 4, "m.png", classes)


def test_pad_keeps_aspect_ratio():
    data = DataConfig(image_size=16, resize="pad")
    image = np.ones((8, 16), np.float32)
    mask = np.ones((8, 16), np.uint8)
    img, m = preprocess_pair(image, mask, data, 2, "x", ["bg", "fg"])
    assert img.shape == (1, 16, 16) and m[0].max() == 0 and m[8].min() == 1 and m.sum() == 128
    stretched = preprocess_pair(
        image, mask, DataConfig(image_size=16, resize="stretch"), 2, "x", ["bg", "fg"]
    )[1]
    assert stretched.min() == 1


def test_a_failing_record_leaves_no_cache_entry(tmp_path):
    from tskd_tune.data.registry import ADAPTERS, Adapter, Options, Record, register

    def bad_read():
        raise DataError("broken.png: cannot decode image (OSError)")

    def scan(root, opts):
        ok = Record("ok", "g0", lambda: (np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8)))
        return [ok, Record("bad", "g1", bad_read)]

    register(Adapter("broken_test", Options, lambda o: ["bg", "fg"], scan, layout="x", needs_root=False))
    try:
        with pytest.raises(DataError, match="broken.png"):
            prepare(DataConfig(dataset="broken_test", image_size=16), Store(tmp_path))
        leftovers = [p for p in (tmp_path / "data").iterdir() if not p.name.endswith(".lock")]
        assert leftovers == []
    finally:
        del ADAPTERS["broken_test"]
