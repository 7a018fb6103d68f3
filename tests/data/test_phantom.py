import numpy as np
import torch

from tskd_tune.data.phantom import PhantomOptions, render


def test_deterministic_per_index_and_seed():
    a_img, a_mask = render(3, PhantomOptions(seed=1))
    b_img, b_mask = render(3, PhantomOptions(seed=1, num_images=999))  # more images: same image 3
    c_img, _ = render(3, PhantomOptions(seed=2))
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img)


def test_all_regions_present_and_image_in_range():
    for i in range(10):
        img, mask = render(i, PhantomOptions())
        assert img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1
        assert set(np.unique(mask)) == {0, 1, 2, 3}
        kidney = mask > 0
        # the central echo complex is brighter than the cortex, the medulla darker: visible, but noisy
        assert img[mask == 1].mean() > img[mask == 3].mean() > img[mask == 2].mean()
        assert 0.03 < kidney.mean() < 0.35


def test_capsule_target_is_the_union_of_regions():
    _, regions = render(5, PhantomOptions(target="regions"))
    _, capsule = render(5, PhantomOptions(target="capsule"))
    assert np.array_equal(capsule == 1, regions > 0)


def test_nothing_is_labelled_outside_the_sector():
    img, mask = render(0, PhantomOptions())
    assert img[0, 0] == 0 and mask[0, 0] == 0 and mask[img == 0].max() == 0


def _train_and_score(n_train: int, steps: int = 300, size: int = 48) -> float:
    """Train a small MONAI U-Net on n_train phantom images; mean foreground Dice on 40 held-out ones."""
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric
    from monai.networks.nets import UNet
    from PIL import Image

    def batch(indices):
        imgs, masks = [], []
        for i in indices:
            im, m = render(int(i), PhantomOptions(size=96))
            imgs.append(np.asarray(Image.fromarray(im, mode="F").resize((size, size), Image.BILINEAR)))
            masks.append(np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST)))
        return torch.tensor(np.stack(imgs))[:, None], torch.tensor(np.stack(masks)).long()[:, None]

    torch.manual_seed(0)
    x_tr, y_tr = batch(range(n_train))
    x_te, y_te = batch(range(1000, 1040))
    net = UNet(2, 1, 4, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (16,), generator=g)
        opt.zero_grad()
        loss_fn(net(x_tr[idx]), y_tr[idx]).backward()
        opt.step()
    with torch.no_grad():
        pred = net(x_te).argmax(1, keepdim=True)
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
    one_hot = lambda t: torch.nn.functional.one_hot(t[:, 0], 4).permute(0, 3, 1, 2)  # noqa: E731
    return float(metric(one_hot(pred), one_hot(y_te)).nanmean())


def test_ten_labels_are_clearly_worse_than_two_hundred():
    few, many = _train_and_score(10), _train_and_score(200)
    assert many > few + 0.15, (few, many)
