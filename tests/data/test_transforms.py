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


def test_paired_transforms_move_images_and_teacher_outputs_alike():
    import torch

    from tskd_tune.data.transforms import paired_transforms

    g = torch.Generator().manual_seed(0)
    # a smooth image (what segmentation outputs look like), so that resampling at two resolutions agrees
    x = torch.nn.functional.interpolate(torch.rand(6, 1, 4, 4, generator=g), size=32, mode="bilinear")
    geometry = AugmentConfig(prob=1.0, rotate_deg=30, scale=0.2, intensity=0.0, flip=True)
    xa, ta = paired_transforms(x, x.repeat(1, 3, 1, 1).clone(), geometry, g, channel_swap=None)
    # the outputs (here: copies of the image) went through the same flips, rotations and zooms
    inner = (slice(None), slice(None), slice(8, 24), slice(8, 24))  # away from the differently padded edges
    torch.testing.assert_close(ta[inner], xa.repeat(1, 3, 1, 1)[inner])
    assert not torch.allclose(xa, x)
    # intensity changes the images only
    xi, ti = paired_transforms(
        x, x.clone(), AugmentConfig(prob=1.0, rotate_deg=0, scale=0, flip=False), g, channel_swap=None
    )
    assert torch.equal(ti, x) and not torch.allclose(xi, x)
    # a coarser map (a 4x smaller grid of logits or features) gets the same geometry
    small = torch.nn.functional.avg_pool2d(x, 4)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    xs, ts = paired_transforms(x, small, geometry, g1, channel_swap=None)
    again, _ = paired_transforms(x, x.clone(), geometry, g2, channel_swap=None)
    torch.testing.assert_close(
        torch.nn.functional.avg_pool2d(xs, 4)[..., 3:5, 3:5], ts[..., 3:5, 3:5], atol=0.05, rtol=0
    )
    assert torch.equal(xs, again)  # drawn from the generator: reproducible
    off = AugmentConfig(enabled=False)
    assert paired_transforms(x, small, off, g, channel_swap=None)[1] is small
