"""Training-time augmentation from MONAI dictionary transforms, configured by ``data.augment``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tskd_tune.config.schema import AugmentConfig

if TYPE_CHECKING:
    from monai.transforms import Compose

KEYS = ("image", "label")


def train_transforms(aug: AugmentConfig, seed: int = 0, label_swap: Sequence[int] | None = None) -> Compose:
    """Random transforms for ``{"image": (C,H,W), "label": (1,H,W)}`` samples; geometry moves both alike.

    ``label_swap``: the class each class becomes when a sample is flipped (left and right organs trade
    places, see :func:`tskd_tune.data.lateral.flip_plan`); None: flips keep the labels."""
    # imported here: MONAI loads every one of its subpackages on import (about 8 s on 2 cores), which a
    # search's driver, importing this module through the method registry, never needs
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandLambdad,
        RandShiftIntensityd,
    )

    ts = []
    if aug.enabled:
        if aug.flip and label_swap is not None:
            # one coin for both keys, as RandFlipd draws it, so the label swaps exactly when it is flipped
            lut = torch.as_tensor(label_swap, dtype=torch.float32)
            ts.append(
                RandLambdad(keys=KEYS, func=(_mirror, partial(_mirror_swapped, lut=lut)), prob=aug.prob)
            )
        elif aug.flip:
            ts.append(RandFlipd(keys=KEYS, prob=aug.prob, spatial_axis=1))
        if aug.rotate_deg > 0 or aug.scale > 0:
            ts.append(
                RandAffined(
                    keys=KEYS,
                    prob=aug.prob,
                    rotate_range=(math.radians(aug.rotate_deg),),
                    scale_range=(aug.scale, aug.scale),
                    mode=("bilinear", "nearest"),
                    padding_mode="zeros",
                )
            )
        if aug.intensity > 0:
            ts.append(RandShiftIntensityd(keys="image", offsets=aug.intensity, prob=aug.prob))
            ts.append(
                RandAdjustContrastd(keys="image", gamma=(1 - aug.intensity, 1 + aug.intensity), prob=aug.prob)
            )
        if aug.noise_std > 0:
            ts.append(RandGaussianNoised(keys="image", std=aug.noise_std, prob=aug.prob))
    compose = Compose(ts)
    compose.set_random_state(seed=seed)
    return compose


def _mirror(t: torch.Tensor) -> torch.Tensor:
    return torch.flip(torch.as_tensor(t), dims=(-1,))


def _mirror_swapped(t: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    return lut[_mirror(t).round().long()]


def paired_transforms(
    x: torch.Tensor,
    target: torch.Tensor,
    aug: AugmentConfig,
    g: torch.Generator,
    *,
    channel_swap: Sequence[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random transforms of a batch of transfer images (B, C, H, W) and the teacher's outputs on them
    (B, K, h, w: soft labels or feature maps, any resolution), drawn from ``g``: flips, rotation and zoom move
    both alike (the teacher's outputs are taken to follow the image, as a segmentation does); intensity
    and noise change the images only. The same ``data.augment`` knobs as :func:`train_transforms`.

    ``channel_swap``: for class channels, the channel each flipped output channel is read from (left and
    right organs trade channels); None for outputs without class channels (feature maps)."""
    if not aug.enabled:
        return x, target
    n = x.shape[0]

    def coin() -> torch.Tensor:
        return torch.rand(n, generator=g) < aug.prob

    def uniform(half_width: float, on: torch.Tensor) -> torch.Tensor:
        return (torch.rand(n, generator=g) * 2 - 1) * half_width * on

    if aug.flip:
        f = coin().view(-1, 1, 1, 1)
        mirrored = target.flip(-1) if channel_swap is None else target.flip(-1)[:, list(channel_swap)]
        x, target = torch.where(f, x.flip(-1), x), torch.where(f, mirrored, target)
    if aug.rotate_deg > 0 or aug.scale > 0:
        on = coin()
        angle, zoom = uniform(math.radians(aug.rotate_deg), on), 1 + uniform(aug.scale, on)
        cos, sin, zero = torch.cos(angle) / zoom, torch.sin(angle) / zoom, torch.zeros(n)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)

        def warp(t: torch.Tensor, padding: str) -> torch.Tensor:
            grid = F.affine_grid(theta.to(t), list(t.shape), align_corners=False)
            return F.grid_sample(t, grid, mode="bilinear", padding_mode=padding, align_corners=False)

        # images pad with black, as the labelled images' transforms do; outputs repeat their edge (background)
        x, target = warp(x, "zeros"), warp(target, "border")
    if aug.intensity > 0:
        on = coin().view(-1, 1, 1, 1).float()
        gain = 1 + uniform(aug.intensity, on.view(-1)).view(-1, 1, 1, 1)
        x = x * gain + uniform(aug.intensity, on.view(-1)).view(-1, 1, 1, 1)
    if aug.noise_std > 0:
        x = x + torch.randn(x.shape, generator=g) * aug.noise_std * coin().view(-1, 1, 1, 1)
    return x, target
