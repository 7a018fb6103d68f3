"""The mni152 adapter: real template slices from nilearn, read offline, grouped by slab."""

import socket

import numpy as np
import pytest

import tskd_tune.data.mni152  # noqa: F401  (registers the adapter)
from tskd_tune.cache import Store
from tskd_tune.config import DataConfig, validate
from tskd_tune.data.prepare import make_splits, prepare
from tskd_tune.errors import ConfigError, DataError

S = 32


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The template ships inside nilearn: any network access is a bug."""

    def refuse(*args, **kwargs):
        raise AssertionError("mni152 tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _prepare(tmp_path, **options):
    data = DataConfig(dataset="mni152", image_size=S, labeled=2, options=options)
    return data, prepare(data, Store(tmp_path / "cache"))


def test_axial_slices_classes_and_slabs(tmp_path):
    data, p = _prepare(tmp_path, stride=4, slab=8)
    assert p.classes == ["background", "grey_matter", "white_matter"]
    assert 25 <= len(p) <= 40  # 189 axial slices, every 4th, minus the near-empty ends
    assert set(np.unique(p.masks)) == {0, 1, 2}
    assert all((np.asarray(m) != 0).mean() > 0.02 for m in p.masks)  # no empty slices
    index = [int(i.removeprefix("mni152_axial_")) for i in p.ids]
    assert all(k % 4 == 0 for k in index) and index == sorted(index)
    assert p.groups == [f"mni152_axial_slab{k // 8:03d}" for k in index]
    assert max(np.unique(p.groups, return_counts=True)[1]) == 2  # two every-4th slices per 8-slice slab
    splits = make_splits(p, data)
    groups = np.array(p.groups)
    train = set(groups[np.r_[splits.labeled, splits.unlabeled]])
    assert not train & set(groups[splits.test]) and not train & set(groups[splits.val])
    assert p.images.dtype == np.float16 and float(np.min(p.images)) >= 0 and float(np.max(p.images)) <= 1


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_other_axes_are_upright(tmp_path, axis):
    _, p = _prepare(tmp_path, axis=axis, stride=12)
    assert p.ids[0].startswith(f"mni152_{axis}_")
    rows = np.nonzero((np.asarray(p.images[:, 0]) > 0.05).any(axis=(0, 2)))[0]
    # the template's field of view reaches ~40 mm above the brain but ends just below it
    assert rows[0] >= (S - 1 - rows[-1]) + 3


def test_min_foreground_and_threshold(tmp_path):
    _, all_slices = _prepare(tmp_path, stride=6, min_foreground=0)
    _, brain = _prepare(tmp_path, stride=6, min_foreground=0.3)
    assert len(brain) < len(all_slices) == len(range(0, 189, 6))
    _, strict = _prepare(tmp_path, stride=6, min_foreground=0, threshold=0.9)
    assert (np.asarray(strict.masks) != 0).sum() < (np.asarray(all_slices.masks) != 0).sum()
    with pytest.raises(DataError) as info:
        _prepare(tmp_path, min_foreground=0.9)
    assert "\n" not in str(info.value) and str(info.value).startswith("data.options.min_foreground:")


def test_config_checks():
    validate({"data": {"dataset": "mni152", "classes": ["bg", "gm", "wm"]}})
    with pytest.raises(ConfigError) as info:
        validate({"data": {"dataset": "mni152", "options": {"axis": "transverse", "slices": 3}}})
    assert {p.split(":")[0] for p in info.value.problems} == {"data.options.axis", "data.options.slices"}
    with pytest.raises(ConfigError) as info:
        validate({"data": {"dataset": "mni152", "classes": ["bg", "brain"]}})
    assert info.value.problems[0].startswith("data.classes:")


def test_volumes_are_nilearns_templates_without_importing_nilearn_datasets():
    """The adapter reads the templates with nibabel (nilearn.datasets imports scikit-learn, 1.5 s of a search's
    start); the volumes must be exactly what nilearn's loaders return, and scanning must not import it."""
    import subprocess
    import sys

    probe = (
        "import sys, tskd_tune.data.mni152 as m; m._scan(None, m.Mni152Options()); "
        "print('nilearn.datasets' in sys.modules, 'sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]

    from nilearn import datasets

    from tskd_tune.data.mni152 import _volumes

    ours = _volumes()
    theirs = (
        datasets.load_mni152_template(),
        datasets.load_mni152_gm_template(),
        datasets.load_mni152_wm_template(),
    )
    for mine, img in zip(ours, theirs, strict=True):
        ref = img.get_fdata(dtype=np.float32)
        assert mine.dtype == ref.dtype and mine.shape == ref.shape
        assert np.array_equal(mine, ref)
        assert mine.max() == 1.0
