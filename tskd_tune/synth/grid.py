"""The picture of a synthetic pool: its images next to real training images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tskd_tune.synth.gate import spread


def sample_grid(synthetic: np.ndarray, real: np.ndarray, path: Path, n: int = 16, columns: int = 4) -> Path:
    """A PNG: ``n`` of the ``synthetic`` images (left) next to ``n`` of the ``real`` ones (right), evenly
    spread over each set, under a title line; written atomically."""
    from PIL import Image, ImageDraw

    def tiles(images: np.ndarray) -> np.ndarray:
        rgb = np.repeat(images, 3, axis=1) if images.shape[1] == 1 else images
        rgb = (np.clip(np.asarray(rgb, np.float32), 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
        rows = []
        for start in range(0, n, columns):
            row = list(rgb[start : start + columns])
            row += [np.zeros_like(rgb[0])] * (columns - len(row))
            rows.append(np.concatenate(row, axis=1))
        return np.concatenate(rows, axis=0)

    scale = max(1, 128 // real.shape[-1])
    synth = tiles(np.asarray(synthetic[spread(np.arange(len(synthetic)), n)]))
    reals = tiles(np.asarray(real[spread(np.arange(len(real)), n)]))
    gap = np.full((synth.shape[0], max(4, synth.shape[1] // 32), 3), 255, np.uint8)
    grid = np.concatenate([synth, gap, reals], axis=1)
    picture = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    head = 14
    canvas = Image.new("RGB", (picture.width, picture.height + head), "white")
    canvas.paste(picture, (0, head))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), f"synthetic ({len(synthetic)} in the pool)", fill="black")
    draw.text(((synth.shape[1] + gap.shape[1]) * scale + 2, 1), "real (training images)", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
