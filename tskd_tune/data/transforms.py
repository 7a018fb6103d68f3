"""Training-time augmentation from MONAI dictionary transforms, configured by ``data.augment``."""

from __future__ import annotations

import math

from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandShiftIntensityd,
)

from tskd_tune.config import AugmentConfig

KEYS = ("image", "label")


def train_transforms(aug: AugmentConfig, seed: int = 0) -> Compose:
    """Random transforms for ``{"image": (C,H,W), "label": (1,H,W)}`` samples; geometry moves both alike."""
    ts = []
    if aug.enabled:
        if aug.flip:
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
