import numpy as np
import torch

from tskd_tune.config import AugmentConfig
from tskd_tune.data.phantom import PhantomOptions, render
from tskd_tune.data.transforms import train_transforms


def sample():
    img, mask = render(0, PhantomOptions(size=64))
    return {"image": torch.tensor(img)[None], "label": torch.tensor(mask)[None]}


def test_augmentation_keeps_shapes_and_label_values():
    t = train_transforms(AugmentConfig(prob=1.0, noise_std=0.05), seed=0)
    out = t(sample())
    assert out["image"].shape == (1, 64, 64) and out["label"].shape == (1, 64, 64)
    assert set(np.unique(np.asarray(out["label"]))) <= {0, 1, 2, 3}  # nearest: no blended labels
    assert not torch.equal(torch.as_tensor(out["image"]), sample()["image"])


def test_augmentation_is_seeded():
    a = train_transforms(AugmentConfig(prob=1.0), seed=3)(sample())
    b = train_transforms(AugmentConfig(prob=1.0), seed=3)(sample())
    assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))


def test_disabled_augmentation_is_identity():
    out = train_transforms(AugmentConfig(enabled=False))(sample())
    assert torch.equal(torch.as_tensor(out["image"]), sample()["image"])
