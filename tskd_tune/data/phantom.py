"""`phantom`: the embedded default, a seeded generator of kidney-ultrasound-like images with exact masks.

Each image is a sector (fan) scan of soft tissue with multiplicative speckle, depth attenuation and
log compression, holding a kidney at a random pose and size: a bright capsule, a cortex only slightly
darker than the surrounding tissue, dark medullary pyramids and a bright central echo complex.
Classes follow KidneyUS's region masks (1 central echo complex, 2 medulla, 3 cortex), or with
``target: capsule`` the whole kidney. Image ``i`` depends only on (seed, i), so adding images never
changes the existing ones.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field
from scipy.ndimage import gaussian_filter

from tskd_tune.data.registry import Adapter, Options, Record, register

REGION_CLASSES = ["background", "central_echo_complex", "medulla", "cortex"]
CAPSULE_CLASSES = ["background", "kidney"]


class PhantomOptions(Options):
    target: Literal["regions", "capsule"] = "regions"
    """`regions`: central echo complex, medulla, cortex; `capsule`: the whole kidney."""
    num_images: int = Field(300, ge=4, le=100_000)
    """Number of images generated."""
    size: int = Field(128, ge=32, le=1024)
    """Native side length in pixels (before data.image_size resizing)."""
    seed: int = 0
    """Generator seed (independent of data.seed, which only drives the split)."""
    speckle: float = Field(1.0, ge=0, le=3)
    """Speckle strength (0: none, 1: fully developed speckle)."""


def render(index: int, opts: PhantomOptions) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of the phantom: (float32 image in [0, 1], uint8 mask), both size x size."""
    rng = np.random.default_rng([opts.seed, index])
    n = opts.size
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1)  # y is depth, 0 at the probe

    # tissue reflectivity: smooth random texture around a mean level
    tissue = 0.45 + 0.12 * _smooth_noise(rng, n, sigma=n / 12)
    tissue += 0.06 * _smooth_noise(rng, n, sigma=n / 40)

    # kidney geometry in its own rotated frame; the outline wobbles so no two kidneys are ellipses alike
    cy, cx = rng.uniform(0.42, 0.62), rng.uniform(0.35, 0.65)
    a, b = rng.uniform(0.2, 0.32), rng.uniform(0.11, 0.18)
    theta = rng.uniform(-0.6, 0.6)
    u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
    v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
    phi = np.arctan2(v / b, u / a)
    wobble = 1 + 0.06 * np.sin(2 * phi + rng.uniform(0, 6.3)) + 0.04 * np.sin(3 * phi + rng.uniform(0, 6.3))
    r = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble

    kidney = r < 1.0
    capsule = (r >= 0.93) & (r < 1.07)
    # central echo complex: an off-centre, elongated sinus region inside the kidney
    su, sv = rng.uniform(-0.1, 0.1) * a, rng.uniform(-0.15, 0.15) * b
    rs = np.sqrt(((u - su) / (0.5 * a)) ** 2 + ((v - sv) / (0.38 * b)) ** 2)
    rs /= 1 + 0.12 * np.sin(3 * np.arctan2(v - sv, u - su) + rng.uniform(0, 6.3))
    cec = (rs < 1.0) & kidney
    # medullary pyramids: small dark ellipses on a ring between sinus and cortex
    medulla = np.zeros_like(kidney)
    for k in range(int(rng.integers(4, 8))):
        ang = 2 * np.pi * k / 7 + rng.uniform(-0.3, 0.3)
        pu, pv = 0.62 * a * np.cos(ang), 0.6 * b * np.sin(ang)
        pr = rng.uniform(0.2, 0.3) * b
        medulla |= ((u - pu) / (pr * 1.3)) ** 2 + ((v - pv) / pr) ** 2 < 1.0
    medulla &= kidney & ~cec
    cortex = kidney & ~cec & ~medulla

    gain = rng.uniform(0.8, 1.1)
    refl = tissue.copy()
    refl[cortex] = (0.36 + rng.uniform(-0.04, 0.04)) + 0.08 * _smooth_noise(rng, n, n / 30)[cortex]
    refl[medulla] = 0.16 + rng.uniform(-0.03, 0.03)
    refl[cec] = 0.72 + 0.15 * _smooth_noise(rng, n, n / 25)[cec]
    refl[capsule] = np.maximum(refl[capsule], 0.8)
    refl = gaussian_filter(refl, sigma=0.6) * gain

    # fully developed speckle: magnitude of smoothed complex Gaussian scatterers (Rayleigh, mean 1)
    if opts.speckle > 0:
        re, im = (gaussian_filter(rng.standard_normal((n, n)), sigma=max(n / 160, 0.7)) for _ in range(2))
        speckle = np.hypot(re, im)
        speckle /= speckle.mean()
        refl = refl * (1 - opts.speckle + opts.speckle * speckle)

    attenuation = np.exp(-rng.uniform(0.6, 1.6) * y)
    image = np.log1p(8 * np.clip(refl * attenuation, 0, None)) / np.log1p(8)

    # sector scan: nothing is imaged outside the fan, so nothing there is labelled either
    half_angle = rng.uniform(0.55, 0.75)
    fan = (np.abs(np.arctan2(x - 0.5, y + 0.15)) < half_angle) & (np.hypot(x - 0.5, y + 0.15) < 1.12)
    image = np.where(fan, image, 0.0)

    mask = np.zeros((n, n), np.uint8)
    if opts.target == "regions":
        mask[cortex] = 3
        mask[medulla] = 2
        mask[cec] = 1
    else:
        mask[kidney] = 1
    mask[~fan] = 0
    return np.clip(image, 0, 1).astype(np.float32), mask


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    noise = gaussian_filter(rng.standard_normal((n, n)), sigma=sigma)
    return noise / (noise.std() + 1e-8)


def _scan(root, opts: PhantomOptions) -> list[Record]:
    return [
        Record(id=f"phantom_{i:05d}", group=f"phantom_{i:05d}", read=lambda i=i: render(i, opts))
        for i in range(opts.num_images)
    ]


register(
    Adapter(
        name="phantom",
        options=PhantomOptions,
        classes=lambda o: REGION_CLASSES if o.target == "regions" else CAPSULE_CLASSES,
        scan=_scan,
        layout="nothing on disk (generated)",
        needs_root=False,
    )
)
